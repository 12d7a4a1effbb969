"""The OOM ladder driven through the real loop: injected OOMs at chosen steps, same data order, expected rungs."""

from __future__ import annotations

import json

import pytest
import torch

from loraloop.trainer import loop
from loraloop.trainer.batches import dataset_options
from loraloop.trainer.checkpointing import CHECKPOINT_CLASSES
from loraloop.trainer.config import TrainConfig
from loraloop.trainer.data import TrainDataset
from loraloop.trainer.memory import OomRecovery, OutOfMemoryGiveUp, is_out_of_memory
from loraloop.trainer.memory.recovery.levers import downscale_latents, shrink_rank
from loraloop.trainer.metadata import RunInfo
from loraloop.trainer.progress import NullSink
from loraloop.trainer.runner import prepare_batches

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeMemory:
    """A device of `limit` units: a forward of n samples at latent h×w needs n·h·w units (×0.4 when checkpointed)."""

    def __init__(self) -> None:
        self.limit: float | None = None
        self.ooms = 0

    def needs(self, noisy: torch.Tensor, unet: torch.nn.Module) -> float:
        checkpointed = any("forward" in vars(m) for m in unet.modules() if type(m).__name__ in CHECKPOINT_CLASSES)
        n, _, h, w = noisy.shape
        return n * h * w * (0.4 if checkpointed else 1.0)


class OomBundle:
    """A bundle whose `predict` raises CUDA's OOM when the fake memory is exceeded; everything else is the real one."""

    def __init__(self, inner, memory: FakeMemory, on_oom) -> None:
        self._inner, self._memory, self._on_oom = inner, memory, on_oom

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def predict(self, noisy, timesteps, cond, sizes=None):
        limit = self._memory.limit
        if limit is not None and self._memory.needs(noisy, self._inner.unet) > limit:
            self._memory.ooms += 1
            self._on_oom()
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (injected)")
        return self._inner.predict(noisy, timesteps, cond, sizes)


def make_config(dataset_dir, **kw) -> TrainConfig:
    base = dict(train_data_dir=str(dataset_dir), metadata_path=str(dataset_dir / "metadata.csv"), resolution=64,
                min_bucket_reso=64, max_bucket_reso=64, bucket_reso_steps=32, enable_bucket=False, batch_size=4,
                lora_rank=8, learning_rate=1e-3, max_train_steps=4, lr_scheduler="constant", seed=5,
                save_precision="fp32")
    base.update(kw)
    return TrainConfig(**base).validate()


def run(tiny_sd1, config, monkeypatch, limits: dict[int, float | None], memory: FakeMemory | None = None):
    """Train with OOM recovery; `limits[k]` is the fake memory from step k+1 on. Returns (result, order, recovery)."""
    memory = memory or FakeMemory()
    memory.limit = limits.get(0)
    attempt: list[tuple[int, int]] = []
    order: list[list[tuple[int, int]]] = []
    bundle = OomBundle(tiny_sd1, memory, attempt.clear)
    batches = prepare_batches(bundle, TrainDataset.from_options(dataset_options(config), seed=config.seed), config,
                              NullSink())
    real = batches.micro_batch

    def logged(epoch, index):
        attempt.append((epoch, index))
        return real(epoch, index)

    batches.micro_batch = logged
    info = RunInfo()
    recovery = OomRecovery(bundle, batches, config, run=info)

    def on_step_end(step, network):
        order.append(list(attempt))
        attempt.clear()
        if step in limits:
            memory.limit = limits[step]

    result = loop.train(bundle, batches, config, run=info, on_step_end=on_step_end, recovery=recovery)
    return result, order, recovery


def baseline(tiny_sd1, config, monkeypatch):
    result, order, _ = run(tiny_sd1, config, monkeypatch, {})
    monkeypatch.undo()
    return result, order


