"""`ComfySink`: the engine's ProgressSink inside ComfyUI: progress bar, text on the node, live loss events, cancel.

Cancel (docs/hosts.md §2): the ProgressBar hook checks the interrupt flag only when it is not throttled, so
`should_stop` calls `throw_exception_if_processing_interrupted()` itself on every step. ComfyUI 0.33 also raises its
`InterruptProcessingException` from inside every op's forward (`comfy/ops.py` `run_every_op`), i.e. mid-step: the
sink declares it in `interrupt_errors`, so the engine treats it as the same stop request. Either way the engine ends
the step loop cleanly (adapters removed, the last completed step kept and saved) and the node re-raises ComfyUI's own
`InterruptProcessingException` afterwards.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from PIL import Image

from ..trainer.progress import StepInfo
from ..trainer.units import fmt_eta as _fmt_eta

log = logging.getLogger(__name__)

LOSS_EVENT = "loraloop.loss"  # web/loraloop.js draws the live chart from these
PREVIEW_MAX_SIZE = 512


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
        self.interrupt_errors = (mm.InterruptProcessingException,)
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

    def sampling_step(self, done: int, total: int) -> None:
        """Progress of the preview drawn after training (its own bar: sampling is not a training step)."""
        if done == 1 or self._bar is None or self._bar.total != total:
            self._bar = None
        self._progress(done, total)

    def preview(self, step: int, image: Image.Image) -> None:
        self._progress(step, self._bar.total if self._bar else step, ("JPEG", image, PREVIEW_MAX_SIZE))

    def should_stop(self) -> bool:
        if not self.stop_requested:
            try:
                self._mm.throw_exception_if_processing_interrupted()
            except self._mm.InterruptProcessingException:
                self.stop_requested = True
        return self.stop_requested
