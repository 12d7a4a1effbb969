"""Turns the dataset into the loop's micro-batches: cached or live latents, cached or live text conditioning.

A micro-batch is fixed by (seed, epoch, batch index), whatever happens at run time; `chunk_size` only decides how many
of its samples go through the model at once (the memory planner lowers it on OOM without changing the maths).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .bundle import Conditioning, ModelBundle, SizeInfo
from .config import TrainConfig
from .data import DatasetOptions, LatentCache, TrainDataset, process_caption
from .distributed import SINGLE, World

log = logging.getLogger(__name__)

TEXT_CACHE_CHUNK = 16  # captions per text-encoder call while caching: small next to the UNet, far fewer calls


def dataset_options(config: TrainConfig) -> DatasetOptions:
    """The dataset half of a `TrainConfig`."""
    if not config.train_data_dir:
        from .errors import ConfigError

        msg = "`train_data_dir` is not set: point it at a folder of training images"
        raise ConfigError(msg, key="train_data_dir")
    extensions = (config.caption_extension, *(e for e in (".txt", ".caption") if e != config.caption_extension))
    return DatasetOptions(
        train_data_dir=Path(config.train_data_dir),
        metadata_path=Path(config.metadata_path) if config.metadata_path else None, recursive=config.recursive,
        caption_extensions=extensions, trigger_word=config.trigger_word, resolution=config.resolution,
        enable_bucket=config.enable_bucket, min_bucket_reso=config.min_bucket_reso,
        max_bucket_reso=config.max_bucket_reso, bucket_reso_steps=config.bucket_reso_steps,
        crop="random" if config.random_crop else "center", flip_aug=config.flip_aug,
        caption_dropout_rate=config.caption_dropout_rate, shuffle_caption=config.shuffle_caption,
        keep_tokens=config.keep_tokens, caption_tag_dropout_rate=config.caption_tag_dropout_rate)


def caches_text(config: TrainConfig, dataset: TrainDataset) -> bool:
    """Whether text conditioning is encoded once per caption: the config asks for it, the captions never change (no
    shuffle or dropout) and no text encoder is trained (its output would change every step)."""
    return config.cache_text_encoder_outputs and config.can_cache_text(dataset.captions_are_static)


@dataclass
class MicroBatch:
    """This process's samples of one micro-batch. With several processes (`distributed.py`) the micro-batch is global
    and this is the rank's slice: `offset` into it and the `global_count` of samples across all ranks."""

    latents: torch.Tensor  # [B, C, h, w] float32, CPU (B may be 0 on a rank whose slice of a small batch is empty)
    captions: list[str]
    sizes: list[SizeInfo]
    cond: Conditioning | None = None  # cached text conditioning (CPU), when the text encoders are frozen
    global_count: int = 0  # samples of the global micro-batch across all ranks (0: just these)
    offset: int = 0

    @property
    def total(self) -> int:
        """Samples the loss is averaged over: the global micro-batch."""
        return self.global_count or len(self.captions)

    def conditioning(self, bundle: ModelBundle, index: slice) -> Conditioning:
        if self.cond is not None:
            return self.cond[index].to(bundle.device)
        return bundle.encode_text(self.captions[index])


class BatchMaker:
    """Micro-batches for the loop.

    Args:
        bundle: encodes images/captions.
        dataset: the training set.
        config: batch size, caching switches.
        latent_cache: encode-once latents (None: encode every step, needed for random crops).
        cache_text: encode each distinct caption once (see `caches_text` for when that is allowed).
        world: the training processes; each micro-batch holds `batch_size` × world size samples, and this process
            gets its slice (`World.slice`).
    """

    def __init__(self, bundle: ModelBundle, dataset: TrainDataset, config: TrainConfig, *,
                 latent_cache: LatentCache | None, cache_text: bool, world: World = SINGLE) -> None:
        self.bundle = bundle
        self.dataset = dataset
        self.batch_size = config.batch_size
        self.world = world
        self.latent_cache = latent_cache
        self.chunk_size: int | None = None
        self.batches_per_epoch = len(dataset.epoch_batches(0, self.global_batch_size))
        self._order: tuple[int, list[list[int]]] | None = None
        self._text: dict[str, Conditioning] = {}
        self._latents: dict[int, object] = {}  # index → CachedLatent: skip re-hashing keys on every step
        if cache_text:
            self.cache_text_outputs()

    @property
    def text_cached(self) -> bool:
        """True once the text conditioning of every caption is cached (the text encoders are then idle)."""
        return bool(self._text)

    def cache_text_outputs(self) -> None:
        """Encode every distinct caption once; later micro-batches take their conditioning from the cache."""
        import random

        captions = sorted({process_caption(item.record.caption, self.dataset.options, random.Random(0))
                           for item in self.dataset.items})
        with torch.no_grad():
            for start in range(0, len(captions), TEXT_CACHE_CHUNK):
                chunk = captions[start : start + TEXT_CACHE_CHUNK]
                cond = self.bundle.encode_text(chunk).detach().to("cpu")
                for i, caption in enumerate(chunk):
                    self._text[caption] = cond[i : i + 1]
        log.info("cached text conditioning of %d distinct captions", len(captions))

    @property
    def global_batch_size(self) -> int:
        """Samples per micro-batch over all processes."""
        return self.batch_size * self.world.size

    def _batches(self, epoch: int) -> list[list[int]]:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self.dataset.epoch_batches(epoch, self.global_batch_size))
        return self._order[1]

    def indices(self, epoch: int, batch_index: int) -> list[int]:
        """Dataset indices of the global micro-batch (every rank's samples)."""
        return self._batches(epoch)[batch_index]

    def micro_batch(self, epoch: int, batch_index: int) -> MicroBatch:
        everyone = self.indices(epoch, batch_index)
        offset, count = self.world.slice(len(everyone))
        indices = everyone[offset : offset + count]
        if not indices:
            return MicroBatch(torch.empty(0), [], [], None, len(everyone), offset)
        latents, captions, sizes = [], [], []
        pixels = []
        for index in indices:
            rng = self.dataset.sample_rng(epoch, index)
            if self.latent_cache is not None:
                cached = self._latents.get(index)
                if cached is None:
                    cached = self._latents[index] = self.latent_cache.get(self.dataset, index)
                latent, _ = cached.select(rng)  # same rng draws as load_sample: flip, then caption
                latents.append(latent)
                sizes.append(cached.size)
                captions.append(process_caption(self.dataset.items[index].record.caption, self.dataset.options, rng))
            else:
                sample = self.dataset.load_sample(index, rng)
                pixels.append(sample.pixels)
                sizes.append(sample.size)
                captions.append(sample.caption)
        if pixels:
            stacked = self.bundle.encode_images(torch.stack(pixels).to(self.bundle.device)).cpu()
        else:
            stacked = torch.stack(latents).float()
        cond = Conditioning.cat([self._text[c] for c in captions]) if self._text else None
        return MicroBatch(stacked, captions, sizes, cond, len(everyone), offset)