class TestLadder:
    def test_chunks_first_then_checkpointing(self, tiny_sd1, demo_dataset, monkeypatch):
        """OOMs from step 3: chunk 4→2→1, then checkpointing; same data order and (chunked) maths as without OOMs."""
        config = make_config(demo_dataset)
        reference, reference_order = baseline(tiny_sd1, config, monkeypatch)
        area = 8 * 8
        result, order, recovery = run(tiny_sd1, config, monkeypatch, {2: 0.5 * area})
        assert [a.rung for a in recovery.adjustments] == ["chunk", "chunk", "gradient_checkpointing"]
        assert all(a.step == 2 for a in recovery.adjustments)  # all at the third step (0-based 2)
        assert order == reference_order
        assert result.steps == reference.steps == 4
        for key, value in reference.state_dict.items():
            assert torch.allclose(value, result.state_dict[key], atol=1e-4), key
        changes = json.loads(result.metadata["loraloop_changes"])
        assert changes == [a.message for a in recovery.adjustments]
        assert changes[0].startswith("step 3: out of memory")

    def test_caches_and_bucket_cap_when_checkpointing_is_not_enough(self, tiny_sd1, demo_dataset, monkeypatch):
        """Live latents get cached, then the largest buckets are capped; every step still runs, in order."""
        config = make_config(demo_dataset, cache_latents=False, batch_size=2, max_train_steps=4)
        _, reference_order = baseline(tiny_sd1, config, monkeypatch)
        result, order, recovery = run(tiny_sd1, config, monkeypatch, {1: 0.3 * 64})
        rungs = [a.rung for a in recovery.adjustments]
        assert rungs == ["chunk", "gradient_checkpointing", "cache", "optimizer", "bucket"]  # 8-bit AdamW: always there
        assert recovery.batches.latent_cache is not None
        assert order == reference_order
        assert result.steps == 4

    def test_gives_up_naming_what_was_tried(self, tiny_sd1, demo_dataset, monkeypatch):
        """With nothing fitting, every rung is pulled (rank last) and the error lists them."""
        config = make_config(demo_dataset, batch_size=2, max_train_steps=2)
        with pytest.raises(OutOfMemoryGiveUp) as caught:
            run(tiny_sd1, config, monkeypatch, {0: 1.0})
        rungs = [t.split(" → ")[1].split(" ")[0] for t in caught.value.tried]
        assert rungs == ["chunk_size", "gradient_checkpointing", "optimizer", "max", "max", "max", "lora_rank"]
        assert "out of memory at step 1" in str(caught.value) and "What would fit" in str(caught.value)

    def test_rank_is_lowered_in_place_and_training_goes_on(self, tiny_sd1, demo_dataset, monkeypatch):
        """When only a lower rank would fit, adapters are truncated and the run completes with rank-4 tensors."""
        config = make_config(demo_dataset, batch_size=1, max_train_steps=3)
        class RankBound(FakeMemory):
            def needs(self, noisy, unet):
                ranks = {m.r["default"] for m in unet.modules() if hasattr(m, "r") and isinstance(m.r, dict)}
                return max(ranks) if ranks else 0

        original = FakeMemory.needs
        monkeypatch.setattr(FakeMemory, "needs", RankBound.needs)
        result, _, recovery = run(tiny_sd1, config, monkeypatch, {1: 4.5})
        monkeypatch.setattr(FakeMemory, "needs", original)
        assert recovery.adjustments[-1].rung == "rank" and recovery.rank == 4
        downs = [v for k, v in result.state_dict.items() if k.endswith("lora_down.weight")]
        assert downs and all(v.shape[0] == 4 for v in downs)
        # alpha is not a function of the new rank: the recorded config says what the tensors hold
        alphas = {float(v) for k, v in result.state_dict.items() if k.endswith(".alpha")}
        assert alphas == {8.0} and result.config.lora_rank == 4 and result.config.alpha == 8.0


class TestCallbacks:
    def test_oom_while_sampling_is_skipped(self, demo_dataset):
        """An OOM inside on_step_end (sample/save) is logged into the changes and training continues."""
        info = RunInfo()
        config = make_config(demo_dataset)
        recovery = OomRecovery(object(), object(), config, run=info, spill_guard=None)

        def sample(step, network):
            raise torch.OutOfMemoryError("CUDA out of memory while decoding")

        recovery.wrap_callback(sample)(7, None)
        assert info.changes == ["step 7: out of memory while saving/sampling (CUDA out of memory while decoding); "
                                "skipped, training goes on"]


class TestLevers:
    def test_is_out_of_memory(self):
        assert is_out_of_memory(torch.OutOfMemoryError("x"))
        assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB"))
        assert not is_out_of_memory(RuntimeError("shape mismatch"))

    def test_downscale_latents_caps_area_and_updates_target(self):
        from loraloop.trainer.bundle import SizeInfo

        latents = torch.randn(2, 4, 16, 12)
        small, sizes = downscale_latents(latents, [SizeInfo((128, 96))] * 2, max_area=100, multiple=2)
        assert small.shape[-2:] == (10, 8) and sizes[0].target == (80, 64) and sizes[0].original == (128, 96)

    def test_shrink_rank_keeps_the_update_when_it_has_low_rank(self):
        """A rank-8 adapter whose update has rank 2 is truncated to rank 4 without changing its output."""
        from peft import LoraConfig, LoraModel

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 16))
        tuned = LoraModel(model, LoraConfig(r=8, lora_alpha=8, target_modules=["0"]), "default")
        layer = tuned.model[0]
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(torch.randn(8, 16))
            layer.lora_B["default"].weight.copy_(torch.randn(16, 2) @ torch.randn(2, 8))
        x = torch.randn(3, 16)
        before = tuned.model(x)
        shrink_rank(layer, 4)
        assert layer.r["default"] == 4 and layer.lora_A["default"].weight.shape == (4, 16)
        assert torch.allclose(before, tuned.model(x), atol=1e-4)


