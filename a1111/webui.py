"""Everything LoRA Loop reads or calls in the webui (AUTOMATIC1111 v1.10.1 / Forge), in one place.

The webui's `modules` package is importable only inside the webui process, so every import here happens inside a
function: importing `loraloop.a1111` never touches the webui (the ComfyUI pack and the CLI import it safely). The
built-in Lora extension is reached through its top-level `networks` module (extensions-builtin/Lora/networks.py),
which the webui has imported before any extension tab is built.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

JOB_NAME = "loraloop-train"


def shared() -> ModuleType:
    from modules import shared as webui_shared

    return webui_shared


def sd_model() -> Any:
    """The loaded model; like the webui's own jobs, this loads the selected checkpoint when none is loaded yet."""
    return shared().sd_model


def loaded_model() -> Any:
    """The loaded model, or None, without loading one (for labels built before anything ran)."""
    try:
        from modules import sd_models

        return sd_models.model_data.sd_model
    except Exception:
        return None


def state() -> Any:
    return shared().state


def opts() -> Any:
    return shared().opts


def option(name: str, default: Any = None) -> Any:
    try:
        return getattr(opts(), name)
    except AttributeError:
        return default


def cmd_opts() -> Any:
    return shared().cmd_opts


def compute_device() -> torch.device:
    from modules import devices

    return torch.device(devices.device)


