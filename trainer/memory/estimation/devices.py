"""What a device can hold and how fast it trains: a literal table of common GPUs, the CPU, and free-memory queries.

Throughput model (documented in estimate.py): a step takes max(compute, memory traffic) plus a per-kernel launch cost.
The efficiencies below were fitted to published SDXL/SD1.5 LoRA speeds (docs/landscape.md §3: SDXL 1024 bs1 ≈
1.1-1.35 s/it on a 4090 and 3090 Ti, 2.4-2.8 s/it on a 3060, SD1.5 ≈ 3 it/s on a 3070 Ti): those runs are bound by
memory traffic and kernel launches far more than by tensor-core FLOPs, which is why a 4090 is barely faster than a
3090 Ti.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ...units import GIB

log = logging.getLogger(__name__)

COMPUTE_EFFICIENCY = 0.35  # share of dense tensor-core FLOPs matmul/conv/attention reach in these UNets
MEMORY_EFFICIENCY = 0.105  # share of DRAM bandwidth the memory-bound ops reach (fitted, see module doc)
LAUNCH_SECONDS = 20e-6  # per kernel: launch plus Python/dispatcher overhead of an eager UNet (fitted)
CPU_LAUNCH_SECONDS = 5e-6
# CUDA context, cuBLAS/cuDNN handles: memory the driver takes that torch's allocator never reports.
CUDA_CONTEXT_BYTES = int(0.45 * GIB)


@dataclass(frozen=True)
class DeviceSpec:
    """One device's memory and speed.

    Args:
        name: display name (the CLI's `--device` value matches it loosely).
        memory_gb: total memory (GB as vendors count it for GPUs: GiB here).
        tflops_half: dense fp16/bf16 tensor TFLOPS with fp32 accumulation (what PyTorch uses).
        tflops_fp32: fp32 TFLOPS (PyTorch's default matmul path without TF32).
        bandwidth_gbs: memory bandwidth, GB/s.
        bf16: bfloat16 is supported (Ampere and newer).
        kind: `cuda` or `cpu`.
        host_link_gbs: pinned host→device copy speed, GB/s (what block swap streams at): PCIe 4.0 x16 reaches about
            24 of its 32 nominal; PCIe 5.0 cards (H100/H200 PCIe, RTX 50) about 48.
    """

    name: str
    memory_gb: float
    tflops_half: float
    tflops_fp32: float
    bandwidth_gbs: float
    bf16: bool = True
    kind: str = "cuda"
    host_link_gbs: float = 24.0

    @property
    def launch_seconds(self) -> float:
        return CPU_LAUNCH_SECONDS if self.kind == "cpu" else LAUNCH_SECONDS

    def tflops(self, half: bool) -> float:
        return self.tflops_half if half and self.kind == "cuda" else self.tflops_fp32


# Vendor datasheet numbers (dense, no sparsity).
DEVICES: dict[str, DeviceSpec] = {
    "h200": DeviceSpec("NVIDIA H200", 141, 989, 67, 4800, host_link_gbs=48.0),
    "h100": DeviceSpec("NVIDIA H100", 80, 989, 67, 3350, host_link_gbs=48.0),
    "a100": DeviceSpec("NVIDIA A100", 80, 312, 19.5, 2039),
    "a100-40gb": DeviceSpec("NVIDIA A100 40GB", 40, 312, 19.5, 1555),
    "l40s": DeviceSpec("NVIDIA L40S", 48, 362, 91.6, 864),
    "a10": DeviceSpec("NVIDIA A10", 24, 125, 31.2, 600),
    "l4": DeviceSpec("NVIDIA L4", 24, 121, 30.3, 300),
    "t4": DeviceSpec("NVIDIA T4", 16, 65, 8.1, 320, bf16=False),
    "v100": DeviceSpec("NVIDIA V100", 16, 125, 15.7, 900, bf16=False),
    "rtx 5090": DeviceSpec("NVIDIA GeForce RTX 5090", 32, 209, 104.8, 1792, host_link_gbs=48.0),
    "rtx 4090": DeviceSpec("NVIDIA GeForce RTX 4090", 24, 165, 82.6, 1008),
    "rtx 4080": DeviceSpec("NVIDIA GeForce RTX 4080", 16, 97.5, 48.7, 717),
    "rtx 4070 ti": DeviceSpec("NVIDIA GeForce RTX 4070 Ti", 12, 80, 40.1, 504),
    "rtx 4070": DeviceSpec("NVIDIA GeForce RTX 4070", 12, 58, 29.1, 504),
    "rtx 4060 ti": DeviceSpec("NVIDIA GeForce RTX 4060 Ti", 8, 44, 22.1, 288),
    "rtx 4060": DeviceSpec("NVIDIA GeForce RTX 4060", 8, 30, 15.1, 272),
    "rtx 3090 ti": DeviceSpec("NVIDIA GeForce RTX 3090 Ti", 24, 80, 40, 1008),
    "rtx 3090": DeviceSpec("NVIDIA GeForce RTX 3090", 24, 71, 35.6, 936),
    "rtx 3080": DeviceSpec("NVIDIA GeForce RTX 3080", 10, 59.5, 29.8, 760),
    "rtx 3070 ti": DeviceSpec("NVIDIA GeForce RTX 3070 Ti", 8, 43.5, 21.7, 608),
    "rtx 3070": DeviceSpec("NVIDIA GeForce RTX 3070", 8, 40.6, 20.3, 448),
    "rtx 3060": DeviceSpec("NVIDIA GeForce RTX 3060", 12, 25.6, 12.7, 360),
    "rtx 2080 ti": DeviceSpec("NVIDIA GeForce RTX 2080 Ti", 11, 53.8, 13.4, 616, bf16=False),
    "gtx 1080 ti": DeviceSpec("NVIDIA GeForce GTX 1080 Ti", 11, 11.3, 11.3, 484, bf16=False),
    # A generic 8-core desktop: 8 × ~40 GFLOPS of AVX2 FMA, dual-channel DDR4.
    "cpu": DeviceSpec("CPU", 0, 0.32, 0.32, 40, bf16=False, kind="cpu"),
}
# A GPU we do not know: mid-range numbers (a 3070-class card) scaled to its memory only in the plan's wording.
GENERIC_GPU = DeviceSpec("unknown GPU", 8, 40, 20, 450)


def find_device(name: str) -> DeviceSpec:
    """The table entry whose key occurs in `name` (longest key first: "RTX 3090 Ti" before "RTX 3090")."""
    text = re.sub(r"\s+", " ", name.lower().replace("geforce", "")).strip()
    for key in sorted(DEVICES, key=len, reverse=True):
        if re.search(rf"(^|[^a-z0-9]){re.escape(key)}($|[^a-z0-9])", text):
            return DEVICES[key]
    known = ", ".join(sorted(DEVICES))
    log.warning("device %r is not in the speed table (%s); timing uses a generic mid-range GPU", name, known)
    return GENERIC_GPU


def with_memory(device: DeviceSpec, memory_gb: float) -> DeviceSpec:
    """`device` with another memory size (a card variant, or a budget from `--vram-gb`)."""
    from dataclasses import replace

    return replace(device, memory_gb=memory_gb)


def cpu_device() -> DeviceSpec:
    """This machine's CPU, scaled by its core count from the 8-core table entry."""
    from dataclasses import replace

    cores = os.cpu_count() or 1
    base = DEVICES["cpu"]
    return replace(base, name=f"CPU ({cores} cores)", memory_gb=host_available_bytes() / GIB,
                   tflops_fp32=base.tflops_fp32 * cores / 8, tflops_half=base.tflops_half * cores / 8)


def current_device(device: torch.device | str | None = None) -> DeviceSpec:
    """The spec of `device` (default: the first CUDA device, else the CPU)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return cpu_device()
    props = torch.cuda.get_device_properties(device)
    spec = find_device(props.name)
    bf16 = torch.cuda.is_bf16_supported()
    from dataclasses import replace

    return replace(spec, name=props.name, memory_gb=props.total_memory / GIB, bf16=bf16)


def host_available_bytes() -> int:
    """RAM the OS can give us now (MemAvailable on Linux, free pages elsewhere)."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * GIB


def free_bytes(device: torch.device | str | None = None) -> int:
    """Memory this process can still use on `device`: the driver's free memory plus what torch's caching allocator
    holds but does not use (it hands that back to us first). The host's resident models are already subtracted."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return host_available_bytes()
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + cached)
