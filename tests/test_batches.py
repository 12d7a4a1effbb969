"""BatchMaker and `cache_text_encoder_outputs`: text is encoded once per caption, or every step when caching is off."""

from __future__ import annotations

import pytest
import torch

from loraloop.trainer.batches import caches_text, dataset_options
from loraloop.trainer.config import TrainConfig
from loraloop.trainer.data import TrainDataset
from loraloop.trainer.loop import train
from loraloop.trainer.progress import NullSink
from loraloop.trainer.runner import prepare_batches


class TextCountingBundle:
    """The real bundle, with every caption that reaches the text encoder recorded."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.encoded: list[str] = []

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def encode_text(self, captions):
        self.encoded += list(captions)
        return self._inner.encode_text(captions)


def config_for(dataset_dir, **kw) -> TrainConfig:
    base = dict(train_data_dir=str(dataset_dir), metadata_path=str(dataset_dir / "metadata.csv"), resolution=64,
                min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32, batch_size=2, lora_rank=4,
                learning_rate=1e-3, max_train_steps=3, lr_scheduler="constant", seed=3)
    base.update(kw)
    return TrainConfig(**base).validate()


def train_counting(bundle, config):
    counting = TextCountingBundle(bundle)
    dataset = TrainDataset.from_options(dataset_options(config), seed=config.seed)
    batches = prepare_batches(counting, dataset, config, NullSink())
    cached = list(counting.encoded)
    result = train(counting, batches, config)
    return dataset, batches, cached, counting.encoded[len(cached):], result


class TestTextCache:
    def test_on_encodes_each_caption_once(self, tiny_sd1, demo_dataset):
        """Default (true): every distinct caption is encoded once, before training; no step calls the encoder."""
        config = config_for(demo_dataset)
        dataset, batches, cached, during, _ = train_counting(tiny_sd1, config)
        assert batches.text_cached
        distinct = {r.caption for r in dataset.records}
        assert sorted(cached) == sorted(distinct) and len(cached) == len(distinct)
        assert during == []

    def test_off_encodes_every_step(self, tiny_sd1, demo_dataset):
        """false: nothing is cached and each step encodes its micro-batch's captions (batch 2 × 3 steps)."""
        config = config_for(demo_dataset, cache_text_encoder_outputs=False)
        _, batches, cached, during, result = train_counting(tiny_sd1, config)
        assert not batches.text_cached and cached == []
        assert len(during) == config.batch_size * result.steps == 6

    def test_same_training_either_way(self, tiny_sd1, demo_dataset):
        """Cached conditioning is the conditioning: both switches train the same adapter."""
        on = train_counting(tiny_sd1, config_for(demo_dataset, save_precision="fp32"))[4]
        off = train_counting(tiny_sd1, config_for(demo_dataset, save_precision="fp32",
                                                  cache_text_encoder_outputs=False))[4]
        assert on.losses == pytest.approx(off.losses, rel=1e-5)
        for key, value in on.state_dict.items():
            assert torch.allclose(value, off.state_dict[key], atol=1e-5), key


class TestCachesText:
    @pytest.mark.parametrize(("kw", "expected"), [
        ({}, True),
        ({"cache_text_encoder_outputs": False}, False),
        ({"train_text_encoder": True}, False),
        ({"shuffle_caption": True}, False),
        ({"caption_dropout_rate": 0.1}, False),
    ])
    def test_needs_switch_static_captions_and_frozen_encoder(self, demo_dataset, kw, expected):
        """Caching needs the switch on, captions that never change and no trained text encoder."""
        config = config_for(demo_dataset, **kw)
        dataset = TrainDataset.from_options(dataset_options(config), seed=config.seed)
        assert caches_text(config, dataset) is expected
