"""Spill detection: slow steps at a full card are reported, ordinary slow steps are not; a spill pulls a rung."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from loraloop.trainer.memory import GIB as GB
from loraloop.trainer.memory import OomRecovery, SpillGuard
from loraloop.trainer.memory.recovery import ladder as recovery_module

FULL, HALF, TOTAL = int(7.9 * GB), 4 * GB, 8 * GB


def feed(guard: SpillGuard, samples: list[tuple[float, int]]) -> list[int]:
    """Steps (1-based) at which the guard reported a spill."""
    return [step for step, (seconds, reserved) in enumerate(samples, 1)
            if guard.observe(step, seconds, reserved, TOTAL) is not None]


class TestSpillGuard:
    def test_reports_repeated_slow_steps_at_a_full_card(self):
        """40× slower steps with reserved ≈ total: reported after `patience` (2) such steps."""
        samples = [(1.0, HALF)] * 8 + [(40.0, FULL)] * 3
        assert feed(SpillGuard(), samples) == [10]

    def test_slow_steps_with_free_memory_are_not_a_spill(self):
        """A sample-image step or a save is slow but the card is not full."""
        samples = [(1.0, HALF)] * 8 + [(40.0, HALF)] * 3
        assert feed(SpillGuard(), samples) == []

    def test_a_full_card_at_normal_speed_is_fine(self):
        """The caching allocator often keeps the card full; that alone means nothing."""
        assert feed(SpillGuard(), [(1.0, FULL)] * 12) == []

    def test_one_hiccup_is_forgiven(self):
        samples = [(1.0, HALF)] * 8 + [(40.0, FULL), (1.0, FULL), (40.0, FULL), (1.0, FULL)]
        assert feed(SpillGuard(), samples) == []

    def test_warmup_steps_are_not_judged(self):
        """cuDNN autotuning and allocator warm-up make the first steps slow."""
        assert feed(SpillGuard(), [(30.0, FULL)] * 3 + [(1.0, HALF)] * 5) == []

    def test_spill_does_not_become_the_new_median(self):
        """After a reported spill, further spilled steps are still judged against the healthy median."""
        samples = [(1.0, HALF)] * 8 + [(40.0, FULL)] * 6
        assert feed(SpillGuard(), samples) == [10, 12, 14]


class TestSpillTriggersLadder:
    def test_guarded_steps_pull_a_rung_on_spill(self, monkeypatch):
        """Injected slow steps at a full card through `OomRecovery.wrap`: the chunk size is halved, once per spill."""
        clock = {"now": 0.0}
        durations = iter([1.0] * 8 + [50.0, 50.0] + [1.0] * 4)

        def fake_clock() -> float:
            return clock["now"]

        def step_fn(*args):
            clock["now"] += next(durations)
            return 0.1

        monkeypatch.setattr(recovery_module.time, "perf_counter", fake_clock)
        monkeypatch.setattr(recovery_module, "cuda_memory_fill", lambda: (FULL, TOTAL))
        batches = SimpleNamespace(chunk_size=None, batch_size=4)
        config = SimpleNamespace(gradient_checkpointing=False, lora_rank=8, sample_prompts=[],
                                 sample_every_n_steps=None)
        recovery = OomRecovery(SimpleNamespace(), batches, config, run=SimpleNamespace(changes=[]),
                               spill_guard=SpillGuard())
        guarded = recovery.wrap(step_fn)
        for step in range(14):
            assert guarded(None, batches, None, step, config, None, None, None, []) == pytest.approx(0.1)
        assert [a.rung for a in recovery.adjustments] == ["chunk"]
        assert batches.chunk_size == 2
        assert "spilling into system RAM" in recovery.run.changes[0]
