"""Optimizer registry: a literal dict; optional packages are imported only when chosen, with an install hint."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable

import torch

from .errors import ConfigError, MissingDependencyError

ParamGroups = list[dict]


def _adamw(groups: ParamGroups, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # foreach=True is faster on many small adapter tensors; fused is CUDA-only on older torch builds.
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, foreach=True)


def _adamw8bit(groups: ParamGroups, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    bnb = _require("bitsandbytes", "bitsandbytes", "adamw8bit")
    return bnb.optim.AdamW8bit(groups, lr=lr, weight_decay=weight_decay)


def _prodigy(groups: ParamGroups, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    prodigyopt = _require("prodigyopt", "prodigyopt", "prodigy")
    # Prodigy estimates the step size itself; lr is a multiplier, 1.0 is the documented default.
    return prodigyopt.Prodigy(groups, lr=lr, weight_decay=weight_decay, safeguard_warmup=True, use_bias_correction=True)


def _lion(groups: ParamGroups, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    lion_pytorch = _require("lion_pytorch", "lion-pytorch", "lion")
    return lion_pytorch.Lion(groups, lr=lr, weight_decay=weight_decay)


OPTIMIZERS: dict[str, Callable[[ParamGroups, float, float], torch.optim.Optimizer]] = {
    "adamw": _adamw, "adamw8bit": _adamw8bit, "prodigy": _prodigy, "lion": _lion,
}


def _require(module: str, package: str, choice: str):  # noqa: ANN202 - a module
    if importlib.util.find_spec(module) is None:
        msg = f"optimizer `{choice}` needs the package {package}; install it with `pip install {package}` or use adamw"
        raise MissingDependencyError(msg)
    return importlib.import_module(module)


def available() -> dict[str, bool]:
    """Which optimizers can be used right now (for UIs and the planner)."""
    mods = {"adamw": None, "adamw8bit": "bitsandbytes", "prodigy": "prodigyopt", "lion": "lion_pytorch"}
    return {k: m is None or importlib.util.find_spec(m) is not None for k, m in mods.items()}


def build_optimizer(name: str, groups: Iterable[dict], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        msg = f"`optimizer` must be one of {list(OPTIMIZERS)} (got {name!r})"
        raise ConfigError(msg, key="optimizer", value=name, allowed=tuple(OPTIMIZERS))
    return OPTIMIZERS[name](list(groups), lr, weight_decay)
