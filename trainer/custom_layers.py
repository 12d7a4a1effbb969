"""LoRA on linear layers that are not `torch.nn.Linear` subclasses, through peft's custom-module registration.

Some hosts build their models from their own layer classes: Forge Neo's `backend.operations.ForgeOperations.Linear`
is a plain `nn.Module` that computes `F.linear` itself, with the weight cast, offloaded or patched on the fly. peft
adapts only the layer types it knows, so such a layer gets `LinearLikeLora`: peft's own LoRA `Linear` (same attribute
names: `lora_A`/`lora_B`/`r`/`scaling`, so export, loading and the OOM ladder's rank lever work unchanged) whose
`in_features`/`out_features` come from the weight matrix. Its forward calls the host layer as it is (the host's casts
keep running) and adds B(A(dropout(x)))·scale.

Everything is duck-typed on the layer's `weight`: no host module is imported. A layer qualifies when its weight is a
plain float matrix (fp32/fp16/bf16/fp8); packed or quantized weights (integer dtypes, tensor subclasses such as
bitsandbytes' Params4bit or GGUF tensors) do not, and `unadaptable_reason` says why.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .errors import UnsupportedModelError

PLAIN_TENSORS = (torch.Tensor, nn.Parameter)
PEFT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # what peft adapts itself (of the layers we target)


def unadaptable_reason(module: nn.Module) -> str | None:
    """Why `module` cannot take a `LinearLikeLora` (None when it can). nn.Linear itself is peft's own business."""
    if isinstance(module, nn.Linear):
        return "it is a torch.nn.Linear (peft adapts it directly)"
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return "it has no weight tensor (not loaded?)"
    if type(weight) not in PLAIN_TENSORS:
        return f"its weight is a {type(weight).__name__}, a packed/quantized tensor class"
    if not weight.dtype.is_floating_point:
        return f"its weight is stored as {weight.dtype} (integer-quantized)"
    if weight.dim() != 2:
        return f"its weight is not a matrix (shape {tuple(weight.shape)})"
    out_features, in_features = weight.shape
    declared = (getattr(module, "in_features", in_features), getattr(module, "out_features", out_features))
    if declared != (in_features, out_features):
        return f"its in/out features {declared} do not match its weight {tuple(weight.shape)}"
    return None


def is_linear_like(module: nn.Module) -> bool:
    """A non-nn.Linear layer with a plain float weight matrix: `LinearLikeLora` can adapt it."""
    return unadaptable_reason(module) is None


@functools.cache
def linear_like_lora() -> type[nn.Module]:
    """The `LinearLikeLora` class, made on first use: peft is imported only when a model has such layers."""
    from peft.tuners.lora import Linear

    class LinearLikeLora(Linear):
        """peft's LoRA `Linear` over a linear-like host layer: only the feature sizes are read differently (from the
        weight matrix, [out, in]), since peft knows them for its own layer types only. peft releases without this hook
        (< 0.14) read `in_features`/`out_features` off the layer, which Neo's Linear has."""

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            out_features, in_features = module.weight.shape
            return int(in_features), int(out_features)

    return LinearLikeLora


def custom_modules(root: nn.Module, paths: list[str]) -> dict[type[nn.Module], type[nn.Module]]:
    """peft's custom-module mapping for the linear-like layer classes among the targets `paths` inside `root` (empty
    when every target is a layer peft knows). A target of neither kind raises, naming the layer and why."""
    modules = dict(root.named_modules())
    mapping: dict[type[nn.Module], type[nn.Module]] = {}
    for path in paths:
        layer = modules.get(path)
        if layer is None or isinstance(layer, PEFT_LAYERS):
            continue  # a missing path is peft's to report
        reason = unadaptable_reason(layer)
        if reason is not None:
            msg = (f"cannot attach an adapter to {path} ({type(layer).__qualname__}): {reason}; LoRA Loop trains "
                   "layers whose weights are float matrices (fp32/fp16/bf16/fp8)")
            raise UnsupportedModelError(msg)
        mapping[type(layer)] = linear_like_lora()
    return mapping
