"""Interim compatibility with the webui's default torch (2.1.2 in v1.10.1; TORCH_COMMAND can choose newer ones).

The engine's loop builds `torch.amp.GradScaler(device_type, enabled=…)`, the device-generic class torch added in 2.3,
and its OOM recovery catches `torch.OutOfMemoryError` (torch 2.5+). On older torch these attributes are missing and
every run would stop there, so they are added — only when absent: `torch.amp.GradScaler` as a thin subclass of
`torch.cuda.amp.GradScaler` enabled for CUDA alone (a disabled scaler passes losses and optimizer steps through
unchanged), `torch.OutOfMemoryError` as `torch.cuda.OutOfMemoryError`. Remove this once the engine resolves both
itself (see the A1111 report: loop.train, memory/recovery.py).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def ensure_torch_compat() -> list[str]:
    """Everything below, once per process; returns what had to be added."""
    added = []
    if ensure_grad_scaler():
        added.append("torch.amp.GradScaler")
    if ensure_out_of_memory_error():
        added.append("torch.OutOfMemoryError")
    return added


def ensure_out_of_memory_error() -> bool:
    """torch < 2.5 has only `torch.cuda.OutOfMemoryError`; the engine's OOM recovery catches `torch.OutOfMemoryError`
    (an `except` clause naming a missing attribute would turn every step error into an AttributeError)."""
    if hasattr(torch, "OutOfMemoryError"):
        return False
    torch.OutOfMemoryError = torch.cuda.OutOfMemoryError  # type: ignore[attr-defined]
    return True


def ensure_grad_scaler() -> bool:
    """Provide `torch.amp.GradScaler` on torch < 2.3. Returns True when it had to be added."""
    if hasattr(torch.amp, "GradScaler"):
        return False
    base = torch.cuda.amp.GradScaler

    class GradScaler(base):  # type: ignore[misc, valid-type]
        def __init__(self, device: str = "cuda", init_scale: float = 2.0**16, growth_factor: float = 2.0,
                     backoff_factor: float = 0.5, growth_interval: int = 2000, enabled: bool = True) -> None:
            super().__init__(init_scale=init_scale, growth_factor=growth_factor, backoff_factor=backoff_factor,
                             growth_interval=growth_interval, enabled=enabled and str(device).startswith("cuda"))

    torch.amp.GradScaler = GradScaler  # type: ignore[attr-defined]
    log.info("LoRA Loop: torch %s has no torch.amp.GradScaler; using torch.cuda.amp.GradScaler", torch.__version__)
    return True
