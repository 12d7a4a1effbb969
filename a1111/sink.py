"""`WebuiSink`: the engine's ProgressSink on the webui's progress state, and `LiveStatus`, what the tab polls.

The webui's progress bar (`/internal/progress`, javascript/progressbar.js) shows `job_no / job_count`, the one-line
`textinfo` and, as the live preview, `state.current_image` (set through `assign_current_image`). Cancel is the
webui's own interrupt flag (`state.interrupt()`, also set by the Interrupt button and POST /sdapi/v1/interrupt).
The loss curve has no place in that protocol, so the tab reads it from `LIVE` while a run is going.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..trainer.progress import StepInfo
from ..trainer.units import fmt_eta

log = logging.getLogger(__name__)


@dataclass
class LiveStatus:
    """The running job as the tab shows it; one per process (only one job runs at a time: the queue lock)."""

    running: bool = False
    name: str = ""
    text: str = "idle"
    step: int = 0
    total: int = 0
    losses: list[float] = field(default_factory=list)
    preview: Image.Image | None = None
    started: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def start(self, name: str) -> None:
        with self.lock:
            self.running, self.name, self.text, self.step, self.total = True, name, "starting", 0, 0
            self.losses = []
            self.preview = None
            self.started = time.time()

    def finish(self, text: str) -> None:
        with self.lock:
            self.running = False
            self.text = text

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"running": self.running, "name": self.name, "text": self.text, "step": self.step,
                    "total": self.total, "losses": list(self.losses),
                    "last_loss": self.losses[-1] if self.losses else None,
                    "elapsed": time.time() - self.started if self.started else 0.0}


LIVE = LiveStatus()


class WebuiSink:
    """Reports one training run to `shared.state` (progress bar, text, live preview, interrupt) and to `live`."""

    def __init__(self, state: Any, live: LiveStatus = LIVE) -> None:
        self.state = state
        self.live = live

    def begin(self, total_steps: int) -> None:
        self.state.job_count = total_steps
        self.state.job_no = 0
        self.state.sampling_step = 0
        self.state.sampling_steps = 0
        with self.live.lock:
            self.live.total = total_steps

    def status(self, text: str) -> None:
        log.info("LoRA Loop: %s", text)
        self.state.textinfo = text
        with self.live.lock:
            self.live.text = text

    def step(self, info: StepInfo) -> None:
        text = (f"step {info.step}/{info.total} · loss {info.loss:.4f} · lr {info.lr:.2e} · "
                f"ETA {fmt_eta(info.eta_seconds)}")
        self.state.job_count = info.total
        self.state.job_no = info.step
        self.state.textinfo = text
        with self.live.lock:
            self.live.step, self.live.total, self.live.text = info.step, info.total, text
            self.live.losses.append(info.loss)

    def preview(self, step: int, image: Image.Image) -> None:
        self.state.assign_current_image(image)
        with self.live.lock:
            self.live.preview = image

    def should_stop(self) -> bool:
        return bool(getattr(self.state, "interrupted", False))
