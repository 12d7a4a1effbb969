"""The training loop on tiny models: learning, determinism, resume, NaN guard, cancel, exact restore."""

import math

import pytest
import torch
from test_network import assert_restored, snapshot

from loraloop.trainer.batches import dataset_options
from loraloop.trainer.config import TrainConfig
from loraloop.trainer.data import TrainDataset
from loraloop.trainer.errors import NonFiniteLossError, TrainingInterrupted
from loraloop.trainer.loop import non_finite_advice, train
from loraloop.trainer.progress import NullSink
from loraloop.trainer.runner import prepare_batches
from loraloop.trainer.state import TrainState


def config_for(dataset_dir, **kw):
    base = dict(train_data_dir=str(dataset_dir), metadata_path=str(dataset_dir / "metadata.csv"), resolution=64,
                min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32, batch_size=2, lora_rank=4,
                lora_alpha=4, learning_rate=2e-3, max_train_steps=6, lr_scheduler="constant", seed=3)
    base.update(kw)
    return TrainConfig(**base).validate()


def batches_for(bundle, config):
    dataset = TrainDataset.from_options(dataset_options(config), seed=config.seed)
    return prepare_batches(bundle, dataset, config, NullSink())


class StopAfter(NullSink):
    def __init__(self, steps):
        self.steps, self.seen = steps, 0

    def step(self, info):
        self.seen = info.step

    def should_stop(self):
        return self.seen >= self.steps


class TestLearning:
    def test_loss_falls_on_a_learnable_task(self, tiny_sd1, demo_dataset):
        """Fitting one image at fixed noise: the loss must fall by at least 30% in 40 steps."""
        config = config_for(demo_dataset, batch_size=1, max_train_steps=40, learning_rate=5e-3, min_snr_gamma=None)
        batches = batches_for(tiny_sd1, config)
        batches.batches_per_epoch = 1  # always the same micro-batch …
        fixed = batches.micro_batch(0, 0)
        batches.micro_batch = lambda epoch, index: fixed
        from loraloop.trainer import loop

        original = loop.micro_batch_seed
        loop.micro_batch_seed = lambda *a: 1234  # … and the same noise and timestep
        try:
            result = train(tiny_sd1, batches, config)
        finally:
            loop.micro_batch_seed = original
        first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
        assert last < 0.7 * first, (first, last)

    def test_same_seed_same_adapter(self, tiny_sd1, demo_dataset):
        """Two CPU runs with one seed give bit-identical adapters and losses."""
        config = config_for(demo_dataset, max_train_steps=4)
        a = train(tiny_sd1, batches_for(tiny_sd1, config), config)
        b = train(tiny_sd1, batches_for(tiny_sd1, config), config)
        assert a.losses == b.losses
        assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)

    def test_chunking_keeps_the_maths(self, tiny_sd1, demo_dataset):
        """Splitting each micro-batch into chunks (the OOM fallback) gives the same update within float error."""
        config = config_for(demo_dataset, max_train_steps=3, save_precision="fp32")
        whole = train(tiny_sd1, batches_for(tiny_sd1, config), config)
        split = batches_for(tiny_sd1, config)
        split.chunk_size = 1
        chunked = train(tiny_sd1, split, config)
        for k, v in whole.state_dict.items():
            # Adam divides by sqrt(v): float-rounding differences of ~1e-7 in the grads show up as ~1e-5 here
            assert torch.allclose(v, chunked.state_dict[k], atol=1e-4), (k, (v - chunked.state_dict[k]).abs().max())

    @pytest.mark.parametrize("kw", [dict(min_snr_gamma=5.0, noise_offset=0.05, accumulation_steps=2,
                                          lr_scheduler="cosine", lr_warmup_steps=2),
                                     dict(mixed_precision="bf16", train_text_encoder=True, network_type="locon",
                                          gradient_checkpointing=True)])
    def test_options_run_and_stay_finite(self, tiny_sd1, demo_dataset, kw):
        config = config_for(demo_dataset, max_train_steps=3, **kw)
        before = snapshot(tiny_sd1.unet, tiny_sd1.text_encoders[0].module)
        result = train(tiny_sd1, batches_for(tiny_sd1, config), config)
        assert len(result.losses) == 3 and all(math.isfinite(v) for v in result.losses)
        assert_restored(before, tiny_sd1.unet, tiny_sd1.text_encoders[0].module)

    def test_v_prediction_and_fp16_loss_scaling(self, demo_dataset):
        """A v-prediction model trains on the v target (fp16 autocast + GradScaler) and says so in its metadata."""
        from loraloop.trainer.bundles.tiny import build_tiny_bundle

        bundle = build_tiny_bundle("tiny-sd1-v")
        config = config_for(demo_dataset, max_train_steps=3, mixed_precision="fp16")
        result = train(bundle, batches_for(bundle, config), config)
        assert all(math.isfinite(v) for v in result.losses)
        assert result.metadata["modelspec.prediction_type"] == "v"
        assert result.metadata["ss_v_parameterization"] == "True"
        assert result.train_state.scaler["scale"] > 0  # the loss scaler was active

    def test_sdxl_trains(self, tiny_sdxl, demo_dataset):
        config = config_for(demo_dataset, max_train_steps=2, train_text_encoder=True)
        result = train(tiny_sdxl, batches_for(tiny_sdxl, config), config)
        assert any(k.startswith("lora_te2_") for k in result.state_dict)
        assert any(k.startswith("lora_unet_input_blocks_") for k in result.state_dict)


