"""Non-reentrant gradient checkpointing for any SD UNet or DiT layout, switched on and off without a trace.

Hosts' own checkpointing is unusable for us (A1111's is reentrant and ldm-only, so LoRA weights inside get no grads when
the block input does not require grad). We wrap the forward of each transformer and ResNet block with
`torch.utils.checkpoint(use_reentrant=False)` as an instance attribute and delete it afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# Same class names in diffusers, ldm/sgm, ComfyUI and Forge; then the DiT blocks (ComfyUI/BFL and diffusers names of
# Flux, Chroma, SD3, Lumina 2/Z-Image, Qwen-Image).
DIT_BLOCK_CLASSES = {"DoubleStreamBlock", "SingleStreamBlock", "JointBlock", "JointTransformerBlock",
                     "QwenImageTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock",
                     "ZImageTransformerBlock", "Lumina2TransformerBlock"}
CHECKPOINT_CLASSES = {"BasicTransformerBlock", "ResnetBlock2D", "ResBlock", *DIT_BLOCK_CLASSES}


def _own(value: object) -> object:
    return value.clone() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _on_copies(forward):  # noqa: ANN001, ANN202
    """`forward` run on copies of its tensor inputs: ComfyUI's DiT blocks add their residuals into their inputs in
    place (`img += …`, comfy/ldm/flux/layers.py), and checkpoint must recompute the block from unchanged inputs."""
    def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        return forward(*(_own(a) for a in args), **{k: _own(v) for k, v in kwargs.items()})

    return run


def _wrap(forward):  # noqa: ANN001, ANN202
    def checkpointed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if torch.is_grad_enabled():
            return checkpoint(_on_copies(forward), *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return checkpointed


@contextmanager
def gradient_checkpointing(root: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Checkpoint every block of `root` while the context is open; yields the number of wrapped blocks."""
    patched: list[tuple[nn.Module, object]] = []
    if enabled:
        for module in root.modules():
            if type(module).__name__ in CHECKPOINT_CLASSES:
                previous = module.__dict__.get("forward")  # a host may already have patched this instance
                module.forward = _wrap(module.forward)
                patched.append((module, previous))
    try:
        yield len(patched)
    finally:
        for module, previous in patched:
            if previous is None:
                del module.forward
            else:
                module.forward = previous
