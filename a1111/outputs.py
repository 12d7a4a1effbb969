"""What a run leaves in the webui: the LoRA and its card files in `--lora-dir`, the rest in the work folder.

In the Lora folder (everything there is listed by the Lora extension, which reads .pt/.ckpt/.safetensors):
  <name>.safetensors   kohya keys and ss_*/modelspec.* metadata, loads as <lora:name:weight>
  <name>.json          the card's user metadata: "activation text" (the trigger word), "preferred weight",
                       "sd version" (SD1/SD2/SDXL, so the card shows for the right models), "description"
  <name>.preview.png   the card's picture
In the work folder (<webui outputs>/loraloop by default, never the Lora folder, whose scanner would list a .pt):
  <name>.yaml (the effective config: `loraloop train --config` reproduces the run), <name>_loss.png,
  <name>-state.pt (resumable), samples/.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from PIL import Image

from ..trainer.config import TrainConfig
from ..trainer.families import Family
from ..trainer.lorafile import atomic_write, sanitize_name, save_lora, unique_path
from ..trainer.plot import loss_curve
from .bundle import SD_VERSIONS


def choose_name(folder: Path, wanted: str, *, overwrite: bool) -> str:
    """The LoRA's file stem: `wanted` made file-safe; `wanted_2`, `_3`… when taken and not overwriting."""
    stem = sanitize_name(wanted, default="lora")
    if overwrite:
        return stem
    return unique_path(folder, stem).stem


def card_metadata(*, family: Family, trigger_word: str, preferred_weight: float, description: str) -> dict:
    """The Lora extension's user metadata (extra_networks.get_user_metadata / ui_edit_user_metadata.py keys)."""
    return {"description": description, "sd version": SD_VERSIONS[family.name], "activation text": trigger_word,
            "preferred weight": preferred_weight, "negative text": "", "notes": "Trained with LoRA Loop."}


def write_lora(folder: Path, name: str, tensors: dict, metadata: dict[str, str], card: dict, *,
               preview: Image.Image | None = None, overwrite: bool = False) -> dict[str, Path]:
    """<name>.safetensors, <name>.json and (given) <name>.preview.png into the Lora folder, each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {"lora": save_lora(folder / f"{name}.safetensors", tensors, metadata, overwrite=overwrite)}
    text = json.dumps(card, indent=4, ensure_ascii=False)
    out["card"] = atomic_write(folder / f"{name}.json", lambda tmp: tmp.write_text(text, encoding="utf-8"),
                               overwrite=True)
    if preview is not None:
        out["preview"] = atomic_write(folder / f"{name}.preview.png",
                                      lambda tmp: preview.save(tmp, format="PNG"), overwrite=True)
    return out


def write_work_files(folder: Path, name: str, config: TrainConfig, losses: list[float]) -> dict[str, Path]:
    """<name>.yaml (effective config) and <name>_loss.png into the work folder."""
    folder.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)
    cfg = atomic_write(folder / f"{name}.yaml", lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=True)
    plot = loss_curve(losses, title=f"{name}: loss")
    png = atomic_write(folder / f"{name}_loss.png", lambda tmp: plot.save(tmp, format="PNG"), overwrite=True)
    return {"config": cfg, "loss_plot": png}
