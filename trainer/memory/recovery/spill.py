"""Spill detection: on Windows drivers with "sysmem fallback", a card that runs out of VRAM silently pages into
system RAM and every step becomes 30-150× slower instead of raising an OOM (landscape.md, theme 2).

The signature is two things at once: a step much slower than the recent median, and reserved memory at the card's
total. Either alone is normal (a sample step is slow; a full allocator cache is fine), so both are required, and the
slow step must repeat (`patience`) so that a single hiccup (another app, a checkpoint save) does not trigger it.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from dataclasses import dataclass, field

from ...units import GIB

log = logging.getLogger(__name__)

SLOWDOWN = 4.0  # a spilled step is 30-150× slower; 4× leaves room for bucket-size changes within an epoch
FULL_SHARE = 0.97  # reserved ≥ 97% of the card's total memory
WINDOW = 20  # steps in the running median
WARMUP = 3  # the first steps (allocator warm-up, cuDNN autotune) are never judged
PATIENCE = 2  # consecutive slow-and-full steps before we call it a spill


@dataclass(frozen=True)
class SpillEvent:
    """A detected spill: the step, its time, the median it is compared with, and the memory fill."""

    step: int
    seconds: float
    median: float
    reserved: int
    total: int

    def __str__(self) -> str:
        return (f"step {self.step} took {self.seconds:.2f} s, {self.seconds / self.median:.0f}× the recent median "
                f"{self.median:.2f} s, with {self.reserved / GIB:.2f} of {self.total / GIB:.2f} GB reserved: "
                "the driver is spilling GPU memory into system RAM")


@dataclass
class SpillGuard:
    """Feed it each step's duration and memory; it returns a `SpillEvent` when the step looks spilled.

    Args:
        slowdown: how many times the median a step must take.
        full_share: reserved / total that counts as full.
        window, warmup, patience: see the module constants.
    """

    slowdown: float = SLOWDOWN
    full_share: float = FULL_SHARE
    window: int = WINDOW
    warmup: int = WARMUP
    patience: int = PATIENCE
    _times: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    _seen: int = 0
    _strikes: int = 0

    def observe(self, step: int, seconds: float, reserved: int, total: int) -> SpillEvent | None:
        """Judge one finished step. Slow steps do not enter the median, so a spill cannot become the new normal."""
        self._seen += 1
        if self._seen <= self.warmup or len(self._times) < 2:
            if self._seen > self.warmup:
                self._times.append(seconds)
            return None
        median = statistics.median(self._times)
        slow = seconds > self.slowdown * median
        full = total > 0 and reserved >= self.full_share * total
        if slow and full:
            self._strikes += 1
            if self._strikes >= self.patience:
                self._strikes = 0
                event = SpillEvent(step, seconds, median, reserved, total)
                log.warning("%s", event)
                return event
            return None
        self._strikes = 0
        if not slow:
            self._times.append(seconds)
        return None

    def reset(self) -> None:
        """Forget the timing history (after the plan changed, step times change too)."""
        self._times.clear()
        self._seen = 0
        self._strikes = 0


def cuda_memory_fill(device: object = None) -> tuple[int, int]:
    """(reserved bytes, total bytes) of a CUDA device; (0, 0) without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return 0, 0
    props = torch.cuda.get_device_properties(device or torch.cuda.current_device())
    return torch.cuda.memory_reserved(device), props.total_memory
