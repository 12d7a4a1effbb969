"""How the engine reports to its front end: a `ProgressSink` per host (CLI tqdm, ComfyUI ProgressBar, A1111 state)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepInfo:
    """One finished optimizer step."""

    step: int  # 1-based
    total: int
    epoch: int
    loss: float
    lr: float
    seconds_per_step: float

    @property
    def eta_seconds(self) -> float:
        return (self.total - self.step) * self.seconds_per_step


class ProgressSink(Protocol):
    """A front end's progress reporting. A sink may also have `interrupt_errors`: a tuple of exception types the host
    raises mid-step to cancel (ComfyUI 0.33's InterruptProcessingException, the CLI's KeyboardInterrupt); the loop
    treats them as a stop request."""

    def status(self, text: str) -> None:
        """A phase change ("caching latents", "saving") in words."""

    def step(self, info: StepInfo) -> None:
        """Called after every optimizer step."""

    def preview(self, step: int, image: Image.Image) -> None:
        """A sample image made during training."""

    def should_stop(self) -> bool:
        """True when the user asked to cancel; checked every step."""
        return False


class NullSink:
    """Logs phases and does nothing else."""

    def status(self, text: str) -> None:
        log.info(text)

    def step(self, info: StepInfo) -> None:
        log.debug("step %d/%d loss %.4f", info.step, info.total, info.loss)

    def preview(self, step: int, image: Image.Image) -> None:
        pass

    def should_stop(self) -> bool:
        return False
