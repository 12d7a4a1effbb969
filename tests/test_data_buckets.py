"""Aspect-ratio buckets: kohya's bucket sets, assignment, no-upscale buckets, crop plans, the bucket table."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loraloop.trainer.data.buckets import (
    assign_bucket,
    bucket_for,
    buckets_for_options,
    format_bucket_table,
    make_buckets,
    no_upscale_bucket,
    plan_crop,
    plan_for,
)
from loraloop.trainer.data.options import DatasetOptions

# Worked by hand from the rule (docs/lora-format.md §5): max_area = 512² = 262144; for width w = 256..1024 step 64,
# h = min(1024, ⌊262144 / w / 64⌋·64): 256→1024, 320→768, 384→640, 448→576, 512→512, 576→448, 640→384, 704→320,
# 768→320, 832→256, 896→256, 960→256, 1024→256.
KOHYA_512 = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
             (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
             (1024, 256)]


def test_kohya_buckets_for_512() -> None:
    assert make_buckets(512, 256, 1024, 64) == KOHYA_512


def test_kohya_buckets_for_1024() -> None:
    buckets = make_buckets(1024, 256, 2048, 64)
    # 1048576 / 832 = 1260.3 → 1216; /896 = 1170.3 → 1152; /960 = 1092.3 → 1088; /768 = 1365.3 → 1344; /640 → 1600
    for bucket in [(1024, 1024), (832, 1216), (1216, 832), (896, 1152), (1152, 896), (960, 1088), (768, 1344),
                   (640, 1600), (512, 2048), (256, 2048), (2048, 256)]:
        assert bucket in buckets
    assert (1024, 960) not in buckets
    assert len(buckets) == 41
    # SDXL's usual range (max 1024) keeps only buckets up to 1024 wide or high.
    assert max(max(b) for b in make_buckets(1024, 256, 1024, 64)) == 1024


def test_assignment_examples() -> None:
    assert assign_bucket(1000, 1000, KOHYA_512) == (512, 512)
    # 16:9 = 1.778; 640/384 = 1.667 (error .111), 704/320 = 2.2 (error .422)
    assert assign_bucket(1920, 1080, KOHYA_512) == (640, 384)
    assert assign_bucket(600, 800, KOHYA_512) == (448, 576)  # 0.75 vs 0.778 (error .028) or 0.6 (error .15)


def test_disabled_buckets_and_no_upscale_via_options(tmp_path: Path) -> None:
    flat = DatasetOptions(train_data_dir=tmp_path, resolution=512, enable_bucket=False)
    assert buckets_for_options(flat) == [(512, 512)]
    assert bucket_for(1920, 1080, flat, buckets_for_options(flat)) == (512, 512)
    no_up = DatasetOptions(train_data_dir=tmp_path, resolution=512, bucket_no_upscale=True)
    assert bucket_for(300, 700, no_up, []) == (256, 640)
    plan = plan_for(300, 700, no_up, [])
    assert plan.resized == (300, 700) and plan.box == (22, 30, 278, 670)  # only cropped, never resized
    big = plan_for(2000, 1000, no_up, [])
    assert big.bucket[0] * big.bucket[1] <= 512 * 512 and big.resized[0] < 2000


def test_no_upscale_bucket_examples() -> None:
    assert no_upscale_bucket(300, 700, 512 * 512, 64) == (256, 640)
    # 2000x1000 shrunk to area 262144 is 724.1 x 362.0. Rounding the width first: 704, then 704/2 = 352 → 320,
    # aspect 2.2. Rounding the height first: 320, then 320·2 = 640, aspect 2.0 exactly: that one wins.
    assert no_upscale_bucket(2000, 1000, 512 * 512, 64) == (640, 320)
    assert no_upscale_bucket(512, 512, 512 * 512, 64) == (512, 512)


def test_crop_plan_center_and_random() -> None:
    plan = plan_crop(1000, 500, (640, 384), crop="center")
    # wider than the bucket: the height fits (scale 384/500 = 0.768), width 768 → 128 px to crop, 64 each side
    assert plan.resized == (768, 384) and plan.box == (64, 0, 704, 384) and plan.crop_top_left == (0, 64)
    rng_a, rng_b = random.Random(5), random.Random(5)
    first = plan_crop(1000, 500, (640, 384), crop="random", rng=rng_a)
    assert first == plan_crop(1000, 500, (640, 384), crop="random", rng=rng_b)
    boxes = {plan_crop(1000, 500, (640, 384), crop="random", rng=rng_a).box for _ in range(50)}
    assert len(boxes) > 5 and all(0 <= b[0] <= 128 and b[2] - b[0] == 640 and b[1] == 0 for b in boxes)
    with pytest.raises(ValueError, match="rng"):
        plan_crop(1000, 500, (640, 384), crop="random")


def test_bucket_table() -> None:
    table = format_bucket_table({(512, 512): 10, (640, 384): 3})
    lines = table.splitlines()
    assert lines[0].split() == ["bucket", "aspect", "images"]
    assert lines[1].split() == ["512x512", "1.00", "10"]
    assert lines[2].split() == ["640x384", "1.67", "3"]
    assert lines[3].split() == ["total", "13"]


steps = st.sampled_from([32, 64])


@st.composite
def bucket_settings(draw: st.DrawFn) -> tuple[int, int, int, int]:
    step = draw(steps)
    resolution = draw(st.integers(4, 32)) * step
    min_reso = draw(st.integers(1, resolution // step)) * step
    max_reso = draw(st.integers(resolution // step, 48)) * step
    return resolution, min_reso, max_reso, step


@settings(max_examples=150, deadline=None)
@given(bucket_settings())
def test_bucket_set_properties(params: tuple[int, int, int, int]) -> None:
    resolution, min_reso, max_reso, step = params
    buckets = make_buckets(resolution, min_reso, max_reso, step)
    assert (resolution, resolution) in buckets  # the square
    for w, h in buckets:
        assert w * h <= resolution * resolution
        assert w % step == 0 and h % step == 0
        assert min_reso <= w <= max_reso and min_reso <= h <= max_reso
        assert (h, w) in buckets  # symmetric


@settings(max_examples=200, deadline=None)
@given(bucket_settings(), st.integers(1, 10000), st.integers(1, 10000))
def test_assigned_bucket_minimises_aspect_error(params: tuple[int, int, int, int], width: int, height: int) -> None:
    buckets = make_buckets(*params)
    chosen = assign_bucket(width, height, buckets)
    error = abs(chosen[0] / chosen[1] - width / height)
    assert all(error <= abs(w / h - width / height) for w, h in buckets)
    plan = plan_crop(width, height, chosen)
    assert plan.resized[0] >= chosen[0] and plan.resized[1] >= chosen[1]
    assert plan.box[2] - plan.box[0] == chosen[0] and plan.box[3] - plan.box[1] == chosen[1]
    assert plan.box[2] <= plan.resized[0] and plan.box[3] <= plan.resized[1]
    # cover: one side fits (up to rounding), the other overflows
    assert min(plan.resized[0] - chosen[0], plan.resized[1] - chosen[1]) <= 1


@settings(max_examples=200, deadline=None)
@given(st.integers(64, 8000), st.integers(64, 8000), st.sampled_from([256, 512, 768, 1024]))
def test_no_upscale_never_upscales(width: int, height: int, resolution: int) -> None:
    bucket = no_upscale_bucket(width, height, resolution * resolution, 64)
    assert bucket[0] % 64 == 0 and bucket[1] % 64 == 0
    assert bucket[0] <= width and bucket[1] <= height
    # within one step of the max area (rounding to the nearest pixel may add a fraction of a row)
    assert bucket[0] * bucket[1] <= resolution * resolution + 64 * max(bucket)
