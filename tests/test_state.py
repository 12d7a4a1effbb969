"""TrainState: optimizer state is captured as a CPU snapshot and loaded back next to its parameters."""

from __future__ import annotations

import pytest
import torch
from test_loop import StopAfter, batches_for, config_for

from loraloop.trainer.config import TrainConfig
from loraloop.trainer.errors import TrainingInterrupted
from loraloop.trainer.loop import train
from loraloop.trainer.state import TrainState


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


def tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors(v)


def stepped_adamw():
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.full((4,), 0.5)
    optimizer.step()
    return param, optimizer


class TestCapture:
    def test_snapshot_does_not_follow_later_steps(self):
        """The captured moments are a copy: a later optimizer step (in place on the live state) leaves them alone."""
        param, optimizer = stepped_adamw()
        state = TrainState.capture(NoAdapters(), optimizer, Stateless(), Stateless(), 1, [0.5], TrainConfig())
        before = state.optimizer["state"][0]["exp_avg"].clone()
        param.grad = torch.full((4,), -3.0)
        optimizer.step()
        assert torch.equal(state.optimizer["state"][0]["exp_avg"], before)
        assert not torch.equal(optimizer.state[param]["exp_avg"], before)
        assert all(t.device.type == "cpu" for t in tensors(state.optimizer))


class TestApply:
    def test_state_goes_back_to_the_parameters_device(self):
        """An optimizer that loads state where it lies (as bitsandbytes' do) still gets it next to its parameter;
        the scalar `step` stays on the CPU, where AdamW keeps it."""

        class LoadsInPlace(torch.optim.SGD):
            def load_state_dict(self, state_dict):
                self.state[self.param_groups[0]["params"][0]] = dict(state_dict["state"][0])

        param = torch.nn.Parameter(torch.ones(3, device="meta"))
        optimizer = LoadsInPlace([param], lr=0.1, momentum=0.9)
        saved = {"state": {0: {"momentum_buffer": torch.ones(3), "step": torch.tensor(2.0)}},
                 "param_groups": optimizer.state_dict()["param_groups"]}
        state = TrainState(2, [0.1, 0.2], {}, saved, {}, {}, TrainConfig().to_dict())
        assert state.apply(NoAdapters(), optimizer, Stateless(), Stateless()) == 2
        loaded = optimizer.state[param]
        assert loaded["momentum_buffer"].device.type == "meta" and loaded["step"].device.type == "cpu"


class TestSavedFile:
    def test_holds_only_cpu_tensors_and_resumes_like_a_straight_run(self, tiny_sd1, demo_dataset, tmp_path):
        """A state saved mid-run has nothing but CPU tensors (this half bites on an accelerator; on CPU the capture's
        copy is checked by TestCapture) and resuming it gives the straight run's losses."""
        config = config_for(demo_dataset, max_train_steps=4, save_precision="fp32")
        straight = train(tiny_sd1, batches_for(tiny_sd1, config), config)
        with pytest.raises(TrainingInterrupted) as stop:
            train(tiny_sd1, batches_for(tiny_sd1, config), config, StopAfter(2))
        path = stop.value.result.train_state.save(tmp_path / "state.pt")
        payload = torch.load(path, map_location=None, weights_only=True)
        found = list(tensors(payload))
        assert found and all(t.device.type == "cpu" for t in found)
        resumed = train(tiny_sd1, batches_for(tiny_sd1, config), config, resume=TrainState.load(path))
        assert resumed.losses == straight.losses
