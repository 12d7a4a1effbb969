"""What the demo shows after training: one grid of the same prompts and seeds with the LoRA at 0, 0.5 and 1.0, and a
number that says how far the samples' colours are from the training images' (it falls as the LoRA takes hold).

The LoRA is read back from the file the run wrote, as a host would, and applied through the engine's `Network`;
weight w multiplies the up-projections, so at 0 every adapter adds exact zeros and the samples are the base model's
bit for bit (tests/test_demo.py holds that).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ...trainer.bundle import ModelBundle
from ...trainer.config import TrainConfig
from ...trainer.lorafile import load_lora
from ...trainer.network import applied_lora, network_spec, spec_from_state_dict
from ...trainer.plot import image_grid, to_pil
from ...trainer.sampling import sample_images, sample_settings

WEIGHTS = (0.0, 0.5, 1.0)
_PALETTE_PIXELS = 16  # images are compared at 16×16: colours, not edges


@dataclass
class Showcase:
    """Samples per LoRA weight ([B,3,H,W] in [-1,1]) and their colour distance to the training images."""

    samples: dict[float, torch.Tensor]
    distance: dict[float, float]

    def grid(self, references: list[Image.Image] | None = None) -> Image.Image:
        rows = [to_pil(self.samples[w]) for w in self.samples]
        labels = [f"LoRA {w:g}" + (" = the base model" if w == 0 else "") + f"   colour distance {self.distance[w]:.1f}"
                  for w in self.samples]
        if references:
            rows.append(references[:len(rows[0])])
            labels.append("training images (not the same prompts)")
        return image_grid(rows, labels)

    def summary(self) -> str:
        steps = " → ".join(f"{self.distance[w]:.1f} at {w:g}" for w in self.distance)
        return f"colour distance of the samples to the training images (RGB 0-255, lower is closer): {steps}"


def palette_distance(images: list[Image.Image], references: list[Image.Image]) -> float:
    """How far the colours of `images` are from those of `references`, in RGB units (0-255): the mean distance from
    each pixel to the nearest reference colour, and from each reference pixel to the nearest image colour (both ways,
    so that neither one colour of the palette nor a colour outside it scores well)."""

    def pixels(ims: list[Image.Image]) -> torch.Tensor:
        small = [np.asarray(im.convert("RGB").resize((_PALETTE_PIXELS, _PALETTE_PIXELS), Image.Resampling.BOX))
                 for im in ims]
        return torch.from_numpy(np.stack(small).reshape(-1, 3).astype(np.float32))

    a, b = pixels(images), pixels(references)
    d = torch.cdist(a, b)
    return float((d.min(dim=1).values.mean() + d.min(dim=0).values.mean()) / 2)


def scaled(state: dict[str, torch.Tensor], weight: float) -> dict[str, torch.Tensor]:
    """The LoRA at `weight`: kohya's strength multiplies the update, i.e. the up-projection."""
    return {k: v.float() * weight if k.endswith(".lora_up.weight") else v.float() for k, v in state.items()}


def sample_with_lora(bundle: ModelBundle, prompts: list[str], config: TrainConfig, lora: Path | None,
                     weight: float = 1.0) -> torch.Tensor:
    """Samples of `prompts` with the config's sampler settings and seed; the LoRA file at `weight` (None: none)."""
    settings = sample_settings(config)
    if lora is None:
        return sample_images(bundle, prompts, **settings)
    state, metadata = load_lora(lora)
    spec = spec_from_state_dict(state, network_spec(config), metadata)
    with applied_lora(bundle, spec, scaled(state, weight)):
        return sample_images(bundle, prompts, **settings)


def showcase(bundle: ModelBundle, config: TrainConfig, lora: Path, references: list[Image.Image],
             weights: tuple[float, ...] = WEIGHTS) -> Showcase:
    samples = {w: sample_with_lora(bundle, config.sample_prompts, config, lora, w) for w in weights}
    return Showcase(samples, {w: palette_distance(to_pil(s), references) for w, s in samples.items()})


def training_images(config: TrainConfig) -> list[Image.Image]:
    folder = Path(config.train_data_dir or ".")
    return [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]
