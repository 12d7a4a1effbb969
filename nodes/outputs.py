"""SaveLoRA's files: `<loras>/<name>.safetensors` (kohya keys + metadata), `<name>.preview.png` and `<name>.json`.

The JSON sidecar follows A1111's Lora-card convention (`activation text`, `preferred weight`, `sd version`) and adds
`trigger_words`; ComfyUI ignores both extra files. Names are sanitized and made unique, so nothing is overwritten and
LoraLoader (which caches by path) always sees the new file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..trainer.errors import LoraFileError
from ..trainer.lorafile import atomic_write, save_lora, unique_path
from .paths import invalidate_lora_list, lora_target, loras_dir

SD_VERSION = {"sd1": "SD1", "sd2": "SD2", "sd2-v": "SD2", "sdxl": "SDXL"}


@dataclass(frozen=True)
class SavedLora:
    path: Path
    preview: Path | None
    sidecar: Path

    @property
    def name(self) -> str:
        """The name LoraLoader lists (relative to models/loras, forward slashes)."""
        return self.path.relative_to(loras_dir()).as_posix()


def to_pil(image: Any) -> Image.Image | None:
    """A PIL image from a PIL image or a ComfyUI IMAGE tensor ([B,H,W,C] in [0,1], first image)."""
    if image is None or isinstance(image, Image.Image):
        return image
    array = (image[0].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(array[..., :3])


def save_trained_lora(lora: dict, name: str, *, subfolder: str = "", preview: Any = None,
                      trigger_words: str = "") -> SavedLora:
    """Write the LoRA, its preview and its JSON sidecar; returns where they went."""
    if not lora:
        raise LoraFileError("the LoRA to save is empty (did training run any step?)")
    bad = [k for k in lora if not k.startswith(("lora_unet_", "lora_te"))]
    if bad:
        msg = (f"{len(bad)} keys are not in kohya's format (e.g. {bad[0]!r}); "
               "SaveLoRA writes LoRAs that A1111, ComfyUI and diffusers all load, "
               "so it only accepts LoRAs made by TrainLoRA")
        raise LoraFileError(msg)
    folder, stem = lora_target(name, subfolder)
    path = unique_path(folder, stem)
    metadata = dict(getattr(lora, "metadata", {}) or {})
    words = [w.strip() for w in trigger_words.split(",") if w.strip()] or list(getattr(lora, "trigger_words", []))
    metadata["ss_output_name"] = path.stem
    metadata["modelspec.title"] = path.stem
    if words:
        metadata["modelspec.trigger_phrase"] = ", ".join(words)
    save_lora(path, {k: v.contiguous() for k, v in lora.items()}, metadata)
    image = to_pil(preview) if preview is not None else to_pil(getattr(lora, "preview", None))
    preview_path = None
    if image is not None:
        preview_path = atomic_write(path.with_suffix(".preview.png"), lambda tmp: image.save(tmp, format="PNG"))
    card = {"description": f"Trained with LoRA Loop ({metadata.get('ss_steps', '?')} steps)",
            "sd version": SD_VERSION.get(getattr(lora, "family", ""), "Unknown"),
            "activation text": ", ".join(words), "preferred weight": 1.0, "trigger_words": words}
    sidecar = atomic_write(path.with_suffix(".json"),
                           lambda tmp: tmp.write_text(json.dumps(card, indent=2, ensure_ascii=False), encoding="utf-8"))
    invalidate_lora_list()
    return SavedLora(path, preview_path, sidecar)
