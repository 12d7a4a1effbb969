"""The ComfyUI host bundle: the engine's `PatcherBundle` (trainer/bundles/patcher.py, which holds the sigma-space
conversion, the inference-tensor re-wrap and the text/latent plumbing of ComfyUI-design models) plus what only ComfyUI
has: training attention through its `optimized_attention_override`."""

from __future__ import annotations

import torch

from ..trainer.bundles.patcher import (
    CLIP_SLOTS,
    REFUSED_CONFIGS,
    SUPPORTED_CONFIGS,
    SUPPORTED_TEXT,
    PatcherBundle,
    autograd_safe_residuals,
    detect_family,
    prediction_type_of,
    text_encoder_slots,
    trainable_weights,
)

__all__ = ["CLIP_SLOTS", "REFUSED_CONFIGS", "SUPPORTED_CONFIGS", "SUPPORTED_TEXT", "ComfyBundle",
           "autograd_safe_residuals", "detect_family", "prediction_type_of", "text_encoder_slots",
           "trainable_weights", "training_attention"]


def training_attention() -> object | None:
    """An `optimized_attention_override` that runs ComfyUI's PyTorch SDPA attention, or None where unavailable.

    ComfyUI picks one attention function at start-up for sampling: sub-quadratic chunks on CPU, sage/xformers/flash
    when installed. Sage and some flash builds have no backward pass, and sub-quadratic attention backpropagates through
    many small chunks (a full SD1.5 UNet step at 256 px on CPU: 4.3 s vs 3.9 s with SDPA). `transformer_options
    ["optimized_attention_override"]` (ComfyUI 0.3.6x+) lets one call use another function: training uses SDPA, which
    has a fused backward on every device, while sampling keeps the user's choice. Older ComfyUI ignores the key.
    """
    try:
        from comfy.ldm.modules import attention
    except ImportError:
        return None
    sdpa = getattr(attention, "attention_pytorch", None)
    if sdpa is None or not hasattr(attention, "wrap_attn"):
        return None

    def override(_default: object, *args: object, **kwargs: object) -> torch.Tensor:
        return sdpa(*args, **kwargs)  # kwargs carry `_inside_attn_wrapper`: no second override

    return override


class ComfyBundle(PatcherBundle):
    """`ModelBundle` over a ComfyUI MODEL (ModelPatcher), CLIP and VAE; see `PatcherBundle`."""

    def __init__(self, model: object, clip: object, vae: object, name: str = "ComfyUI model") -> None:
        super().__init__(model, clip, vae, name, attention_override=training_attention())
