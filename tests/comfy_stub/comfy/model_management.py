"""Stand-in for comfy/model_management.py (ComfyUI 0.12.3): loading bookkeeping and the interrupt flag."""

import os
import threading

import torch

current_loaded_models = []
load_calls = []  # (models, memory_required, force_full_load), for assertions
empty_cache_calls = 0


class InterruptProcessingException(Exception):
    pass


interrupt_processing_mutex = threading.RLock()
interrupt_processing = False


def interrupt_current_processing(value=True):
    global interrupt_processing
    with interrupt_processing_mutex:
        interrupt_processing = value


def processing_interrupted():
    with interrupt_processing_mutex:
        return interrupt_processing


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    with interrupt_processing_mutex:
        if interrupt_processing:
            interrupt_processing = False
            raise InterruptProcessingException()


FREE_MEMORY = None  # tests set bytes here; None: the machine's available RAM, as 0.12.3 reports for the CPU


def _available_ram():
    """psutil.virtual_memory().available, which 0.12.3 reports for the CPU: MemAvailable (free + reclaimable)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def get_free_memory(dev=None, torch_free_too=False):
    free = FREE_MEMORY if FREE_MEMORY is not None else _available_ram()
    return (free, free) if torch_free_too else free


def get_torch_device():
    return torch.device("cpu")


def intermediate_device():
    return torch.device("cpu")


def unet_offload_device():
    return torch.device("cpu")


def free_memory(memory_required, device, keep_loaded=[], for_dynamic=False, ram_required=0):  # noqa: B006 - as upstream
    unloaded = [m for m in current_loaded_models if m not in keep_loaded]
    for m in unloaded:
        current_loaded_models.remove(m)
    return unloaded


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    load_calls.append((list(models), memory_required, force_full_load))
    for m in models:
        if m.is_dynamic():
            assert not force_full_load, "ModelPatcherDynamic.load asserts not full_load"
        for other in [x for x in current_loaded_models if x is not m and m.is_clone(x)]:
            current_loaded_models.remove(other)  # a clone replaces its siblings, as upstream
        if m not in current_loaded_models:
            m.patch_model(m.load_device)
            current_loaded_models.insert(0, m)


def load_model_gpu(model):
    return load_models_gpu([model])


def unload_all_models():
    free_memory(1e30, get_torch_device())


def soft_empty_cache(force=False):
    global empty_cache_calls
    empty_cache_calls += 1
