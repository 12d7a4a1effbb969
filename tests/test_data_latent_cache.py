"""LatentCache: hits, misses, invalidation on edited files, disk entries, flip_aug, refusal of random crops."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from loraloop.trainer.data.dataset import TrainDataset
from loraloop.trainer.data.latent_cache import LatentCache
from loraloop.trainer.data.options import DatasetOptions
from loraloop.trainer.errors import ConfigError


class CountingEncoder:
    """A stand-in VAE: 8x average pooling plus one extra channel; counts the images it encodes."""

    def __init__(self) -> None:
        self.calls = 0
        self.images = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images += pixels.shape[0]
        pooled = F.avg_pool2d(pixels, 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)


def opts(root: Path, **kw: object) -> DatasetOptions:
    base = {"resolution": 128, "min_bucket_reso": 64, "max_bucket_reso": 256, "missing_caption": "trigger",
            "trigger_word": "sks"}
    base.update(kw)
    return DatasetOptions(train_data_dir=root, **base)  # type: ignore[arg-type]


def noise(path: Path, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    (data / "2_x").mkdir(parents=True)
    noise(data / "a.png", (128, 128), 0)
    noise(data / "b.png", (192, 64), 1)
    noise(data / "2_x" / "c.png", (128, 128), 2)
    return data


def test_memory_cache_hits(root: Path) -> None:
    ds = TrainDataset.from_options(opts(root))
    encoder = CountingEncoder()
    cache = LatentCache(encoder, encoder_id="fake-vae", options=ds.options)
    first = cache.get(ds, 0)
    assert encoder.calls == 1 and first.latents.shape == (4, 16, 16)
    again = cache.get(ds, 0)
    assert encoder.calls == 1 and again is first and cache.hits == 1
    pixels, _ = ds.load_pixels(0, ds.crop_plan(0))
    assert torch.allclose(first.latents, encoder(pixels[None])[0])
    assert first.size.original == (128, 128)


def test_prepare_batches_by_bucket_and_dedupes_repeats(root: Path, tmp_path: Path) -> None:
    ds = TrainDataset.from_options(opts(root))
    assert len(ds) == 4  # c.png twice
    encoder = CountingEncoder()
    cache = LatentCache(encoder, encoder_id="fake-vae", options=ds.options, cache_dir=tmp_path / "cache")
    progress: list[tuple[int, int]] = []
    cache.prepare(ds, batch_size=8, progress=lambda done, total: progress.append((done, total)))
    assert encoder.images == 3 and encoder.calls == 2  # two buckets, three distinct images
    assert progress[-1] == (3, 3)
    for i in range(len(ds)):
        cache.get(ds, i)
    assert encoder.images == 3
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3
    assert not list((tmp_path / "cache").glob("*.tmp"))  # atomic writes leave nothing behind


def test_disk_cache_survives_and_edit_invalidates(root: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    ds = TrainDataset.from_options(opts(root))
    first = CountingEncoder()
    LatentCache(first, encoder_id="fake-vae", options=ds.options, cache_dir=cache_dir).prepare(ds)
    assert first.images == 3

    later = CountingEncoder()  # a new run: memory is empty, disk has the entries
    cache = LatentCache(later, encoder_id="fake-vae", options=ds.options, cache_dir=cache_dir)
    index = next(i for i, item in enumerate(ds.items) if item.record.path.name == "a.png")
    before = cache.get(ds, index).latents
    assert later.images == 0 and cache.disk_hits == 1

    noise(root / "a.png", (128, 128), 99)  # same size and name, new content
    ds2 = TrainDataset.from_options(opts(root))
    edited = cache.get(ds2, index)
    assert later.images == 1
    assert not torch.allclose(before, edited.latents)
    other = CountingEncoder()
    LatentCache(other, encoder_id="fake-vae-2", options=ds.options, cache_dir=cache_dir).get(ds2, index)
    assert other.images == 1  # another encoder id is another key


def test_flip_aug_caches_both(root: Path) -> None:
    ds = TrainDataset.from_options(opts(root, flip_aug=True))
    encoder = CountingEncoder()
    entry = LatentCache(encoder, encoder_id="fake", options=ds.options).get(ds, 0)
    pixels, _ = ds.load_pixels(0, ds.crop_plan(0))
    assert entry.latents_flipped is not None
    assert torch.allclose(entry.latents_flipped, encoder(pixels.flip(-1)[None])[0])
    picks = {entry.select(random.Random(s))[1] for s in range(10)}
    assert picks == {True, False}


def test_random_crop_refused(root: Path) -> None:
    with pytest.raises(ConfigError) as err:
        LatentCache(CountingEncoder(), encoder_id="x", options=opts(root, crop="random"))
    assert err.value.key == "crop" and "random" in str(err.value)


def test_corrupt_disk_entry_is_reencoded(root: Path, tmp_path: Path) -> None:
    ds = TrainDataset.from_options(opts(root))
    cache_dir = tmp_path / "cache"
    cache = LatentCache(CountingEncoder(), encoder_id="e", options=ds.options, cache_dir=cache_dir)
    cache.get(ds, 0)
    (cache_dir / f"{cache.key(ds, 0)}.safetensors").write_bytes(b"garbage")
    encoder = CountingEncoder()
    LatentCache(encoder, encoder_id="e", options=ds.options, cache_dir=cache_dir).get(ds, 0)
    assert encoder.images == 1


class TestPrepareCancel:
    def test_cancel_stops_within_one_image_and_keeps_what_was_encoded(self, root: Path, tmp_path: Path) -> None:
        """Cancel after the first image: prepare raises TrainingInterrupted before encoding a second one; the first
        image's entry stays on disk, so a restarted run does not encode it again."""
        from loraloop.trainer.errors import TrainingInterrupted

        ds = TrainDataset.from_options(opts(root))
        encoder = CountingEncoder()
        cache = LatentCache(encoder, encoder_id="fake-vae", options=ds.options, cache_dir=tmp_path / "cache")
        with pytest.raises(TrainingInterrupted, match=r"cancelled while caching latents \(1 of 3 images encoded"):
            cache.prepare(ds, batch_size=1, should_stop=lambda: encoder.images >= 1)
        assert encoder.images == 1
        assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1

        again = CountingEncoder()
        LatentCache(again, encoder_id="fake-vae", options=ds.options, cache_dir=tmp_path / "cache").prepare(ds)
        assert again.images == 2  # only the two images the cancelled run never reached

    def test_cancel_inside_a_batch_is_seen_before_the_next_image(self, root: Path) -> None:
        """With a batch of several images, the stop request is asked before each image is loaded, not per batch."""
        from loraloop.trainer.errors import TrainingInterrupted

        ds = TrainDataset.from_options(opts(root))
        asked = []

        def should_stop() -> bool:
            asked.append(1)
            return len(asked) >= 2  # the user cancels while the first image of a batch is being loaded

        encoder = CountingEncoder()
        with pytest.raises(TrainingInterrupted):
            LatentCache(encoder, encoder_id="fake-vae", options=ds.options).prepare(ds, batch_size=8,
                                                                                   should_stop=should_stop)
        assert encoder.images == 0 and len(asked) == 2
