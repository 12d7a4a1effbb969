"""Training settings proposed from the dataset and the model family, each with its reason.

Rules of thumb from the kohya/OneTrainer communities, written down once:
* views per image: ~100 for small sets (≤ 20 images), falling as 2000 / images, never below 10;
* resolution: the family's native one, lowered (64-px steps) when most images are smaller, to avoid upscaling;
* rank: 8 for ≤ 20 images (a character/object), 16 up to 100, 32 beyond (styles, many concepts);
* learning rate: 1e-4 for AdamW at alpha = rank, × rank/alpha (the update is scaled by alpha/rank), × √(effective
  batch); Prodigy and other adaptive optimizers get 1.0;
* captions: booru-style tags → shuffle them (keeping the trigger first); prose → keep the order.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from ..families import get_family

BASE_LR = 1e-4
MAX_LR = 1e-3
ADAPTIVE_OPTIMIZERS = ("prodigy",)


@dataclass(frozen=True)
class DatasetStats:
    """What the recommendations look at.

    Args:
        images: distinct images; samples: images × repeats (one epoch).
        short_sides: each image's shorter side in pixels.
        caption_style: `tags`, `prose` or `none`.
    """

    images: int
    samples: int
    short_sides: tuple[int, ...]
    caption_style: str

    @classmethod
    def from_records(cls, records: Iterable[object]) -> DatasetStats:
        """Stats of `ImageRecord`s (`TrainDataset.records`)."""
        records = list(records)
        captions = [r.caption for r in records if r.caption]  # type: ignore[attr-defined]
        return cls(len(records), sum(r.repeats for r in records),  # type: ignore[attr-defined]
                   tuple(min(r.width, r.height) for r in records), caption_style(captions))  # type: ignore[attr-defined]


def caption_style(captions: list[str]) -> str:
    """`tags` when captions are mostly short comma-separated phrases, `prose` for sentences, `none` without text."""
    if not captions:
        return "none"
    tag_like = 0
    for caption in captions:
        parts = [p.strip() for p in caption.split(",") if p.strip()]
        words = len(re.findall(r"\w+", caption))
        mean_part = words / max(1, len(parts))
        if len(parts) >= 3 and mean_part <= 3.0:
            tag_like += 1
    return "tags" if tag_like >= len(captions) / 2 else "prose"


@dataclass(frozen=True)
class Recommendation:
    """One proposed setting: config key, value and why."""

    key: str
    value: object
    reason: str

    def __str__(self) -> str:
        return f"{self.key}: {self.value} ({self.reason})"


def recommend(stats: DatasetStats, family: str, *, effective_batch: int = 1, optimizer: str = "adamw",
              lora_alpha: float | None = None) -> list[Recommendation]:
    """Steps/epochs, learning rate, rank, resolution and caption handling for a dataset and family."""
    fam = get_family(family)
    out = []
    resolution, why = _resolution(stats, fam.resolution)
    out.append(Recommendation("resolution", resolution, why))
    rank = 8 if stats.images <= 20 else 16 if stats.images <= 100 else 32
    kind = "one character/object" if rank == 8 else "a few concepts" if rank == 16 else "a style or many concepts"
    out.append(Recommendation("lora_rank", rank, f"{stats.images} images usually teach {kind}; more rank would "
                                                 "memorise them"))
    alpha = float(lora_alpha) if lora_alpha else float(rank)
    views = max(10, min(100, round(2000 / max(1, stats.images))))
    steps = math.ceil(stats.images * views / effective_batch)
    epochs = max(1, round(views * stats.images / max(1, stats.samples)))
    out.append(Recommendation("max_train_steps", steps, f"about {views} views per image for {stats.images} images "
                                                        f"at effective batch {effective_batch} (≈ {epochs} epochs)"))
    out.append(Recommendation("epochs", epochs, "the same length counted in passes over the dataset"))
    if optimizer in ADAPTIVE_OPTIMIZERS:
        out.append(Recommendation("learning_rate", 1.0, f"{optimizer} sets its own step size; 1.0 is its default"))
    else:
        lr = min(MAX_LR, BASE_LR * (rank / alpha) * math.sqrt(effective_batch))
        out.append(Recommendation("learning_rate", float(f"{lr:.2g}"),
                                  f"1e-4 at alpha = rank, × rank/alpha = {rank / alpha:g} (alpha {alpha:g} scales the "
                                  f"update by alpha/rank) × √{effective_batch} for the effective batch"))
    if stats.caption_style == "tags":
        out.append(Recommendation("shuffle_caption", True, "captions are comma-separated tags: shuffling stops the "
                                                           "model from learning their order"))
        out.append(Recommendation("keep_tokens", 1, "keeps the first tag (put the trigger word there) in place"))
    elif stats.caption_style == "prose":
        out.append(Recommendation("shuffle_caption", False, "captions are sentences: shuffling would break them"))
    else:
        out.append(Recommendation("trigger_word", "(set one)", "images have no captions: a trigger word is the only "
                                                               "text the LoRA can bind to"))
    return out


def _resolution(stats: DatasetStats, native: int) -> tuple[int, str]:
    if not stats.short_sides:
        return native, "the family's native resolution"
    median = statistics.median(stats.short_sides)
    if median >= native:
        return native, f"the family's native resolution; the median image (short side {median:.0f} px) covers it"
    lowered = max(256, int(median) // 64 * 64)
    share = sum(s < native for s in stats.short_sides) / len(stats.short_sides)
    return lowered, (f"{share:.0%} of images are smaller than the native {native} px (median short side "
                     f"{median:.0f} px); training above that would upscale them")
