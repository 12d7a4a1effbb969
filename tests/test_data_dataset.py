"""TrainDataset: repeats, bucketed deterministic batches, loaded samples and their size conditioning."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from loraloop.trainer.data.dataset import TrainDataset
from loraloop.trainer.data.options import DatasetOptions
from loraloop.trainer.data.sources import scan_dataset
from loraloop.trainer.errors import ConfigError, DatasetError


def opts(root: Path, **kw: object) -> DatasetOptions:
    base = {"resolution": 128, "min_bucket_reso": 64, "max_bucket_reso": 256, "bucket_reso_steps": 64}
    base.update(kw)
    return DatasetOptions(train_data_dir=root, **base)  # type: ignore[arg-type]


def make_folder(root: Path) -> None:
    sizes = {"sq": (128, 128), "wide": (250, 80), "tall": (80, 250)}
    for i in range(5):
        for kind, size in sizes.items():
            image = Image.new("RGB", size, (40 * i, 100, 200))
            image.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))  # left half red: shows flips
            folder = root / ("3_char" if kind == "sq" else "")
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{kind}{i}.png")
            (folder / f"{kind}{i}.txt").write_text(f"{kind}, number {i}, extra tag")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    make_folder(tmp_path)
    return tmp_path


def test_repeats_and_buckets(root: Path) -> None:
    ds = TrainDataset.from_options(opts(root), seed=1)
    assert len(ds) == 5 * 3 + 10
    assert ds.bucket_counts() == {(128, 128): 15, (192, 64): 5, (64, 192): 5}
    assert ds.bucket_counts(repeats=False) == {(128, 128): 5, (192, 64): 5, (64, 192): 5}
    assert ds.captions_are_static
    assert not TrainDataset.from_options(opts(root, shuffle_caption=True)).captions_are_static


def test_epoch_batches_deterministic_and_bucket_pure(root: Path) -> None:
    ds = TrainDataset.from_options(opts(root), seed=1)
    epoch0 = ds.epoch_batches(0, 4)
    assert epoch0 == TrainDataset.from_options(opts(root), seed=1).epoch_batches(0, 4)  # resume gives the same order
    assert epoch0 != ds.epoch_batches(1, 4)
    assert epoch0 != TrainDataset.from_options(opts(root), seed=2).epoch_batches(0, 4)
    flat = sorted(i for batch in epoch0 for i in batch)
    assert flat == list(range(len(ds)))  # nothing dropped, nothing twice
    for batch in epoch0:
        assert len({ds.items[i].bucket for i in batch}) == 1
    sizes = sorted(len(b) for b in epoch0)
    assert sizes == [1, 1, 3, 4, 4, 4, 4, 4]  # 15 → 4+4+4+3, 5 → 4+1, 5 → 4+1
    with pytest.raises(ConfigError):
        ds.epoch_batches(0, 0)


def test_load_sample_pixels_size_and_caption(root: Path) -> None:
    ds = TrainDataset.from_options(opts(root, trigger_word="sks"), seed=0)
    index = next(i for i, item in enumerate(ds.items) if item.record.path.name == "wide0.png")
    sample = ds.load_sample(index, ds.sample_rng(0, index))
    assert sample.pixels.shape == (3, 64, 192) and sample.pixels.dtype == torch.float32
    assert sample.pixels.min() >= -1.0 and sample.pixels.max() <= 1.0
    assert sample.caption == "sks, wide, number 0, extra tag"
    # 250x80 (aspect 3.125) → bucket 192x64 (aspect 3; 256x64 would be 4). Cover: scale = max(192/250, 64/80) = 0.8
    # → 200x64, so 8 columns are cropped, 4 on the left.
    assert sample.size.original == (80, 250)
    assert sample.size.crop_top_left == (0, 4)
    assert sample.size.target == (64, 192)
    assert sample.pixels[0, 32, 10] > 0.9 and sample.pixels[2, 32, 10] < -0.9  # red on the left
    assert sample.path.name == "wide0.png" and not sample.flipped


def test_flip_and_random_crop_are_seeded(root: Path) -> None:
    ds = TrainDataset.from_options(opts(root, flip_aug=True, crop="random", shuffle_caption=True), seed=3)
    index = next(i for i, item in enumerate(ds.items) if item.record.path.name == "wide1.png")
    a = ds.load_sample(index, ds.sample_rng(5, index))
    b = ds.load_sample(index, ds.sample_rng(5, index))
    assert torch.equal(a.pixels, b.pixels) and a.caption == b.caption and a.size == b.size
    flips = [ds.load_sample(index, random.Random(s)) for s in range(12)]
    assert {s.flipped for s in flips} == {True, False}
    for s in flips:
        left_red = s.pixels[0, 32, 5] > 0.9 and s.pixels[2, 32, 5] < -0.9
        assert left_red != s.flipped


def test_fatal_scan_refused(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"\xff")
    Image.new("RGB", (128, 128)).save(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="UTF-8"):
        TrainDataset(scan_dataset(opts(tmp_path)), opts(tmp_path))


def test_changed_image_detected(root: Path) -> None:
    ds = TrainDataset.from_options(opts(root), seed=0)
    index = next(i for i, item in enumerate(ds.items) if item.record.path.name == "tall2.png")
    Image.new("RGB", (100, 100)).save(ds.items[index].record.path)
    with pytest.raises(DatasetError, match="changed since the dataset was scanned"):
        ds.load_sample(index, random.Random(0))
