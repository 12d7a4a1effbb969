"""A host-like bundle around the original ldm `UNetModel` (stable-diffusion-sdkit): the layout A1111/ComfyUI hold."""

from __future__ import annotations

import torch

from loraloop.trainer.bundle import Conditioning, TextEncoderSlot
from loraloop.trainer.families import get_family
from loraloop.trainer.naming import UNetLayout, ldm_unet_lora_name, unet_targets
from loraloop.trainer.schedule import scaled_linear_alphas_cumprod

SD15_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                 num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                 transformer_depth=1, context_dim=768, legacy=False)
SD2_UNET = dict(SD15_UNET, num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
TINY_UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=2,
                 attention_resolutions=[1], channel_mult=[1, 2], num_head_channels=8, context_dim=32,
                 use_spatial_transformer=True, transformer_depth=1, legacy=False)


def ldm_unet(**kwargs):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(**kwargs)


class LdmBundle:
    """SD1-family bundle over an ldm UNetModel and a tiny CLIP text encoder (no VAE: latents are given directly)."""

    def __init__(self, unet, text_encoder, tokenizer, family: str = "sd1") -> None:
        self.family = get_family(family)
        self.unet = unet
        self.tokenizer = tokenizer
        self.text_encoders = [TextEncoderSlot(text_encoder, self.family.te_prefixes[0])]
        self.alphas_cumprod = scaled_linear_alphas_cumprod()
        self.name = "ldm-test"
        self.layout = UNetLayout.from_ldm_module(unet)

    prediction_type = "epsilon"
    device = torch.device("cpu")
    dtype = torch.float32

    def encode_images(self, pixels):
        return torch.nn.functional.avg_pool2d(pixels, 8)[:, :3].repeat(1, 2, 1, 1)[:, :4]

    def decode_latents(self, latents):
        return torch.nn.functional.interpolate(latents[:, :3], scale_factor=8)

    def encode_text(self, captions):
        ids = self.tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        return Conditioning(self.text_encoders[0].module(ids)[0])

    def predict(self, noisy, timesteps, cond, sizes=None):
        return self.unet(noisy, timesteps, context=cond.context).float()

    def unet_lora_name(self, module_path):
        return ldm_unet_lora_name(self.family.unet_names, self.layout, module_path)

    def unet_targets(self, conv):
        return unet_targets(self.unet, conv)


def tiny_ldm_bundle(seed: int = 0) -> LdmBundle:
    from transformers import CLIPTextModel

    from loraloop.trainer.bundles.tiny import _text_config
    from loraloop.trainer.tokenizer import load_clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = ldm_unet(**TINY_UNET)
        te = CLIPTextModel(_text_config(False))
    for m in (unet, te):
        m.eval().requires_grad_(False)
    return LdmBundle(unet, te, load_clip_tokenizer("clip-l"))
