"""`TrainDataset`: scanned images expanded by their repeats, bucketed, batched per epoch and loaded as tensors.

Determinism (needed to resume a run exactly): the batch order of an epoch depends only on (seed, epoch), and every
random choice inside a sample (crop, flip, caption augmentation) comes from the rng the caller passes to
`load_sample`; `sample_rng(epoch, index)` gives the canonical one. Nothing here uses global random state.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..bundle import SizeInfo
from ..errors import ConfigError, DatasetError
from .buckets import Bucket, CropPlan, bucket_for, buckets_for_options, plan_for
from .captions import captions_are_static, process_caption
from .images import load_rgb_with_size
from .options import DatasetOptions
from .sources import DatasetScan, ImageRecord, scan_dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetItem:
    """One entry of the epoch: an image (repeated images appear once per repeat) and its bucket."""

    record: ImageRecord
    bucket: Bucket


@dataclass
class Sample:
    """One loaded training sample.

    Args:
        pixels: [3, H, W] float32 in [-1, 1], H×W = the bucket.
        caption: the processed caption (trigger word, dropout, shuffle applied).
        size: SDXL micro-conditioning: original (h, w), crop top-left (top, left) in the resized image, target (H, W).
        path: the image file.
        bucket: (width, height).
        flipped: whether the image was mirrored (flip_aug).
    """

    pixels: torch.Tensor
    caption: str
    size: SizeInfo
    path: Path
    bucket: Bucket
    flipped: bool = False


class TrainDataset:
    """The training set of one run. Raises `DatasetError` when the scan has a fatal problem or no usable image."""

    def __init__(self, scan: DatasetScan, options: DatasetOptions, seed: int = 0) -> None:
        scan.raise_for_fatal()
        if not scan.records:
            raise DatasetError(f"no usable images in {scan.root}", path=scan.root)
        for problem in scan.warnings:
            log.warning("dataset: %s", problem)
        self.scan = scan
        self.options = options
        self.seed = int(seed)
        self._buckets = buckets_for_options(options)
        self.items: list[DatasetItem] = []
        for record in scan.records:
            item = DatasetItem(record, bucket_for(record.width, record.height, options, self._buckets))
            self.items.extend([item] * record.repeats)

    @classmethod
    def from_options(cls, options: DatasetOptions, seed: int = 0) -> TrainDataset:
        """Scan `options.train_data_dir` and build the dataset."""
        return cls(scan_dataset(options), options, seed)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def records(self) -> list[ImageRecord]:
        return self.scan.records

    @property
    def captions_are_static(self) -> bool:
        """True when no caption dropout/shuffle/tag dropout is on: text conditioning can be computed once and cached."""
        return captions_are_static(self.options)

    def bucket_counts(self, *, repeats: bool = True) -> dict[Bucket, int]:
        """{bucket: samples per epoch} (or distinct images with `repeats=False`)."""
        if repeats:
            return dict(Counter(item.bucket for item in self.items))
        return dict(Counter(bucket_for(r.width, r.height, self.options, self._buckets) for r in self.records))

    def epoch_batches(self, epoch: int, batch_size: int) -> list[list[int]]:
        """Indices into `items`, in batches, for one epoch.

        A batch never mixes buckets (its tensors must stack); every item appears exactly once, the last batch of a
        bucket may be smaller. The order depends only on (seed, epoch).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size = {batch_size!r} is not allowed; expected an integer ≥ 1", key="batch_size",
                              value=batch_size, allowed="an integer ≥ 1")
        rng = random.Random(f"loraloop-batches:{self.seed}:{epoch}")
        by_bucket: dict[Bucket, list[int]] = {}
        for index, item in enumerate(self.items):
            by_bucket.setdefault(item.bucket, []).append(index)
        batches: list[list[int]] = []
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket]
            rng.shuffle(indices)
            batches.extend(indices[i : i + batch_size] for i in range(0, len(indices), batch_size))
        rng.shuffle(batches)
        return batches

    def sample_rng(self, epoch: int, index: int) -> random.Random:
        """The canonical rng for sample `index` in `epoch`: the same on every run and every resume."""
        return random.Random(f"loraloop-sample:{self.seed}:{epoch}:{index}")

    def crop_plan(self, index: int, rng: random.Random | None = None) -> CropPlan:
        """Resize and crop plan of item `index` (draws from `rng` only for random crops)."""
        record = self.items[index].record
        return plan_for(record.width, record.height, self.options, self._buckets, rng)

    def load_pixels(self, index: int, plan: CropPlan, *, flip: bool = False) -> tuple[torch.Tensor, SizeInfo]:
        """Pixels [3, H, W] in [-1, 1] of item `index` cut by `plan`, and the matching SDXL size conditioning."""
        record = self.items[index].record
        image, upright = load_rgb_with_size(record.path, self.options, min_size=plan.resized)
        if upright != (record.width, record.height):
            raise DatasetError(
                f"{record.path}: the image changed since the dataset was scanned (was {record.width}x{record.height}, "
                f"now {upright[0]}x{upright[1]}); scan the dataset again", path=record.path)
        if image.size != plan.resized:
            image = image.resize(plan.resized, Image.Resampling.LANCZOS)
        image = image.crop(plan.box)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        size = SizeInfo(original=(record.height, record.width), crop_top_left=plan.crop_top_left,
                        target=(plan.bucket[1], plan.bucket[0]))
        return pixels, size

    def load_sample(self, index: int, rng: random.Random) -> Sample:
        """Load item `index`. Draws from `rng` in a fixed order: crop (random crop only), flip, caption."""
        item = self.items[index]
        plan = self.crop_plan(index, rng)
        flip = self.options.flip_aug and rng.random() < 0.5
        pixels, size = self.load_pixels(index, plan, flip=flip)
        caption = process_caption(item.record.caption, self.options, rng)
        return Sample(pixels, caption, size, item.record.path, item.bucket, flip)
