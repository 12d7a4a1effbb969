"""Optimizer registry: a literal dict; optional packages are imported only when chosen, with an install hint.

`adamw8bit` is bitsandbytes' AdamW8bit when that package is installed, else our pure-torch `optim8bit.AdamW8bit`
(CPU, Mac, AMD, Windows without bitsandbytes), so it is always available; `eight_bit_backend()` says which one.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Iterable
from typing import Literal

import torch

from .errors import ConfigError, MissingDependencyError
from .optim8bit import AdamW8bit

log = logging.getLogger(__name__)

ParamGroups = list[dict]
EightBitBackend = Literal["bitsandbytes", "torch"]
_announced: set[str] = set()  # the 8-bit backends already named in the log (once per process each)


def _adamw(groups: ParamGroups, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # foreach=True is faster on many small adapter tensors; fused is CUDA-only on older torch builds.
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, foreach=True)


def _adamw8bit(groups: ParamGroups, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if eight_bit_backend() == "bitsandbytes":
        try:
            bnb = importlib.import_module("bitsandbytes")
        except Exception as err:
            # A broken install of an optional extra (wrong CUDA build, missing native library) should not end the
            # run: the torch implementation trains the same way.
            log.warning("bitsandbytes is installed but does not import (%s); using the torch 8-bit AdamW", err)
        else:
            _announce("bitsandbytes")
            return bnb.optim.AdamW8bit(groups, lr=lr, weight_decay=weight_decay)
    _announce("torch")
    return AdamW8bit(groups, lr=lr, weight_decay=weight_decay)


def eight_bit_backend() -> EightBitBackend:
    """Which implementation `adamw8bit` uses here: bitsandbytes' when it is installed, else ours in plain torch."""
    return "bitsandbytes" if importlib.util.find_spec("bitsandbytes") is not None else "torch"


def _announce(backend: EightBitBackend) -> None:
    if backend not in _announced:
        _announced.add(backend)
        log.info("optimizer adamw8bit: using %s", "bitsandbytes' AdamW8bit" if backend == "bitsandbytes"
                 else "the torch AdamW8bit (block-wise 8-bit state in plain torch; no bitsandbytes)")


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
    """Which optimizers can be used right now (for UIs and the planner). `adamw8bit` always can: without
    bitsandbytes it is the torch implementation (see `eight_bit_backend`)."""
    mods = {"adamw": None, "adamw8bit": None, "prodigy": "prodigyopt", "lion": "lion_pytorch"}
    return {k: m is None or importlib.util.find_spec(m) is not None for k, m in mods.items()}


def build_optimizer(name: str, groups: Iterable[dict], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        msg = f"`optimizer` must be one of {list(OPTIMIZERS)} (got {name!r})"
        raise ConfigError(msg, key="optimizer", value=name, allowed=tuple(OPTIMIZERS))
    return OPTIMIZERS[name](list(groups), lr, weight_decay)
