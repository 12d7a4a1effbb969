"""`ComfySink`: the engine's ProgressSink inside ComfyUI: progress bar, text on the node, live loss events, cancel.

Cancel (hosts.md §2): the ProgressBar hook checks the interrupt flag only when it is not throttled, so `should_stop`
calls `throw_exception_if_processing_interrupted()` itself on every step. Both turn into a stop request: the engine
then ends the step loop cleanly (adapters removed, partial result kept) and the node re-raises ComfyUI's own
`InterruptProcessingException` afterwards.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from PIL import Image

from ..trainer.progress import StepInfo

log = logging.getLogger(__name__)

LOSS_EVENT = "loraloop.loss"  # web/loraloop.js draws the live chart from these
PREVIEW_MAX_SIZE = 512


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def _server() -> Any:
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


class ComfySink:
    """Progress of one TrainLoRA run, reported to the node `node_id`."""

    def __init__(self, node_id: str | None) -> None:
        import comfy.model_management as mm

        self._mm = mm
        self.node_id = node_id
        self.stop_requested = False
        self._bar: Any = None
        self._started = time.perf_counter()
        self._event({"reset": True})

    # -- helpers --------------------------------------------------------------------------------------------------
    def _event(self, data: dict) -> None:
        server = _server()
        if server is not None:
            server.send_sync(LOSS_EVENT, {"node": self.node_id, **data}, getattr(server, "client_id", None))

    def _text(self, text: str) -> None:
        server = _server()
        if server is not None and self.node_id is not None and hasattr(server, "send_progress_text"):
            server.send_progress_text(text, self.node_id)

    def _progress(self, value: int, total: int, preview: Any = None) -> None:
        if self._bar is None:
            import comfy.utils

            try:
                self._bar = comfy.utils.ProgressBar(total, node_id=self.node_id)
            except TypeError:  # ComfyUI before ProgressBar(node_id=…)
                self._bar = comfy.utils.ProgressBar(total)
        try:
            self._bar.update_absolute(value, total, preview)
        except self._mm.InterruptProcessingException:  # the progress hook noticed Cancel first
            self.stop_requested = True

    # -- ProgressSink ---------------------------------------------------------------------------------------------
    def status(self, text: str) -> None:
        log.info("LoRA Loop: %s", text)
        self._text(text)

    def step(self, info: StepInfo) -> None:
        self._progress(info.step, info.total)
        self._text(f"step {info.step}/{info.total} · loss {info.loss:.4f} · lr {info.lr:.2e} · "
                   f"ETA {_fmt_eta(info.eta_seconds)}")
        self._event({"step": info.step, "total": info.total, "loss": info.loss, "lr": info.lr,
                     "eta": info.eta_seconds, "epoch": info.epoch})

    def preview(self, step: int, image: Image.Image) -> None:
        self._progress(step, self._bar.total if self._bar else step, ("JPEG", image, PREVIEW_MAX_SIZE))

    def should_stop(self) -> bool:
        if not self.stop_requested:
            try:
                self._mm.throw_exception_if_processing_interrupted()
            except self._mm.InterruptProcessingException:
                self.stop_requested = True
        return self.stop_requested
