"""Measure what a few real steps allocate, to calibrate the traced estimate on the device at hand.

On CUDA the caching allocator reports its peak (`torch.cuda.max_memory_allocated`). The CPU allocator keeps no such
counter, so on CPU we read the allocation events `torch.profiler` records with `profile_memory=True` (each carries a
signed byte count) and take the peak of their running sum: the same quantity, measured from the allocator itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Measurement:
    """Bytes a call allocated at its peak above what was allocated when it started, and how long it took."""

    peak_bytes: int
    seconds: float
    device: str


def _cpu_peak(fn: Callable[[], T]) -> tuple[T, int]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return result, peak


def _cuda_peak(fn: Callable[[], T], device: torch.device) -> tuple[T, int]:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    return result, torch.cuda.max_memory_allocated(device) - base


def measure(fn: Callable[[], T], device: torch.device | str) -> tuple[T, Measurement]:
    """Run `fn` once and measure the peak bytes it allocated on `device` (cuda or cpu) above the starting level."""
    device = torch.device(device)
    start = time.perf_counter()
    if device.type == "cuda":
        result, peak = _cuda_peak(fn, device)
    elif device.type == "cpu":
        result, peak = _cpu_peak(fn)
    else:
        msg = f"memory probing supports cuda and cpu devices (got {device.type!r})"
        raise ValueError(msg)
    return result, Measurement(peak, time.perf_counter() - start, str(device))
