"""`LatentCache`: encode each training image once, keep the latents in memory and optionally on disk.

A cache entry is keyed by the sha256 of the image file's bytes plus every setting that changes the pixels the encoder
sees (bucket, resize, crop box, flip_aug, compositing background, pre-shrinking) and an encoder id string the caller
chooses (model family + VAE hash, say). An edited image, or the same image under other settings or another VAE, is
therefore a miss and is encoded again; stale entries are never served.

Like kohya (docs/lora-format.md §5, "Latent caching"): random crops cannot be cached (each epoch would need other
pixels), so the cache refuses `crop = "random"`; flip_aug is supported by caching the mirrored image's latents too.

Disk entries are safetensors files `<key>.safetensors` with tensors `latents` and optionally `latents_flipped`,
written to a temporary file and moved into place with `os.replace`, so a crash never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..bundle import SizeInfo
from ..errors import ConfigError, TrainingInterrupted
from .dataset import TrainDataset
from .images import file_sha256
from .options import DatasetOptions

log = logging.getLogger(__name__)

_FORMAT_VERSION = 1

Encoder = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class CachedLatent:
    """Latents of one image [C, h, w] (and of its mirror image with flip_aug), plus its SDXL size conditioning."""

    latents: torch.Tensor
    latents_flipped: torch.Tensor | None
    size: SizeInfo

    def select(self, rng: random.Random) -> tuple[torch.Tensor, bool]:
        """(latents, flipped): with a flipped copy, one draw from `rng` picks it half the time (as `load_sample`)."""
        if self.latents_flipped is not None and rng.random() < 0.5:
            return self.latents_flipped, True
        return self.latents, False


class LatentCache:
    """Encode-once cache of image latents.

    Args:
        encode: pixels [B, 3, H, W] in [-1, 1] → latents [B, C, H/8, W/8] (e.g. `bundle.encode_images`).
        encoder_id: names the encoder and its settings; part of every key.
        options: the dataset options; `crop` must be "center".
        cache_dir: folder for disk entries (created when missing); None keeps latents in memory only.
    """

    def __init__(self, encode: Encoder, *, encoder_id: str, options: DatasetOptions, cache_dir: Path | None = None
                 ) -> None:
        if options.crop == "random":
            raise ConfigError(
                "latents cannot be cached with crop = 'random': every epoch crops other pixels. Use crop = 'center' or "
                "turn latent caching off", key="crop", value=options.crop, allowed="'center' when caching latents")
        self.encode = encode
        self.encoder_id = encoder_id
        self.options = options
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._memory: dict[str, CachedLatent] = {}
        self._hashes: dict[Path, tuple[tuple[int, int, int], str]] = {}
        self.hits = 0
        self.disk_hits = 0
        self.misses = 0
        self.encoded_images = 0

    def key(self, dataset: TrainDataset, index: int) -> str:
        """The cache key of item `index` (hex sha256)."""
        record = dataset.items[index].record
        plan = dataset.crop_plan(index)
        settings = {
            "version": _FORMAT_VERSION,
            "file_sha256": self._file_hash(record.path),
            "bucket": plan.bucket,
            "resized": plan.resized,
            "crop_box": plan.box,
            "flip_aug": self.options.flip_aug,
            "background": list(self.options.background),
            "prefer_downscale_side": self.options.prefer_downscale_side,
            "encoder": self.encoder_id,
        }
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    def get(self, dataset: TrainDataset, index: int) -> CachedLatent:
        """Latents of item `index`: from memory, else disk, else encoded now (and stored)."""
        key = self.key(dataset, index)
        cached = self._lookup(key, dataset, index)
        if cached is not None:
            return cached
        self._encode_batch(dataset, [(key, index)])
        return self._memory[key]

    def prepare(self, dataset: TrainDataset, batch_size: int = 1,
                progress: Callable[[int, int], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> None:
        """Encode every image of `dataset` not cached yet, `batch_size` images of one bucket at a time.

        `progress(done, total)` is called after each batch. Repeated items share one entry. `should_stop` (a host's
        Cancel, e.g. `ProgressSink.should_stop`) is asked before each image is loaded.

        Raises:
            TrainingInterrupted: `should_stop` returned True; what was encoded so far stays cached (and on disk).
        """
        pending: dict[str, int] = {}
        seen: set[str] = set()
        for index in range(len(dataset)):
            key = self.key(dataset, index)
            if key not in seen:
                seen.add(key)
                if self._lookup(key, dataset, index, count=False) is None:
                    pending[key] = index
        by_bucket: dict[tuple[int, int], list[tuple[str, int]]] = {}
        for key, index in pending.items():
            by_bucket.setdefault(dataset.items[index].bucket, []).append((key, index))
        done, total = 0, len(pending)
        for bucket in sorted(by_bucket):
            group = by_bucket[bucket]
            for start in range(0, len(group), max(1, batch_size)):
                chunk = group[start : start + max(1, batch_size)]
                self._encode_batch(dataset, chunk, partial(_stop_check, should_stop, done, total))
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        log.info("latent cache: %d image(s) encoded, %d already cached", total, len(seen) - total)

    def clear_memory(self) -> None:
        """Forget the in-memory copies (disk entries stay)."""
        self._memory.clear()

    def _lookup(self, key: str, dataset: TrainDataset, index: int, count: bool = True) -> CachedLatent | None:
        cached = self._memory.get(key)
        if cached is not None:
            if count:
                self.hits += 1
            return cached
        cached = self._read_disk(key, dataset, index)
        if cached is not None:
            self._memory[key] = cached
            if count:
                self.disk_hits += 1
        return cached

    def _encode_batch(self, dataset: TrainDataset, chunk: list[tuple[str, int]],
                      check_stop: Callable[[], None] | None = None) -> None:
        pixels, sizes = [], []
        for _key, index in chunk:
            if check_stop is not None:
                check_stop()
            image, size = dataset.load_pixels(index, dataset.crop_plan(index))
            pixels.append(image)
            sizes.append(size)
        batch = torch.stack(pixels)
        flip = self.options.flip_aug
        if flip:
            batch = torch.cat([batch, batch.flip(-1)])
        with torch.no_grad():
            latents = self.encode(batch).detach().to("cpu")
        n = len(chunk)
        if latents.shape[0] != batch.shape[0]:
            raise ValueError(f"encode returned {latents.shape[0]} latents for {batch.shape[0]} images")
        self.misses += n
        self.encoded_images += n
        for i, ((key, _index), size) in enumerate(zip(chunk, sizes, strict=True)):
            entry = CachedLatent(latents[i].clone(), latents[n + i].clone() if flip else None, size)
            self._memory[key] = entry
            self._write_disk(key, entry)

    def _file_hash(self, path: Path) -> str:
        # Re-hash only when size, mtime or inode changed: hashing every file every epoch would cost more than it saves.
        st = Path(path).stat()
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        known = self._hashes.get(path)
        if known is not None and known[0] == stamp:
            return known[1]
        digest = file_sha256(path)
        self._hashes[path] = (stamp, digest)
        return digest

    def _disk_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{key}.safetensors"

    def _read_disk(self, key: str, dataset: TrainDataset, index: int) -> CachedLatent | None:
        path = self._disk_path(key)
        if path is None or not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
            latents = tensors["latents"]
            flipped = tensors.get("latents_flipped")
            if self.options.flip_aug and flipped is None:
                raise KeyError("latents_flipped")
        except Exception as exc:  # any unreadable entry is just a miss: it is re-encoded and rewritten
            log.warning("latent cache: ignoring unreadable entry %s (%s)", path, exc)
            return None
        plan = dataset.crop_plan(index)
        record = dataset.items[index].record
        size = SizeInfo((record.height, record.width), plan.crop_top_left, (plan.bucket[1], plan.bucket[0]))
        return CachedLatent(latents, flipped if self.options.flip_aug else None, size)

    def _write_disk(self, key: str, entry: CachedLatent) -> None:
        path = self._disk_path(key)
        if path is None:
            return
        tensors = {"latents": entry.latents.contiguous()}
        if entry.latents_flipped is not None:
            tensors["latents_flipped"] = entry.latents_flipped.contiguous()
        metadata = {"original_size": json.dumps(entry.size.original),
                    "crop_top_left": json.dumps(entry.size.crop_top_left), "encoder": self.encoder_id}
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            Path(tmp).replace(path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _stop_check(should_stop: Callable[[], bool] | None, done: int, total: int) -> None:
    if should_stop is not None and should_stop():
        msg = f"cancelled while caching latents ({done} of {total} images encoded; they stay cached)"
        raise TrainingInterrupted(msg, step=0)
