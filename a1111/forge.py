"""Stable Diffusion WebUI Forge: the loaded model's `forge_objects` as an engine bundle, and Forge's own ways.

Forge keeps the webui's extension API and UI but holds the model the ComfyUI way (docs/hosts.md §9):
`shared.sd_model.forge_objects.unet` is a ModelPatcher (Forge Classic: `ldm_patched.modules.model_patcher`, Forge Neo:
`backend.patcher`), `.clip` a CLIP with `cond_stage_model.clip_l/…`, `.vae` a VAE object; `apply_model(x, σ, …)`
returns x0. So the engine's `PatcherBundle` (trainer/bundles/patcher.py) trains it, as it trains ComfyUI's MODEL; this
module adds Forge's own parts: clean weights in (`unload_all_models` unpatches any LoRA merged into them), the UNet
loaded through Forge's model management, and Forge's LoRA cache cleared after a file is written.

Verified on Forge Classic (layers `ldm_patched.modules.ops.disable_weight_init.Linear`, nn.Linear subclasses); Forge
Neo's `backend.operations` layers are not nn.Linear subclasses, which peft cannot adapt: Neo is refused with that
reason until its layers are handled.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..trainer.bundles.patcher import PatcherBundle, text_encoder_slots
from ..trainer.errors import UnsupportedModelError
from . import webui

log = logging.getLogger(__name__)

NEO_UNSUPPORTED = (
    "Training inside Forge Neo is not supported yet: its layers (backend.operations) are not torch nn.Linear/Conv2d "
    "subclasses, so the adapters cannot be attached. Forge Classic (the `classic` branch) trains in place; on Neo, "
    "export the config and train with ComfyUI or the command line: loraloop train --config <exported .yaml>."
)
MEMORY_MODULES = ("ldm_patched.modules.model_management", "backend.memory_management")


def detected(model: Any = None) -> bool:
    """True inside Forge: its `modules_forge` package, or a model carrying `forge_objects`."""
    return (model is not None and hasattr(model, "forge_objects")) or webui.is_forge()


def memory_management() -> ModuleType | None:
    """Forge's model management (Classic: ldm_patched, Neo: backend), or None outside Forge."""
    for name in MEMORY_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def check_trainable(model: Any) -> None:
    """Refuse a Forge model whose layers peft cannot adapt (Neo), naming why."""
    unet = model.forge_objects.unet.model.diffusion_model
    matrices = [m for m in unet.modules()
                if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2]
    if matrices and not any(isinstance(m, nn.Linear) for m in matrices):
        raise UnsupportedModelError(NEO_UNSUPPORTED)


class ForgeBundle(PatcherBundle):
    """`PatcherBundle` over `sd_model.forge_objects`, with the attributes the tab's run uses (a1111/training.py)."""

    lowvram = True  # Forge's model management places modules: the tab's own offloading stays out of its way

    def __init__(self, sd_model: Any, name: str = "") -> None:
        objects = getattr(sd_model, "forge_objects_original", None) or sd_model.forge_objects
        super().__init__(objects.unet, objects.clip, objects.vae, name or webui.checkpoint_name(sd_model))
        self.sd_model = sd_model
        self._train_text = False
        self.inplace_residuals = True  # ldm_patched's transformer blocks add `x += attn(norm(x))` in place

    @property
    def text_module(self) -> nn.Module:
        return self.clip.cond_stage_model  # type: ignore[attr-defined]

    @property
    def train_text(self) -> bool:
        return self._train_text

    @train_text.setter
    def train_text(self, on: bool) -> None:
        """The tab's switch: with adapters on the CLIP, captions are encoded through it at every step."""
        self._train_text = bool(on)
        if on:
            self.train_text_encoders()
        else:
            self.live_text = False
            self.text_encoders = []

    def can_train_text(self) -> bool:
        try:
            text_encoder_slots(self.clip, self.family)
        except UnsupportedModelError:
            return False
        return True


@contextlib.contextmanager
def training_memory(bundle: ForgeBundle) -> Iterator[None]:
    """Clean base weights in, the UNet on the compute device for the run, Forge's placement back afterwards.

    `unload_all_models` unpatches every loaded model (Forge merges LoRA patches into the weights at load time and
    keeps a backup), so training sees the checkpoint's own weights; then the UNet alone is loaded. On exit everything is
    unloaded again: the next generation loads what it needs, LoRAs included, as Forge always does.
    """
    mm = memory_management()
    if mm is not None:
        mm.unload_all_models()
        mm.load_models_gpu([bundle.patcher])
    try:
        yield
    finally:
        if mm is not None:
            mm.unload_all_models()
            mm.soft_empty_cache()


def forget_cached_lora() -> None:
    """Forge's Lora extension caches files by name (`load_lora_state_dict`, an lru_cache): a retrained file of the
    same name would not be read again. Clear it after writing."""
    networks = webui.lora_extension()
    for name in ("load_lora_state_dict", "load_networks_from_file"):
        cached = getattr(networks, name, None) if networks is not None else None
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()


__all__ = ["NEO_UNSUPPORTED", "ForgeBundle", "check_trainable", "detected", "forget_cached_lora",
           "memory_management", "torch", "training_memory"]
