"""Standalone runs on an accelerator encode before the UNet takes the device, as the memory plan assumes.

There is no GPU here: the bundle's modules record their `.to()` calls instead of moving, and the encoders record where
the UNet was when they ran. A test fails if any encoding happens while the UNet is (recorded) on the accelerator.
"""

from __future__ import annotations

import pytest
import torch

from loraloop.trainer import runner
from loraloop.trainer.batches import dataset_options
from loraloop.trainer.bundles.tiny import build_tiny_bundle
from loraloop.trainer.config import TrainConfig
from loraloop.trainer.data import TrainDataset
from loraloop.trainer.progress import NullSink

ACCELERATOR = torch.device("cuda")  # only named: every move is recorded, none is made


class Placement:
    """Where each module of a bundle would be, and every move and encoder call in order."""

    def __init__(self, bundle) -> None:
        self.where = {"unet": "cpu", "vae": "cpu", "te": "cpu"}
        self.events: list[tuple[str, ...]] = []
        self._record_moves("unet", bundle.unet)
        self._record_moves("vae", bundle.vae)
        for slot in bundle.text_encoders:
            self._record_moves("te", slot.module)
        self._record_calls(bundle)

    def _record_moves(self, role: str, module: torch.nn.Module) -> None:
        def to(*args, **kwargs):
            device = kwargs.get("device", args[0] if args else None)
            if device is not None and not isinstance(device, torch.dtype):
                self.where[role] = torch.device(device).type
                self.events.append(("move", role, self.where[role]))
            return module

        module.to = to  # instance attribute: shadows nn.Module.to for this module only

    def _record_calls(self, bundle) -> None:
        real_images, real_text, real_predict = bundle.encode_images, bundle.encode_text, bundle.predict

        def encode_images(pixels):
            self.events.append(("encode_images", pixels.shape[0], self.where["vae"], self.where["unet"]))
            return real_images(pixels)

        def encode_text(captions):
            self.events.append(("encode_text", len(captions), self.where["te"], self.where["unet"]))
            return real_text(captions)

        def predict(*args, **kwargs):
            self.events.append(("predict", self.where["unet"]))
            return real_predict(*args, **kwargs)

        bundle.encode_images, bundle.encode_text, bundle.predict = encode_images, encode_text, predict

    def index(self, event: tuple[str, ...]) -> int:
        return self.events.index(event)

    def of(self, kind: str) -> list[tuple[str, ...]]:
        return [e for e in self.events if e[0] == kind]


def config_for(dataset_dir, tmp_path, **kw) -> TrainConfig:
    base = dict(train_data_dir=str(dataset_dir), metadata_path=str(dataset_dir / "metadata.csv"), resolution=64,
                min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32, batch_size=2, lora_rank=4,
                max_train_steps=2, lr_scheduler="constant", seed=3, output_dir=str(tmp_path / "out"),
                output_name="staged")
    base.update(kw)
    return TrainConfig(**base).validate()


@pytest.fixture
def staged_run(monkeypatch):
    """`runner.run` believing it has an accelerator; returns the `Placement` of the bundle it loaded."""
    bundle = build_tiny_bundle("tiny-sd1")
    placement = Placement(bundle)
    loads = []

    def load_bundle(config, device=None):
        loads.append(torch.device(device).type if device is not None else None)
        return bundle

    monkeypatch.setattr(runner, "training_device", lambda: ACCELERATOR)
    monkeypatch.setattr(runner, "load_bundle", load_bundle)
    placement.loads = loads
    return placement


class TestRun:
    def test_encoders_cache_before_the_unet_moves_in(self, staged_run, demo_dataset, tmp_path):
        """Loaded on the CPU; VAE and text encoder on the device to cache, one image at a time (the plan's
        cache_batch_size), with the UNet on the CPU; they leave; only then the UNet moves in and training runs."""
        config = config_for(demo_dataset, tmp_path, vram_budget_gb=4.0)
        outputs = runner.run(config, samples=False)
        p = staged_run
        assert p.loads == ["cpu"]
        images, texts = p.of("encode_images"), p.of("encode_text")
        assert images and texts
        assert all(vae == "cuda" and unet == "cpu" for _, _, vae, unet in images)
        assert all(te == "cuda" and unet == "cpu" for _, _, te, unet in texts)
        assert {n for _, n, _, _ in images} == {1}  # the plan's cache_batch_size
        unet_in = p.index(("move", "unet", "cuda"))
        assert p.index(("move", "vae", "cpu")) < unet_in and p.index(("move", "te", "cpu")) < unet_in
        assert p.index(images[-1]) < unet_in and p.index(texts[-1]) < unet_in
        assert p.of("predict") and all(where == "cuda" for _, where in p.of("predict"))
        assert outputs.result.steps == 2

    def test_without_a_plan_the_order_is_the_same(self, staged_run, demo_dataset, tmp_path):
        """No memory plan (no budget, no real GPU): still encode first, then the UNet; micro-batch-sized caching."""
        config = config_for(demo_dataset, tmp_path)
        runner.run(config, samples=False)
        p = staged_run
        assert all(unet == "cpu" for *_, unet in p.of("encode_images") + p.of("encode_text"))
        assert p.where == {"unet": "cuda", "vae": "cpu", "te": "cpu"}

    def test_a_host_bundle_is_not_staged(self, demo_dataset, tmp_path, monkeypatch):
        """A bundle the caller passes (a host's) stays where the host put it: no UNet move at all."""
        bundle = build_tiny_bundle("tiny-sd1")
        placement = Placement(bundle)
        monkeypatch.setattr(runner, "training_device", lambda: ACCELERATOR)
        runner.run(config_for(demo_dataset, tmp_path), bundle=bundle, samples=False)
        assert ("move", "unet", "cuda") not in placement.events


class TestEncodeThenLoadUnet:
    def dataset(self, config):
        return TrainDataset.from_options(dataset_options(config), seed=config.seed)

    def test_encoders_needed_every_step_move_in_with_the_unet(self, demo_dataset, tmp_path):
        """A trained text encoder is not cached: it stays on the CPU while the VAE caches, then joins the UNet."""
        bundle = build_tiny_bundle("tiny-sd1")
        p = Placement(bundle)
        config = config_for(demo_dataset, tmp_path, train_text_encoder=True)
        batches = runner.encode_then_load_unet(bundle, self.dataset(config), config, NullSink(), ACCELERATOR)
        assert not batches.text_cached and p.of("encode_text") == []
        assert p.where == {"unet": "cuda", "vae": "cpu", "te": "cuda"}
        assert p.index(("move", "te", "cuda")) > p.index(p.of("encode_images")[-1])

    def test_no_offload_keeps_the_encoders_on_the_device(self, demo_dataset, tmp_path):
        """offload_encoders false (the plan kept them): encoders stay, the UNet still arrives after caching."""
        bundle = build_tiny_bundle("tiny-sd1")
        p = Placement(bundle)
        config = config_for(demo_dataset, tmp_path)
        runner.encode_then_load_unet(bundle, self.dataset(config), config, NullSink(), ACCELERATOR,
                                     offload_encoders=False)
        assert p.where == {"unet": "cuda", "vae": "cuda", "te": "cuda"}
        assert p.index(("move", "unet", "cuda")) > p.index(p.of("encode_images")[-1])