class FakeBitsAndBytes:
    """A stand-in `bitsandbytes` module: `optim.AdamW8bit` is torch's AdamW that records every instance it builds."""

    def __init__(self) -> None:
        import importlib.machinery
        import types

        built: list[torch.optim.Optimizer] = []

        class AdamW8bit(torch.optim.AdamW):
            def __init__(self, params, **kwargs):
                super().__init__(params, **kwargs)
                self.steps_taken = 0
                built.append(self)

            def step(self, closure=None):
                self.steps_taken += 1
                return super().step(closure)

        self.built = built
        self.module = types.ModuleType("bitsandbytes")
        # importlib.util.find_spec (optim.available) reads the spec of a module already in sys.modules.
        self.module.__spec__ = importlib.machinery.ModuleSpec("bitsandbytes", None)
        self.module.optim = types.SimpleNamespace(AdamW8bit=AdamW8bit)


class OptimizerBound(FakeMemory):
    """Only 8-bit optimizer state fits: every forward is out of memory until an AdamW8bit exists."""

    def __init__(self, fake_bnb: FakeBitsAndBytes) -> None:
        super().__init__()
        self.fake_bnb = fake_bnb

    def needs(self, noisy, unet):
        return 0.5 if self.fake_bnb.built else 2.0


def run_optimizer_bound(tiny_sd1, config, monkeypatch, fake_bnb, oom_from_step: int):
    """`run` with the memory of `OptimizerBound`, out of memory from 0-based step `oom_from_step` on."""
    return run(tiny_sd1, config, monkeypatch, {oom_from_step: 1.0}, memory=OptimizerBound(fake_bnb))


class TestEightBitOptimizer:
    def test_ladder_switches_to_adamw8bit_and_carries_on(self, tiny_sd1, demo_dataset, monkeypatch):
        """OOM from step 3 that only 8-bit state cures: checkpointing, then AdamW8bit; the run finishes every step
        in the same data order, the new optimizer does the remaining steps, and metadata and state say so."""
        import sys

        config = make_config(demo_dataset, batch_size=1, max_train_steps=4)
        reference, reference_order = baseline(tiny_sd1, config, monkeypatch)
        fake = FakeBitsAndBytes()
        monkeypatch.setitem(sys.modules, "bitsandbytes", fake.module)
        result, order, recovery = run_optimizer_bound(tiny_sd1, config, monkeypatch, fake, oom_from_step=2)

        assert [a.rung for a in recovery.adjustments] == ["gradient_checkpointing", "optimizer"]
        assert len(fake.built) == 1 and recovery.optimizer is fake.built[0]
        assert fake.built[0].steps_taken == 2  # steps 3 and 4 (the third is redone after the switch)
        assert result.steps == 4 and len(result.losses) == 4
        assert order == reference_order
        assert result.losses[:2] == reference.losses[:2]  # identical until the switch
        changes = json.loads(result.metadata["loraloop_changes"])
        assert changes[-1].startswith("step 3: out of memory") and \
            changes[-1].endswith("optimizer adamw → adamw8bit (bitsandbytes; state restarted)")
        assert result.metadata["ss_optimizer"] == "adamw8bit"
        assert result.config.optimizer == "adamw8bit" and result.config.gradient_checkpointing
        assert result.train_state.config["optimizer"] == "adamw8bit"
        params = {id(p) for g in fake.built[0].param_groups for p in g["params"]}
        assert len(result.train_state.optimizer["state"]) == len(params)  # the saved state is the 8-bit one's

    def test_without_bitsandbytes_the_rung_uses_the_torch_adamw8bit(self, tiny_sd1, demo_dataset, monkeypatch):
        """bitsandbytes absent: the rung still switches, to the pure-torch AdamW8bit, and the run finishes."""
        import sys
        import types

        from loraloop.trainer import optim
        from loraloop.trainer.optim8bit import AdamW8bit

        monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` fails, find_spec says absent
        built: list[torch.optim.Optimizer] = []

        class Recorded(AdamW8bit):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                built.append(self)

        monkeypatch.setattr(optim, "AdamW8bit", Recorded)
        config = make_config(demo_dataset, batch_size=1, max_train_steps=4)
        result, _, recovery = run_optimizer_bound(tiny_sd1, config, monkeypatch, types.SimpleNamespace(built=built),
                                                  oom_from_step=2)
        assert [a.rung for a in recovery.adjustments] == ["gradient_checkpointing", "optimizer"]
        assert len(built) == 1 and recovery.optimizer is built[0]
        assert result.steps == 4 and result.config.optimizer == "adamw8bit"
