"""Stand-in for comfy/supported_models.py (ComfyUI 0.12.3): the model-config classes, identified by class name."""

from . import latent_formats


class BASE:
    sampling_settings = {}
    manual_cast_dtype = None

    def __init__(self, unet_config):
        self.unet_config = dict(unet_config)
        self.latent_format = self.latent_format_cls()


class SD15(BASE):
    latent_format_cls = latent_formats.SD15


class SD20(BASE):
    latent_format_cls = latent_formats.SD15


class SDXL(BASE):
    latent_format_cls = latent_formats.SDXL


class Flux(BASE):
    latent_format_cls = latent_formats.Flux


class FluxSchnell(BASE):
    latent_format_cls = latent_formats.Flux
    sampling_settings = {"multiplier": 1.0, "shift": 1.0}


class WAN21_T2V(BASE):  # a family LoRA Loop refuses (video)
    latent_format_cls = latent_formats.LatentFormat


class Flux2(BASE):  # refused with a reason
    latent_format_cls = latent_formats.LatentFormat