def autocast_active(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4 (the webui ships 2.1): no device argument
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def autocast(device_type: str = "cuda") -> contextlib.AbstractContextManager:
    """The webui's inference autocast (`devices.autocast()`: fp16 models on CUDA), unless one is already active."""
    if autocast_active(device_type):
        return contextlib.nullcontext()
    from modules import devices

    return devices.autocast()


def torch_gc() -> None:
    from modules import devices

    devices.torch_gc()


def is_forge() -> bool:
    """Forge is recognised by its own package (modules_forge) or the objects it puts on the model."""
    if "modules_forge" in sys.modules:
        return True
    try:
        import importlib.util

        return importlib.util.find_spec("modules_forge") is not None
    except (ImportError, ValueError):
        return False


# -- folders ----------------------------------------------------------------------------------------------------------
def lora_dir() -> Path:
    """`--lora-dir` (added by the built-in Lora extension's preload.py), else <models>/Lora as that extension does."""
    folder = getattr(cmd_opts(), "lora_dir", None)
    if not folder:
        from modules import paths

        return Path(paths.models_path) / "Lora"
    return Path(folder)


def work_dir() -> Path:
    """Where logs, the effective config, resumable state and samples go: <webui outputs>/loraloop."""
    try:
        from modules import paths_internal

        base = getattr(paths_internal, "default_output_dir", None) or Path(paths_internal.data_path) / "outputs"
    except ImportError:
        base = "outputs"
    return Path(base) / "loraloop"


def checkpoint_file(model: Any) -> str | None:
    info = getattr(model, "sd_checkpoint_info", None)
    filename = getattr(info, "filename", None) or getattr(model, "sd_model_checkpoint", None)
    return str(filename) if filename else None


def checkpoint_name(model: Any) -> str:
    """`ss_sd_model_name`: the checkpoint's file name, as kohya writes it."""
    filename = checkpoint_file(model)
    if filename:
        return Path(filename).name
    info = getattr(model, "sd_checkpoint_info", None)
    return str(getattr(info, "title", None) or "webui model")


# -- the job queue -----------------------------------------------------------------------------------------------------
def wrap_gpu_call(func: Callable, extra_outputs: list | None = None) -> Callable:
    """`modules.call_queue.wrap_gradio_gpu_call`: the queue lock txt2img holds, state.begin/end, progress tracking."""
    from modules import call_queue

    return call_queue.wrap_gradio_gpu_call(func, extra_outputs=extra_outputs)


@contextlib.contextmanager
def queued_job(job: str = JOB_NAME) -> Iterator[None]:
    """For the HTTP API: the same queue lock and state bookkeeping as the webui's own API routes (api.py)."""
    from modules import call_queue

    with call_queue.queue_lock:
        st = state()
        st.begin(job=job)
        try:
            yield
        finally:
            st.end()
            st.interrupted = False
            st.skipped = False
            st.job_count = 0
            st.job = ""


@contextlib.contextmanager
def training_attention() -> Iterator[bool]:
    """Like the webui's embedding/hypernetwork trainers: without Settings → Training → "Use cross attention
    optimizations while training", the attention optimisation is undone for the run and re-applied afterwards."""
    if option("training_xattention_optimizations", False):
        yield True
        return
    from modules import sd_hijack

    sd_hijack.undo_optimizations()
    try:
        yield False
    finally:
        sd_hijack.apply_optimizations()


# -- the built-in Lora extension ---------------------------------------------------------------------------------------
def lora_extension() -> ModuleType | None:
    """extensions-builtin/Lora/networks.py (Forge: sd_forge_lora's), or None when the extension is off."""
    module = sys.modules.get("networks")
    if module is None:
        try:
            import networks as module  # type: ignore[import-not-found, no-redef]
        except ImportError:
            return None
    if not hasattr(module, "loaded_networks") or not hasattr(module, "list_available_networks"):
        return None
    return module


def clear_applied_networks(model: nn.Module) -> list[str]:
    """Take every LoRA the last generation applied out of the model, so training sees the clean base weights.

    `load_networks([])` empties `loaded_networks`; the weights themselves are only restored lazily by the next
    forward, so every layer holding a backup gets it copied back now and its `network_current_names` reset (the state
    `network_apply_weights` leaves when no network is wanted). The backup itself stays, as the webui keeps it.
    Returns the names that were applied.
    """
    networks = lora_extension()
    if networks is None:
        return []
    names = [getattr(n, "name", "?") for n in networks.loaded_networks]
    try:
        networks.load_networks([])
    except Exception as err:
        log.warning("LoRA Loop: networks.load_networks([]) failed (%s); clearing loaded_networks directly", err)
        networks.loaded_networks.clear()
    restore = getattr(networks, "network_restore_weights_from_backup", None)
    with torch.no_grad():  # the webui restores inside its no_grad forward; the weights may require grad
        for module in model.modules():
            has_backup = (getattr(module, "network_weights_backup", None) is not None
                          or getattr(module, "network_bias_backup", None) is not None)
            if has_backup and restore is not None:
                restore(module)
            if getattr(module, "network_current_names", ()):
                module.network_current_names = ()
    if names:
        log.info("LoRA Loop: removed the applied networks %s before training", names)
    return names


def refresh_networks() -> bool:
    """Rescan `--lora-dir` (networks.list_available_networks) so `<lora:name>` and the Lora tab see new files."""
    networks = lora_extension()
    if networks is None:
        return False
    networks.list_available_networks()
    return True


# -- the interrogators (img2img's "Interrogate CLIP" / "Interrogate DeepBooru") ---------------------------------------
def interrogate_clip(image: Any) -> str:
    """`shared.interrogator.interrogate(pil)` as modules/ui.py `interrogate()` calls it: a BLIP sentence plus
    CLIP-ranked terms. The webui loads BLIP/CLIP itself (fetching them on first use, as its own button does), runs
    the call as a job, and appends "<error>" to the text instead of raising when something fails."""
    interrogator = getattr(shared(), "interrogator", None)
    if interrogator is None:
        raise AttributeError("shared.interrogator is not set up in this webui")
    return interrogator.interrogate(image.convert("RGB"))


def interrogate_deepbooru(image: Any) -> str:
    """`modules.deepbooru.model.tag(pil)` as modules/ui.py `interrogate_deepbooru()` calls it: danbooru tags over the
    "deepbooru: score threshold" setting, formatted by the webui's deepbooru settings (spaces, escaped brackets)."""
    from modules import deepbooru

    return deepbooru.model.tag(image)


# By the ids `captions.INTERROGATORS` gives the tab's "Caption with" choices.
INTERROGATORS: dict[str, Callable[[Any], str]] = {"clip": interrogate_clip, "deepbooru": interrogate_deepbooru}


@contextlib.contextmanager
def gpu_queue() -> Iterator[None]:
    """The queue lock txt2img and training hold (`call_queue.queue_lock`), without a job of its own: the CLIP
    interrogator begins and ends one per image itself. `state.interrupted` is cleared on the way in and out, as the
    webui's own job wrapper does, so an Interrupt clicked earlier does not stop this at once."""
    from modules import call_queue

    with call_queue.queue_lock:
        state().interrupted = False
        try:
            yield
        finally:
            state().interrupted = False
