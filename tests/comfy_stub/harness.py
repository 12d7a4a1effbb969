"""Test harness: puts the stand-in on sys.path and runs nodes the way ComfyUI's executor does."""

import shutil
import sys
from pathlib import Path

import torch

STUB = Path(__file__).resolve().parent
if str(STUB) not in sys.path:
    sys.path.insert(0, str(STUB))

import comfy.model_management as mm  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
import server  # noqa: E402

DEMO = STUB.parent.parent / "cli" / "demo" / "dataset"
FAST = {"resolution": 64, "enable_bucket": False, "min_bucket_reso": 64, "max_bucket_reso": 64, "max_train_steps": 3, "learning_rate": 1e-3,
        "mixed_precision": "auto", "gradient_checkpointing": False, "lr_scheduler": "constant"}


def setup_host(tmp_path: Path, dataset: str | None = "style") -> Path:
    """A fresh ComfyUI layout under tmp_path (input/, output/, models/loras/), the demo dataset copied in."""
    base = tmp_path / "comfyui"
    folder_paths.set_base(base)
    server.PromptServer()
    comfy.utils.set_progress_bar_global_hook(comfy.utils.default_hook)
    comfy.utils.updates.clear()
    mm.interrupt_current_processing(False)
    mm.load_calls.clear()
    mm.current_loaded_models.clear()
    mm.FREE_MEMORY = None
    if dataset:
        shutil.copytree(DEMO, base / "input" / dataset)
    return base


def run_node(node: type, unique_id: str = "7", prompt: dict | None = None, **inputs):
    """Execute like execution.py: a class clone with the hidden values, the whole call under inference mode."""
    clone = node.PREPARE_CLASS_CLONE({"unique_id": unique_id, "prompt": prompt})
    with torch.inference_mode():
        return clone.execute(**inputs)


def snapshot(module: torch.nn.Module) -> dict:
    """name → (Parameter object, exact copy of its value) for a bit-identity check afterwards."""
    with torch.inference_mode():
        return {n: (p, p.detach().clone()) for n, p in module.named_parameters()}


def assert_unchanged(module: torch.nn.Module, snap: dict) -> None:
    now = dict(module.named_parameters())
    assert set(now) == set(snap), "parameter names changed (an adapter was left behind?)"
    for name, (obj, value) in snap.items():
        assert now[name] is obj, f"{name}: not the original Parameter object"
        assert now[name].is_inference() == obj.is_inference()
        assert torch.equal(now[name], value), f"{name}: values changed"
