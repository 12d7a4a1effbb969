"""The pure-torch AdamW8bit: memory, closeness to torch's AdamW, exact resume, dtypes, and the `adamw8bit` backend."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import sys
import types

import pytest
import torch
from test_loop import StopAfter, batches_for, config_for

from loraloop.trainer import optim
from loraloop.trainer.config import TrainConfig
from loraloop.trainer.errors import TrainingInterrupted
from loraloop.trainer.loop import train as train_lora
from loraloop.trainer.optim import available, build_optimizer, eight_bit_backend
from loraloop.trainer.optim8bit import (
    MIN_8BIT_SIZE,
    AdamW8bit,
    dequantize_signed,
    dequantize_unsigned,
    quantize_signed,
    quantize_unsigned,
    state_bytes,
)
from loraloop.trainer.state import TrainState

pytestmark = pytest.mark.usefixtures("one_thread")  # 2 shared cores: no OpenMP oversubscription

CODES = {"exp_avg_codes": torch.int8, "exp_avg_scales": torch.float32, "exp_avg_sq_root_codes": torch.uint8,
         "exp_avg_sq_root_scales": torch.float32}


def low_rank_problem(dtype: torch.dtype = torch.float32, seed: int = 0):
    """A LoRA-like fit: factors down (256×16) and up (16×256), 4096 elements each (8-bit state by default), learn a
    rank-8 target. Returns (params, target)."""
    g = torch.Generator().manual_seed(seed)
    target = (torch.randn(256, 8, generator=g) @ torch.randn(8, 256, generator=g)) / 8**0.5
    down = torch.nn.Parameter((torch.randn(256, 16, generator=g) * 0.1).to(dtype))
    up = torch.nn.Parameter((torch.randn(16, 256, generator=g) * 0.1).to(dtype))
    return [down, up], target


def fit_loss(params: list[torch.Tensor], target: torch.Tensor):
    """The loss function of the fit, computed in fp32 whatever the parameters' dtype."""
    down, up = params
    return lambda: (down.float() @ up.float() - target).square().mean()


