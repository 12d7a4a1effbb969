"""Mirrors modules/devices.py: the compute device, dtypes, `autocast()` and `torch_gc()`.

The webui runs `--use-cpu all --no-half` here: device cpu, dtype float32, so `autocast()` is a null context exactly as
devices.autocast returns for float32 (devices.py:210-231). Tests that simulate a half-precision webui set `dtype`.
"""

import contextlib

import torch

cpu = torch.device("cpu")
device = cpu
device_interrogate = device_gfpgan = device_esrgan = device_codeformer = cpu
dtype = torch.float32
dtype_vae = torch.float32
dtype_unet = torch.float32
dtype_inference = torch.float32
unet_needs_upcast = False
fp8 = False
force_fp16 = False

gc_calls = 0  # stub-only: how many times torch_gc() ran


def torch_gc():
    global gc_calls
    gc_calls += 1
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()


def autocast(disable=False):
    if disable or force_fp16:
        return contextlib.nullcontext()
    if dtype == torch.float32 or dtype_inference == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def cond_cast_unet(tensor):
    return tensor.to(dtype_unet) if unet_needs_upcast else tensor
