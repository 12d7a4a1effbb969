"""Aspect-ratio buckets, built and assigned by kohya sd-scripts' rules so a dataset lands in the same buckets as there.

Rules (docs/lora-format.md §5, "Aspect-ratio buckets"):
* max_area = resolution². The square bucket (⌊√max_area / step⌋·step)² is always present. Then for every width from
  min to max in `step`s, height = min(max, ⌊max_area / width / step⌋·step); when height ≥ min, both (w, h) and (h, w)
  are buckets.
* An image goes to the bucket whose aspect ratio (w/h) is nearest to its own; on a tie, the first in sorted order.
* It is scaled to *cover* the bucket (the tighter side fits exactly) and the overflow is cropped, centred or at random.
* `bucket_no_upscale`: the bucket is the image's own size, first shrunk to max_area if larger, rounded down to the
  step; of "round the width" and "round the height" the one with the smaller aspect error wins. Images that fit are
  cropped, never resized.

A bucket is a `(width, height)` tuple in pixels throughout.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .options import DatasetOptions

Bucket = tuple[int, int]


@dataclass(frozen=True)
class CropPlan:
    """How one image becomes a bucket-sized training image.

    Args:
        original: the image's (width, height) after EXIF orientation.
        resized: (width, height) to resize to; covers `bucket`.
        box: (left, top, right, bottom) cut out of the resized image; its size is `bucket`.
        bucket: (width, height) of the result.
    """

    original: tuple[int, int]
    resized: tuple[int, int]
    box: tuple[int, int, int, int]
    bucket: Bucket

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """(top, left), as SDXL's crop conditioning wants it."""
        return self.box[1], self.box[0]


def make_buckets(resolution: int, min_reso: int = 256, max_reso: int = 1024, step: int = 64) -> list[Bucket]:
    """kohya's bucket set for a square `resolution`, sorted by (width, height)."""
    max_area = resolution * resolution
    side = math.isqrt(max_area) // step * step
    found = {(side, side)}
    for width in range(min_reso, max_reso + 1, step):
        # Integer floor division equals floor(max_area / width / step) for positive integers, without float error.
        height = min(max_reso, max_area // width // step * step)
        if height >= min_reso:
            found.add((width, height))
            found.add((height, width))
    return sorted(found)


def assign_bucket(width: int, height: int, buckets: Iterable[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest to `width/height` (first one in sorted order on ties)."""
    aspect = width / height
    best: Bucket | None = None
    best_error = math.inf
    for bucket in sorted(buckets):
        error = abs(bucket[0] / bucket[1] - aspect)
        if error < best_error:
            best, best_error = bucket, error
    if best is None:
        raise ValueError("assign_bucket needs at least one bucket")
    return best


def no_upscale_bucket(width: int, height: int, max_area: int, step: int = 64) -> Bucket:
    """`bucket_no_upscale`: the image's own size, shrunk to `max_area` when larger, rounded down to `step`."""

    def down(x: float) -> int:
        # Round to a whole pixel first (a side of 511.9999 is 512), then down to the step; never below one step.
        pixels = int(x + 0.5)
        return max(step, pixels - pixels % step)

    if width * height <= max_area:
        return down(width), down(height)
    aspect = width / height
    scaled_w = math.sqrt(max_area * aspect)
    scaled_h = max_area / scaled_w
    by_width = (down(scaled_w), down(down(scaled_w) / aspect))
    by_height = (down(down(scaled_h) * aspect), down(scaled_h))
    error_w = abs(by_width[0] / by_width[1] - aspect)
    error_h = abs(by_height[0] / by_height[1] - aspect)
    return by_width if error_w < error_h else by_height


def bucket_for(width: int, height: int, options: DatasetOptions, buckets: Iterable[Bucket]) -> Bucket:
    """The bucket `options` put an image of this (oriented) size in; `buckets` comes from `buckets_for_options`."""
    if not options.enable_bucket:
        return options.resolution, options.resolution
    if options.bucket_no_upscale:
        return no_upscale_bucket(width, height, options.max_area, options.bucket_reso_steps)
    return assign_bucket(width, height, buckets)


def buckets_for_options(options: DatasetOptions) -> list[Bucket]:
    """The predefined buckets for `options` (empty with `bucket_no_upscale`, whose buckets are per image)."""
    if not options.enable_bucket:
        return [(options.resolution, options.resolution)]
    if options.bucket_no_upscale:
        return []
    return make_buckets(options.resolution, options.min_bucket_reso, options.max_bucket_reso, options.bucket_reso_steps)


def plan_crop(width: int, height: int, bucket: Bucket, *, crop: str = "center", rng: random.Random | None = None,
              resize: bool = True) -> CropPlan:
    """Resize-to-cover then crop: the plan that turns a `width`×`height` image into `bucket`.

    `resize=False` keeps the image at its size and only crops (bucket_no_upscale for images within max_area); the
    image must then already cover the bucket. A random crop needs `rng`, and draws from it exactly twice.
    """
    bucket_w, bucket_h = bucket
    if resize:
        scale = max(bucket_w / width, bucket_h / height)
        # Rounding can leave the overflowing side one pixel short of the bucket; clamp so the crop always fits.
        resized = (max(bucket_w, int(width * scale + 0.5)), max(bucket_h, int(height * scale + 0.5)))
    else:
        if width < bucket_w or height < bucket_h:
            raise ValueError(f"image {width}x{height} does not cover bucket {bucket_w}x{bucket_h}")
        resized = (width, height)
    spare_w, spare_h = resized[0] - bucket_w, resized[1] - bucket_h
    if crop == "random":
        if rng is None:
            raise ValueError("a random crop needs an rng")
        left, top = rng.randint(0, spare_w), rng.randint(0, spare_h)
    elif crop == "center":
        left, top = spare_w // 2, spare_h // 2
    else:
        raise ValueError(f"unknown crop mode {crop!r}; expected 'center' or 'random'")
    return CropPlan((width, height), resized, (left, top, left + bucket_w, top + bucket_h), bucket)


def plan_for(width: int, height: int, options: DatasetOptions, buckets: Iterable[Bucket],
             rng: random.Random | None = None) -> CropPlan:
    """Bucket and crop plan for an image of this (oriented) size under `options`."""
    bucket = bucket_for(width, height, options, buckets)
    keep_size = options.enable_bucket and options.bucket_no_upscale and width * height <= options.max_area
    return plan_crop(width, height, bucket, crop=options.crop, rng=rng, resize=not keep_size)


def format_bucket_table(counts: Mapping[Bucket, int]) -> str:
    """A printable table: one line per bucket (size, aspect ratio, image count) and a total."""
    rows = [(f"{w}x{h}", f"{w / h:.2f}", str(n)) for (w, h), n in sorted(counts.items())]
    total = str(sum(counts.values()))
    size_w = max([len("bucket"), *(len(r[0]) for r in rows)])
    count_w = max([len("images"), len(total), *(len(r[2]) for r in rows)])
    lines = [f"{'bucket':<{size_w}}  aspect  {'images':>{count_w}}"]
    lines += [f"{size:<{size_w}}  {aspect:>6}  {n:>{count_w}}" for size, aspect, n in rows]
    lines.append(f"{'total':<{size_w}}  {'':>6}  {total:>{count_w}}")
    return "\n".join(lines)