def train(optimizer: torch.optim.Optimizer, loss_fn, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


class TestQuantisation:
    def test_signed_codes_keep_small_values_of_a_block(self):
        """A block spanning 4 orders of magnitude: from 1 % of the maximum up the values come back within 8 % (a linear
        int8 code: 39 %), and nothing down to 1e-4 of the maximum is flushed to zero (linear: all below 0.4 %)."""
        values = torch.logspace(-4, 0, 256) * torch.tensor([1.0, -1.0]).repeat(128)
        codes, scales = quantize_signed(values, 256)
        back = dequantize_signed(codes, scales, values.shape, 256)
        assert codes.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (1,)
        big = values.abs() >= 1e-2
        assert ((back[big] - values[big]).abs() / values[big].abs()).max() < 0.08
        assert (back.sign() == values.sign()).all()

    def test_unsigned_codes_keep_a_wide_range(self):
        """sqrt(v) of a block spanning 10 orders of magnitude in v: no element is flushed to zero."""
        v = torch.logspace(-10, 0, 300)
        codes, scales = quantize_unsigned(v.sqrt(), 256)
        back = dequantize_unsigned(codes, scales, v.shape, 256).square()
        assert codes.dtype == torch.uint8 and codes.shape == (300,) and scales.shape == (2,)  # a padded last block
        assert (back > 0).all()
        top = v >= 1e-4 * v.max()
        assert ((back[top] - v[top]).abs() / v[top]).max() < 0.1

    def test_a_zero_block_stays_zero(self):
        codes, scales = quantize_signed(torch.zeros(512), 256)
        assert torch.equal(dequantize_signed(codes, scales, torch.Size([512]), 256), torch.zeros(512))


class TestAdamW8bit:
    def test_state_is_under_30_percent_of_adamw(self):
        """(a) A 1M-element parameter: codes (1 byte each for m and v) plus one fp32 scale per 256 elements."""
        sizes = {}
        for name, factory in (("adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-3)), ("8bit", AdamW8bit)):
            param = torch.nn.Parameter(torch.zeros(1000, 1000))
            param.grad = torch.randn(1000, 1000)
            optimizer = factory([param])
            optimizer.step()
            sizes[name] = state_bytes(optimizer)
        assert sizes["adamw"] >= 8_000_000
        assert sizes["8bit"] <= 0.30 * sizes["adamw"]
        assert sizes["8bit"] == 2 * 1_000_000 + 2 * 4 * 3907  # ceil(1e6 / 256) = 3907 blocks

    def test_loss_curve_follows_adamw(self):
        """(b) 200 steps of the LoRA-like fit: the loss falls by more than 1000× with either optimizer and the
        8-bit curve stays within 15 % of AdamW's at every step (measured: 4.8 %; final loss 1.04× AdamW's)."""
        params, target = low_rank_problem()
        reference = train(torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0), fit_loss(params, target), 200)
        params, target = low_rank_problem()
        optimizer = AdamW8bit(params, lr=1e-2, weight_decay=0.0)
        losses = train(optimizer, fit_loss(params, target), 200)
        assert all(optimizer.state[p]["exp_avg_codes"].dtype == torch.int8 for p in params)  # the 8-bit path ran
        assert reference[-1] < reference[0] / 1000 and losses[-1] < losses[0] / 1000
        assert 0.8 < losses[-1] / reference[-1] < 1.25
        assert max(abs(a - b) / b for a, b in zip(losses, reference, strict=True)) < 0.15

    def test_weight_decay_is_decoupled_like_adamw(self):
        """With zero gradients the moments stay zero and only the decay acts: p · (1 - lr · wd) per step."""
        param = torch.nn.Parameter(torch.ones(64, 64))
        optimizer = AdamW8bit([param], lr=0.1, weight_decay=0.5)
        for _ in range(3):
            param.grad = torch.zeros_like(param)
            optimizer.step()
        assert torch.allclose(param, torch.full_like(param, 0.95**3))

    def test_no_element_jumps_when_its_gradients_are_tiny_or_stop(self):
        """Gradients spanning 1e-6..1 in one block, then zero for some: AdamW moves every element by about lr at most.
        A second moment flushed to zero (while the first is not) would move an element by m / eps instead."""
        torch.manual_seed(0)
        param = torch.nn.Parameter(torch.zeros(8192))
        magnitude = torch.logspace(-6, 0, 8192)[torch.randperm(8192)]
        optimizer = AdamW8bit([param], lr=1e-3, weight_decay=0.0)
        for step in range(30):
            grad = magnitude * torch.randn(8192).sign()
            param.grad = grad * (magnitude > 1e-3) if step >= 20 else grad  # the small ones stop after 20 steps
            before = param.detach().clone()
            optimizer.step()
            assert (param - before).abs().max() < 5e-3

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_state_dict_round_trip_resumes_exactly(self, dtype, tmp_path):
        """(c) 5 steps, save (through TrainState's CPU snapshot and file, as a resumable run does), load into a fresh
        optimizer over copies of the parameters, 5 more steps: bit-identical to the original going on. With bf16
        parameters torch's loader would round the fp32 scales to bf16; ours keeps them."""
        params, target = low_rank_problem(dtype)
        optimizer = AdamW8bit(params, lr=1e-2)
        train(optimizer, fit_loss(params, target), 5)
        state = TrainState.capture(NoAdapters(), optimizer, Stateless(), Stateless(), 5, [], TrainConfig())
        loaded = TrainState.load(state.save(tmp_path / "state.pt"))

        copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
        fresh = AdamW8bit(copies, lr=1e-2)
        loaded.apply(NoAdapters(), fresh, Stateless(), Stateless())
        for param in copies:
            assert {k: v.dtype for k, v in fresh.state[param].items() if k in CODES} == CODES
        assert train(fresh, fit_loss(copies, target), 5) == train(optimizer, fit_loss(params, target), 5)
        assert all(torch.equal(a, b) for a, b in zip(copies, params, strict=True))

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_half_precision_params_train(self, dtype):
        """(d) bf16/fp16 parameters: they stay in their dtype, the state is int8/uint8 codes with fp32 scales and fp32
        for small tensors, and the loss falls by more than 10× in 100 steps."""
        params, target = low_rank_problem(dtype)
        bias = torch.nn.Parameter(torch.zeros(256, dtype=dtype))
        optimizer = AdamW8bit([*params, bias], lr=1e-2)
        fit = fit_loss(params, target)
        losses = train(optimizer, lambda: fit() + (bias.float() - 1).square().mean(), 100)
        assert all(p.dtype == dtype for p in (*params, bias))
        assert {k: v.dtype for k, v in optimizer.state[params[0]].items() if k in CODES} == CODES
        assert optimizer.state[bias]["exp_avg"].dtype == torch.float32
        assert losses[-1] < losses[0] / 10 and all(map(torch.isfinite, torch.tensor(losses)))

    def test_small_tensors_keep_fp32_state_and_match_adamw(self):
        """(e) Below min_8bit_size the state is torch AdamW's fp32 pair, and the update is AdamW's to the last bit."""
        torch.manual_seed(0)
        start, grads = torch.randn(MIN_8BIT_SIZE - 1), [torch.randn(MIN_8BIT_SIZE - 1) for _ in range(5)]
        ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
        optimizers = AdamW8bit([ours], lr=1e-2), torch.optim.AdamW([theirs], lr=1e-2, foreach=False)
        for grad in grads:
            for param, optimizer in zip((ours, theirs), optimizers, strict=True):
                param.grad = grad.clone()
                optimizer.step()
        state = optimizers[0].state[ours]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"} and state["exp_avg"].dtype == torch.float32
        assert torch.equal(ours, theirs)
        big = torch.nn.Parameter(torch.zeros(MIN_8BIT_SIZE))
        big.grad = torch.ones(MIN_8BIT_SIZE)
        optimizer = AdamW8bit([big])
        optimizer.step()
        assert set(optimizer.state[big]) == {"step", *CODES}


def test_a_run_resumed_from_a_saved_state_continues_exactly(tiny_sd1, demo_dataset, tmp_path, monkeypatch):
    """The real loop with `optimizer="adamw8bit"` and no bitsandbytes: the saved state holds both kinds of state (the
    tiny UNet has LoRA factors above and below min_8bit_size) and resuming it gives the straight run's losses."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    config = config_for(demo_dataset, max_train_steps=4, save_precision="fp32", optimizer="adamw8bit", lora_rank=8)
    straight = train_lora(tiny_sd1, batches_for(tiny_sd1, config), config)
    with pytest.raises(TrainingInterrupted) as stop:
        train_lora(tiny_sd1, batches_for(tiny_sd1, config), config, StopAfter(2))
    state = stop.value.result.train_state
    kinds = {frozenset(k for k in saved if k != "step") for saved in state.optimizer["state"].values()}
    assert kinds == {frozenset(("exp_avg", "exp_avg_sq")), frozenset(CODES)}
    resumed = train_lora(tiny_sd1, batches_for(tiny_sd1, config), config,
                         resume=TrainState.load(state.save(tmp_path / "state.pt")))
    assert resumed.losses == straight.losses


class NoAdapters:
    """The part of `Network` TrainState touches, for a network without adapters."""

    def state_dict(self, dtype):
        return {}

    def load_state_dict(self, state):
        pass


class Stateless:
    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class TestBackend:
    """(f) `adamw8bit` is bitsandbytes' when it imports, ours otherwise; it is always available."""

    @pytest.fixture(autouse=True)
    def _log_again(self, monkeypatch):
        monkeypatch.setattr(optim, "_announced", set())  # the backend is logged once per process

    def test_without_bitsandbytes_it_is_ours(self, monkeypatch, caplog):
        monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` fails, find_spec says absent
        param = torch.nn.Parameter(torch.zeros(2))
        with caplog.at_level(logging.INFO, logger="loraloop.trainer.optim"):
            first = build_optimizer("adamw8bit", [{"params": [param], "lr": 1e-3}], 1e-4, 0.01)
            build_optimizer("adamw8bit", [{"params": [param]}], 1e-4, 0.01)
        assert type(first) is AdamW8bit and first.param_groups[0]["lr"] == 1e-3
        assert first.param_groups[0]["weight_decay"] == 0.01
        assert available()["adamw8bit"] and eight_bit_backend() == "torch"
        assert [m for m in caplog.messages if "adamw8bit" in m] == [
            "optimizer adamw8bit: using the torch AdamW8bit (block-wise 8-bit state in plain torch; no bitsandbytes)"]

    def test_with_bitsandbytes_it_is_theirs(self, monkeypatch):
        class TheirAdamW8bit(torch.optim.AdamW):
            pass

        module = types.ModuleType("bitsandbytes")
        module.__spec__ = importlib.machinery.ModuleSpec("bitsandbytes", None)  # find_spec reads it from sys.modules
        module.optim = types.SimpleNamespace(AdamW8bit=TheirAdamW8bit)
        monkeypatch.setitem(sys.modules, "bitsandbytes", module)
        built = build_optimizer("adamw8bit", [{"params": [torch.nn.Parameter(torch.zeros(2))]}], 1e-4, 0.0)
        assert type(built) is TheirAdamW8bit and eight_bit_backend() == "bitsandbytes"

    def test_a_broken_bitsandbytes_falls_back_to_ours(self, monkeypatch, caplog):
        """Installed (a spec is found) but the import fails, as a wrong CUDA build does: ours, with a warning."""
        real_find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: importlib.machinery.ModuleSpec(name, None)
                            if name == "bitsandbytes" else real_find_spec(name, *a))
        monkeypatch.setitem(sys.modules, "bitsandbytes", None)
        with caplog.at_level(logging.WARNING, logger="loraloop.trainer.optim"):
            built = build_optimizer("adamw8bit", [{"params": [torch.nn.Parameter(torch.zeros(2))]}], 1e-4, 0.0)
        assert type(built) is AdamW8bit
        assert any(m.startswith("bitsandbytes is installed but does not import") for m in caplog.messages)


def test_a_state_saved_by_one_eight_bit_backend_is_refused_by_the_other(tmp_path):
    """adamw8bit is bitsandbytes' where it is installed, ours elsewhere: their states differ, so a resume across
    machines names the mismatch instead of loading garbage."""
    import types

    import pytest

    from loraloop.trainer.config import TrainConfig
    from loraloop.trainer.errors import LoraFileError
    from loraloop.trainer.optim8bit import AdamW8bit
    from loraloop.trainer.state import OPTIMIZER_CLASS, TrainState

    param = torch.nn.Parameter(torch.zeros(8))
    network = types.SimpleNamespace(state_dict=lambda dtype: {}, load_state_dict=lambda sd: None)
    scheduler = types.SimpleNamespace(state_dict=dict, load_state_dict=lambda sd: None)
    ours = AdamW8bit([param], lr=1e-3)
    state = TrainState.capture(network, ours, scheduler, scheduler, 3, [1.0], TrainConfig(optimizer="adamw8bit"))
    assert state.config[OPTIMIZER_CLASS] == "loraloop.trainer.optim8bit.AdamW8bit"
    loaded = TrainState.load(state.save(tmp_path / "s.pt"))
    assert loaded.apply(network, AdamW8bit([param], lr=1e-3), scheduler, scheduler) == 3
    with pytest.raises(LoraFileError, match=r"saved by loraloop\.trainer\.optim8bit\.AdamW8bit"):
        loaded.apply(network, torch.optim.AdamW([param], lr=1e-3), scheduler, scheduler)
