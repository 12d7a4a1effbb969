"""Frozen base weights stored in fp8 on the command line (`base_weight_dtype: fp8`), computed per layer on the fly.

Inside a host the host decides the weights' dtype and LoRA Loop trains on them as they are (ComfyUI's fp8 models run
through its manual-cast ops). A standalone run can do the same for its own model: each adapted Linear of the denoiser
keeps its weight as float8_e4m3fn with one float32 scale (absmax / 448, the format's largest normal), and its forward
casts that weight to the input's dtype for the one matmul. That halves the weights' memory against bf16 (a quarter of
fp32) with no dequantised copy kept; the adapters stay float32 on top (peft wraps the layer as usual).
"""

from __future__ import annotations

import types

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _fp8_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight.to(x.dtype) * self.fp8_scale.to(x.dtype)
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return nn.functional.linear(x, weight, bias)


def store_fp8(root: nn.Module, paths: list[str]) -> int:
    """Store the weights of the Linears at `paths` in fp8 (see the module docstring); returns the bytes saved."""
    modules = dict(root.named_modules())
    saved = 0
    with torch.no_grad():
        for path in paths:
            layer = modules[path]
            if not isinstance(layer, nn.Linear) or layer.weight.dtype == FP8:
                continue
            weight = layer.weight.detach().float()
            scale = weight.abs().max().clamp(min=1e-12) / FP8_MAX
            saved += layer.weight.numel() * (layer.weight.element_size() - 1)
            layer.weight = nn.Parameter((weight / scale).to(FP8), requires_grad=False)
            layer.register_buffer("fp8_scale", scale.reshape(()))
            layer.forward = types.MethodType(_fp8_forward, layer)
    return saved
