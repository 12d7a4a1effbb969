"""The run-time memory levers the OOM ladder pulls, each a small function acting on live training objects.

None of them changes which samples a step sees or the order of steps: chunking and checkpointing change nothing in
the maths; caches reproduce the same latents/conditioning; a bucket cap and a lower rank approximate (and are logged).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ...bundle import SizeInfo
from ...network import ADAPTER

log = logging.getLogger(__name__)


# -- bucket cap ---------------------------------------------------------------------------------------------------
def downscale_latents(latents: torch.Tensor, sizes: list[SizeInfo], max_area: int, multiple: int
                      ) -> tuple[torch.Tensor, list[SizeInfo]]:
    """Latents [B,C,h,w] shrunk (area-averaged) so that h·w ≤ max_area, sides a multiple of `multiple`.

    The SDXL size conditioning keeps the original size and gets the new target size, as for a smaller bucket.
    """
    h, w = latents.shape[-2:]
    if h * w <= max_area:
        return latents, sizes
    scale = math.sqrt(max_area / (h * w))
    nh = max(multiple, int(h * scale) // multiple * multiple)
    nw = max(multiple, int(w * scale) // multiple * multiple)
    small = F.interpolate(latents.float(), size=(nh, nw), mode="area").to(latents.dtype)
    return small, [replace(s, target=(nh * 8, nw * 8)) for s in sizes]


def cap_batches(batches: object, max_area: int, multiple: int) -> Callable[[], None]:
    """Make `batches.micro_batch` return latents no larger than `max_area` latent pixels; returns the undo."""
    had_own = "micro_batch" in vars(batches)
    original = vars(batches)["micro_batch"] if had_own else batches.micro_batch  # type: ignore[attr-defined]
    base = getattr(original, "__wrapped__", original)

    def capped(epoch: int, batch_index: int):  # noqa: ANN202 - MicroBatch
        micro = base(epoch, batch_index)
        if micro.captions:  # a rank's slice of a small global micro-batch may be empty
            micro.latents, micro.sizes = downscale_latents(micro.latents, micro.sizes, max_area, multiple)
        return micro

    capped.__wrapped__ = base  # type: ignore[attr-defined]
    batches.micro_batch = capped  # type: ignore[attr-defined]

    def undo() -> None:
        if had_own and original is not base:
            batches.micro_batch = original  # type: ignore[attr-defined]
        elif "micro_batch" in vars(batches):
            del batches.micro_batch  # type: ignore[attr-defined]

    return undo


def unet_multiple(unet: nn.Module) -> int:
    """Latent sides must be a multiple of 2^(levels−1) for the UNet's down/up sampling."""
    config = getattr(unet, "config", None)
    channels = getattr(config, "block_out_channels", None) if config is not None else None
    return 2 ** (len(channels) - 1) if channels else 8


# -- rank ---------------------------------------------------------------------------------------------------------
def lora_layers(root: nn.Module) -> list[nn.Module]:
    """peft LoRA layers (they carry `lora_A`/`lora_B` module dicts) inside `root`."""
    return [m for m in root.modules() if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and
            ADAPTER in m.lora_A]


def _like(template: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A bias-free copy of a Linear/Conv2d `template` with `weight` (its in/out sizes come from the weight)."""
    if isinstance(template, nn.Conv2d):
        layer = nn.Conv2d(weight.shape[1], weight.shape[0], template.kernel_size, template.stride, template.padding,
                          bias=False, device="meta")
    else:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(weight.contiguous(), requires_grad=True)
    return layer


def shrink_rank(layer: nn.Module, rank: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Replace one LoRA layer's A/B by the best rank-`rank` approximation of its update (truncated SVD), with the
    same alpha. Returns (old params, new params).

    A's rows keep the old rows' typical norm, so directions with a zero singular value still get gradients (B is zero
    there, exactly as after peft's initialisation).
    """
    a_mod, b_mod = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
    a, b = a_mod.weight, b_mod.weight
    old_scale = float(layer.scaling[ADAPTER])
    alpha = old_scale * layer.r[ADAPTER]
    with torch.no_grad():
        a2 = a.detach().float().reshape(a.shape[0], -1)
        b2 = b.detach().float().reshape(b.shape[0], -1)
        u, s, vh = torch.linalg.svd(old_scale * (b2 @ a2), full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
        row_norm = a2.norm(dim=1).mean().clamp_min(1e-8)
        new_scale = alpha / rank
        new_a = (vh * row_norm).reshape(rank, *a.shape[1:]).to(a.dtype)
        new_b = (u * (s / row_norm / new_scale)).reshape(b.shape[0], rank, *b.shape[2:]).to(b.dtype)
    layer.lora_A[ADAPTER] = _like(a_mod, new_a)
    layer.lora_B[ADAPTER] = _like(b_mod, new_b)
    layer.r[ADAPTER] = rank
    layer.scaling[ADAPTER] = new_scale
    return [a, b], [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]


def shrink_network_rank(roots: list[nn.Module], rank: int, optimizer: torch.optim.Optimizer,
                        params: list[nn.Parameter]) -> int:
    """Lower every LoRA layer above `rank` to `rank`, swapping the parameters in `optimizer` (their state restarts)
    and in the loop's `params` list in place. Returns the number of layers changed."""
    swapped: dict[int, nn.Parameter] = {}
    changed = 0
    for root in roots:
        for layer in lora_layers(root):
            if layer.r[ADAPTER] <= rank:
                continue
            old, new = shrink_rank(layer, rank)
            swapped.update({id(o): n for o, n in zip(old, new, strict=True)})
            changed += 1
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in swapped:
                optimizer.state.pop(p, None)
        group["params"] = [swapped.get(id(p), p) for p in group["params"]]
    params[:] = [swapped.get(id(p), p) for p in params]
    return changed


# -- optimizer ----------------------------------------------------------------------------------------------------
def swap_optimizer(optimizer: torch.optim.Optimizer, name: str) -> torch.optim.Optimizer:
    """A new optimizer `name` over the same parameter groups and hyper-parameters (its state starts empty)."""
    from ...optim import build_optimizer

    groups = [{k: v for k, v in g.items() if k in ("params", "lr", "name", "weight_decay")}
              for g in optimizer.param_groups]
    first = optimizer.param_groups[0]
    return build_optimizer(name, groups, first["lr"], first.get("weight_decay", 0.0))


# -- encoders -----------------------------------------------------------------------------------------------------
def offload(modules: list[nn.Module], device: torch.device | str = "cpu") -> Callable[[], None]:
    """Move `modules` to `device`; returns the undo that moves each back where it was."""
    homes = []
    for module in modules:
        first = next(module.parameters(), None)
        homes.append(None if first is None else first.device)
        module.to(device)

    def undo() -> None:
        for module, home in zip(modules, homes, strict=True):
            if home is not None:
                module.to(home)

    return undo


def release_memory() -> None:
    """Return cached blocks to the driver after an OOM so the next try starts from a clean allocator."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
