"""Stable Diffusion WebUI Forge: detected, and what does not work there said plainly.

Forge keeps the webui's extension API and UI but replaces the model objects (docs/hosts.md §9): `shared.sd_model` is a
`ForgeDiffusionEngine` whose UNet/CLIP/VAE live in `forge_objects` (ComfyUI-style patchers), `first_stage_model` and
`cond_stage_model` are None, the layers are `ForgeOperations.Linear/Conv2d` (plain `nn.Module`s computing
`F.linear`/`F.conv2d` with on-the-fly casting, not `nn.Linear` subclasses, so peft cannot adapt them), and its models
are loaded under `torch.inference_mode`. Training on them needs a Forge host bundle built like the ComfyUI one
(sigma-space `apply_model`, inference-tensor re-wrapping) plus adapters for ForgeOperations layers; until then the tab
checks datasets, edits captions and exports configs in Forge, and the Train button is disabled.
"""

from __future__ import annotations

from typing import Any

from . import webui

TRAINING_UNSUPPORTED = (
    "Training inside Stable Diffusion WebUI Forge is not supported yet: Forge's model objects differ from "
    "AUTOMATIC1111's (forge_objects patchers, first_stage_model/cond_stage_model = None, ForgeOperations layers that "
    "are not nn.Linear). Dataset check, caption tools and config import/export work here; train with "
    "AUTOMATIC1111, the ComfyUI nodes, or the command line: loraloop train --config <exported .yaml>."
)
BANNER = "**Forge detected.** " + TRAINING_UNSUPPORTED


def detected(model: Any = None) -> bool:
    """True inside Forge: its `modules_forge` package, or a model carrying `forge_objects`."""
    return (model is not None and hasattr(model, "forge_objects")) or webui.is_forge()
