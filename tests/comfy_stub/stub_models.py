"""Tiny SD1/SD2/SDXL-layout models for the stand-in, built under torch.inference_mode() as ComfyUI loads them."""

import functools

import comfy.model_base
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import torch

TE_WIDTH = 32
TINY_UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=2,
                 attention_resolutions=[1], channel_mult=[1, 2], num_head_channels=8, context_dim=TE_WIDTH,
                 use_spatial_transformer=True, transformer_depth=1, legacy=False)
SDXL_EMBED = 8


def _text_config(projection):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=TE_WIDTH, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                          vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=0 if projection else 49407, projection_dim=TE_WIDTH)


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from loraloop.trainer.tokenizer import load_clip_tokenizer

    return load_clip_tokenizer("clip-l")


def build_flux(seed=0, dtype=torch.float32, schnell=False):
    """(MODEL, CLIP, VAE) of a tiny Flux-layout model (comfy/ldm/flux stand-in), CLIP-L-sized text, a 16-channel
    VAE; the CLIP returns its attention mask like DiT text encoders, so captions keep their own lengths."""
    from comfy.ldm.flux.model import Flux
    from transformers import CLIPTextModel

    config_cls = comfy.supported_models.FluxSchnell if schnell else comfy.supported_models.Flux
    model_type = comfy.model_base.ModelType.FLOW if schnell else comfy.model_base.ModelType.FLUX
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        dm = Flux(in_channels=16, hidden_size=32, num_heads=4, context_in_dim=TE_WIDTH, vec_in_dim=TE_WIDTH, depth=2,
                  depth_single_blocks=2, guidance_embed=not schnell).to(dtype).eval().requires_grad_(True)
        base = comfy.model_base.Flux(config_cls({}), model_type, diffusion_model=dm)
        encoder = CLIPTextModel(_text_config(False)).eval().requires_grad_(True)
    patcher = comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))
    clip = comfy.sd.CLIP({"l": encoder}, _tokenizer(), attention_mask=True)
    return patcher, clip, comfy.sd.VAE(channels=16)


def build(kind="sd15", seed=0, dtype=torch.float32, dynamic=False):
    """(MODEL patcher, CLIP, VAE) for kind ∈ sd15, sd20v, sdxl, wan (a family we refuse), flux2 (refused with a
    reason); `build_flux` makes a Flux.1-layout model."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    sdxl = kind == "sdxl"
    unet_config = dict(TINY_UNET)
    if sdxl:
        unet_config.update(context_dim=2 * TE_WIDTH, num_classes="continuous", use_linear_in_transformer=True)
    config_cls = {"sd15": comfy.supported_models.SD15, "sd20v": comfy.supported_models.SD20,
                  "sdxl": comfy.supported_models.SDXL, "wan": comfy.supported_models.WAN21_T2V,
                  "flux2": comfy.supported_models.Flux2}[kind]
    model_type = comfy.model_base.ModelType.V_PREDICTION if kind == "sd20v" else comfy.model_base.ModelType.EPS
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        unet = UNetModel(**unet_config)
        if sdxl:  # SGM's label_emb ("sequential" ADM, absent from this ldm version): same module names
            width = 4 * TINY_UNET["model_channels"]
            unet.label_emb = torch.nn.Sequential(torch.nn.Sequential(
                torch.nn.Linear(TE_WIDTH + 6 * SDXL_EMBED, width), torch.nn.SiLU(), torch.nn.Linear(width, width)))
        for param in unet.parameters():  # ldm zero-initialises output layers; a "trained" model has none
            if not param.any():
                param.normal_(0.0, 0.05)
        # ComfyUI 0.12.3 leaves loaded UNet/CLIP weights as inference tensors with requires_grad=True (seen in the real
        # host: load_state_dict(assign=True) keeps the checkpoint tensors' flag), so the stand-in does too.
        unet = unet.to(dtype).eval().requires_grad_(True)
        encoders = {"h" if kind == "sd20v" else "l": CLIPTextModel(_text_config(False)).eval().requires_grad_(True)}
        if sdxl:
            encoders["g"] = CLIPTextModelWithProjection(_text_config(True)).eval().requires_grad_(True)
        base_cls = comfy.model_base.SDXL if sdxl else comfy.model_base.BaseModel
        base = base_cls(config_cls(unet_config), model_type, diffusion_model=unet)
        if sdxl:
            base.embed_dim = SDXL_EMBED
    patcher_cls = comfy.model_patcher.ModelPatcherDynamic if dynamic else comfy.model_patcher.ModelPatcher
    patcher = patcher_cls(base, torch.device("cpu"), torch.device("cpu"))
    clip = comfy.sd.CLIP(encoders, _tokenizer())
    return patcher, clip, comfy.sd.VAE()