class TestResume:
    def test_resume_equals_straight_run(self, tiny_sd1, demo_dataset, tmp_path):
        """2N steps straight == N steps, save state, resume N (same seed, CPU) within 1e-6."""
        config = config_for(demo_dataset, max_train_steps=6, save_precision="fp32", lr_scheduler="cosine")
        straight = train(tiny_sd1, batches_for(tiny_sd1, config), config)
        with pytest.raises(TrainingInterrupted) as info:
            train(tiny_sd1, batches_for(tiny_sd1, config), config, StopAfter(3))
        path = info.value.result.train_state.save(tmp_path / "state.pt")
        resumed = train(tiny_sd1, batches_for(tiny_sd1, config), config, resume=TrainState.load(path))
        assert resumed.losses == straight.losses
        for k, v in straight.state_dict.items():
            assert torch.allclose(v, resumed.state_dict[k], atol=1e-6), k


class TestFailures:
    def test_nan_guard_stops_and_restores(self, tiny_sd1, demo_dataset):
        """An injected NaN loss stops the run with a clear message; the model is restored, nothing returned."""
        config = config_for(demo_dataset, max_train_steps=5)
        batches = batches_for(tiny_sd1, config)
        real = batches.micro_batch

        def poisoned(epoch, index):
            micro = real(epoch, index)
            micro.latents = micro.latents * float("nan")
            return micro

        batches.micro_batch = poisoned
        before = snapshot(tiny_sd1.unet)
        expected = r"the loss became nan at step 1; nothing was saved\. Lower "
        with pytest.raises(NonFiniteLossError, match=expected) as err:
            train(tiny_sd1, batches, config)
        assert_restored(before, tiny_sd1.unet)
        assert "fp16" not in str(err.value) and "bf16" not in str(err.value)  # this run has no mixed precision

    def test_nan_advice_names_only_levers_of_the_run(self):
        """fp16 → bf16 only when fp16 is on; max_grad_norm only when clipping is off; the learning rate always."""
        plain = non_finite_advice(TrainConfig(mixed_precision="no", learning_rate=1e-3))
        assert plain == "Lower learning_rate (now 0.001)"
        fp16 = non_finite_advice(TrainConfig(mixed_precision="fp16", max_grad_norm=None))
        assert fp16 == ("Lower learning_rate (now 0.0001), use mixed_precision bf16 instead of fp16 or enable "
                        "max_grad_norm (1.0 is typical)")
        assert "fp16" not in non_finite_advice(TrainConfig(mixed_precision="bf16"))

    def test_error_mid_run_restores(self, tiny_sd1, demo_dataset):
        config = config_for(demo_dataset, max_train_steps=5, train_text_encoder=True)
        batches = batches_for(tiny_sd1, config)
        calls = {"n": 0}
        real = batches.micro_batch

        def failing(epoch, index):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("disk on fire")
            return real(epoch, index)

        batches.micro_batch = failing
        te = tiny_sd1.text_encoders[0].module
        before = snapshot(tiny_sd1.unet, te)
        with pytest.raises(RuntimeError, match="disk on fire"):
            train(tiny_sd1, batches, config)
        assert_restored(before, tiny_sd1.unet, te)

    def test_cancel_restores_and_returns_partial(self, tiny_sd1, demo_dataset):
        config = config_for(demo_dataset, max_train_steps=10)
        before = snapshot(tiny_sd1.unet)
        with pytest.raises(TrainingInterrupted) as info:
            train(tiny_sd1, batches_for(tiny_sd1, config), config, StopAfter(2))
        assert info.value.step == 2 and info.value.result.steps == 2
        assert info.value.result.state_dict and info.value.result.metadata["ss_steps"] == "2"
        assert_restored(before, tiny_sd1.unet)


def test_tensorboard_scalars(tiny_sd1, demo_dataset, tmp_path):
    """With tensorboard installed, loss and lr land in logging_dir as event scalars."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = config_for(demo_dataset, max_train_steps=3, logging_dir=str(tmp_path / "tb"))
    train(tiny_sd1, batches_for(tiny_sd1, config), config)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert len(events.Scalars("lr")) == 3
