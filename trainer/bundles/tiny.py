"""Tiny SD1-style and SDXL-style models built from configs with seeded random weights.

They have the real architecture (same module names, same conditioning plumbing, the real CLIP tokenizer) at a size that
trains in seconds on a CPU: for the tests and `base_model: builtin:tiny-sd1` / `builtin:tiny-sdxl` (and the flow
families' `builtin:tiny-flux1` / `builtin:tiny-sd3`, on diffusers' Flux and SD3 transformers). Their samples are
noise; `builtin:demo-base` (bundles/demo.py, trained weights) is the small model that draws, for the demo.
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedModelError
from ..families import get_family
from ..schedule import scaled_linear_alphas_cumprod
from ..tokenizer import load_clip_tokenizer
from .diffusers_bundle import DiffusersBundle

TINY_MODELS = ("tiny-sd1", "tiny-sd1-v", "tiny-sdxl")
TINY_FLOW_MODELS = ("tiny-flux1", "tiny-sd3")
BUILTIN_MODELS = (*TINY_MODELS, *TINY_FLOW_MODELS, "demo-base")
_TE_WIDTH = 32


def _text_config(projection: bool):  # noqa: ANN202 - transformers type
    from transformers import CLIPTextConfig

    pad = 0 if projection else 49407  # OpenCLIP pads with "!" (0), CLIP-L with <|endoftext|>
    return CLIPTextConfig(hidden_size=_TE_WIDTH, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
                          vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=pad, projection_dim=_TE_WIDTH, hidden_act="gelu" if projection else "quick_gelu")


def _vae(channels: int = 4):  # noqa: ANN202
    from diffusers import AutoencoderKL

    # Four levels so that latents are 1/8 of the image, as in the real models; the flow families' VAE has 16
    # channels and a shift (Flux/SD3: (z − shift)·scale).
    extra = {"scaling_factor": 0.3611, "shift_factor": 0.1159} if channels == 16 else {}
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=channels, block_out_channels=(16, 16, 32, 32),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=8, sample_size=64, **extra)


def _unet(sdxl: bool):  # noqa: ANN202
    from diffusers import UNet2DConditionModel

    if not sdxl:
        return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4,
                                    out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=_TE_WIDTH,
                                    attention_head_dim=8, norm_num_groups=32)
    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2 * _TE_WIDTH,
                                transformer_layers_per_block=(1, 2), attention_head_dim=(4, 8),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + _TE_WIDTH,
                                norm_num_groups=32)


def _t5(width: int):  # noqa: ANN202
    """A tiny T5 encoder over CLIP's vocabulary: the built-in models tokenize its captions with the CLIP tokenizer
    (no T5 vocabulary ships offline; a real model brings its own tokenizer)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=49408, d_model=width, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu"))


def build_tiny_flow_bundle(name: str, seed: int = 0, layers: tuple[int, int] = (1, 1)):  # noqa: ANN201 - FlowBundle
    """`tiny-flux1` (1 double + 1 single block, guidance-distilled like dev) or `tiny-sd3` (2 joint blocks): the real
    diffusers classes at a size that trains in seconds on a CPU. `layers`: Flux's (double, single) block counts (tests
    of block swapping want more)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .flow_bundle import FlowBundle
    from .flux import FluxArchitecture
    from .sd3 import SD3Architecture

    tokenizer = load_clip_tokenizer("clip-l")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "tiny-flux1":
            transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=layers[0],
                                                 num_single_layers=layers[1],
                                                 attention_head_dim=16, num_attention_heads=2,
                                                 joint_attention_dim=_TE_WIDTH, pooled_projection_dim=_TE_WIDTH,
                                                 guidance_embeds=True, axes_dims_rope=(4, 6, 6))
            encoders = [("lora_te1", CLIPTextModel(_text_config(False))), ("lora_te3", _t5(_TE_WIDTH))]
            family, arch, toks = get_family("flux1"), FluxArchitecture(), [tokenizer, tokenizer]
        else:
            transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=2,
                                                attention_head_dim=16, num_attention_heads=2,
                                                joint_attention_dim=2 * _TE_WIDTH, caption_projection_dim=32,
                                                pooled_projection_dim=2 * _TE_WIDTH, out_channels=16,
                                                pos_embed_max_size=32)
            encoders = [("lora_te1", CLIPTextModelWithProjection(_text_config(True))),
                        ("lora_te2", CLIPTextModelWithProjection(_text_config(True))), ("lora_te3", _t5(2 * _TE_WIDTH))]
            family, arch, toks = get_family("sd3"), SD3Architecture(), [tokenizer] * 3
        vae = _vae(16)
        for module in transformer.modules():  # diffusers zero-initialises output layers; a "trained" model has none
            for param in module.parameters(recurse=False):
                if not param.any():
                    param.data.normal_(0.0, 0.02)
    for module in (transformer, vae, *(m for _, m in encoders)):
        module.eval().requires_grad_(False)
    return FlowBundle(family, arch, transformer, vae, encoders, toks, f"builtin:{name}")


def build_tiny_bundle(name: str, seed: int = 0) -> DiffusersBundle:
    """The built-in model called `name` (one of BUILTIN_MODELS). The tiny ones are identical for the same seed and
    built without touching the global RNG; `demo-base` is loaded from its shipped weights (`seed` does not apply)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if name == "demo-base":
        from .demo import build_demo_bundle  # imported here: it loads diffusers, which importing tiny.py must not

        return build_demo_bundle()
    if name in TINY_FLOW_MODELS:
        return build_tiny_flow_bundle(name, seed)  # type: ignore[return-value]
    if name not in TINY_MODELS:
        msg = f"unknown built-in model {name!r}; built-in models: {', '.join('builtin:' + n for n in BUILTIN_MODELS)}"
        raise UnsupportedModelError(msg)
    sdxl = name == "tiny-sdxl"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae = _unet(sdxl), _vae()
        if sdxl:
            tes = [CLIPTextModel(_text_config(False)), CLIPTextModelWithProjection(_text_config(True))]
            toks = [load_clip_tokenizer("clip-l"), load_clip_tokenizer("open-clip")]
        else:
            tes, toks = [CLIPTextModel(_text_config(False))], [load_clip_tokenizer("clip-l")]
    for module in (unet, vae, *tes):
        module.eval().requires_grad_(False)
    family = get_family("sdxl" if sdxl else "sd1")
    prediction = "v_prediction" if name.endswith("-v") else None
    return DiffusersBundle(family, unet, vae, tes, toks, scaled_linear_alphas_cumprod(), f"builtin:{name}", prediction)
