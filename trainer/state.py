"""Full training state for `--resume`: adapter weights, optimizer, scheduler, loss scaler, step and loss history.

Data order and noise are functions of (seed, epoch, batch index), so they need no saved RNG state: a resumed run
continues exactly where the saved one stopped. The state refuses to load into a different network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .errors import LoraFileError
from .lorafile import atomic_write
from .network import Network

STATE_VERSION = 1
OPTIMIZER_CLASS = "_optimizer_class"  # recorded beside the config keys
# Keys whose change makes a saved state meaningless for this run.
STRUCTURAL_KEYS = ("network_type", "lora_rank", "lora_alpha", "conv_rank", "conv_alpha", "target_modules",
                   "train_text_encoder", "optimizer", "batch_size", "accumulation_steps", "seed")


@dataclass
class TrainState:
    step: int
    losses: list[float]
    adapter: dict[str, torch.Tensor]  # kohya-layout, float32
    optimizer: dict
    scheduler: dict
    scaler: dict
    config: dict

    @classmethod
    def capture(cls, network: Network, optimizer: torch.optim.Optimizer, scheduler: object, scaler: object,
                step: int, losses: list[float], config: TrainConfig) -> TrainState:
        """A snapshot on the CPU: it holds no accelerator memory and later steps do not change it."""
        # The optimizer's class too: `adamw8bit` is bitsandbytes' or ours (optim.py), whose states differ.
        recorded = {**config.to_dict(), OPTIMIZER_CLASS: _class_name(optimizer)}
        return cls(step, list(losses), network.state_dict(torch.float32), _on_cpu(optimizer.state_dict()),
                   scheduler.state_dict(), scaler.state_dict(), recorded)  # type: ignore[attr-defined]

    def apply(self, network: Network, optimizer: torch.optim.Optimizer, scheduler: object, scaler: object) -> int:
        """Load into a freshly built network/optimizer; return the step to continue from."""
        saved_with = self.config.get(OPTIMIZER_CLASS)
        if saved_with is not None and saved_with != _class_name(optimizer):
            msg = (f"the training state was saved by {saved_with}, but this run builds {_class_name(optimizer)} "
                   "(adamw8bit uses bitsandbytes where it is installed, else LoRA Loop's own); resume where the state "
                   "was made, install/uninstall bitsandbytes to match, or start a new run")
            raise LoraFileError(msg)
        network.load_state_dict(self.adapter)
        optimizer.load_state_dict(self.optimizer)
        _state_to_param_devices(optimizer)
        scheduler.load_state_dict(self.scheduler)  # type: ignore[attr-defined]
        scaler.load_state_dict(self.scaler)  # type: ignore[attr-defined]
        return self.step

    def check_compatible(self, config: TrainConfig, path: Path) -> None:
        now = config.to_dict()
        changed = [k for k in STRUCTURAL_KEYS if self.config.get(k) != now.get(k)]
        if changed:
            detail = ", ".join(f"{k}: {self.config.get(k)!r} → {now.get(k)!r}" for k in changed)
            msg = f"cannot resume from {path}: the run changed {detail}; restore those settings or start a new run"
            raise LoraFileError(msg, path=path)

    def save(self, path: Path) -> Path:
        payload = {"version": STATE_VERSION, "step": self.step, "losses": self.losses, "adapter": self.adapter,
                   "optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler,
                   "config": json.dumps(self.config, default=str)}
        return atomic_write(Path(path), lambda tmp: torch.save(payload, tmp), overwrite=True)

    @classmethod
    def load(cls, path: Path) -> TrainState:
        path = Path(path)
        if not path.is_file():
            msg = f"training state {path} does not exist"
            raise LoraFileError(msg, path=path)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            msg = f"{path} is not a LoRA Loop training state ({err})"
            raise LoraFileError(msg, path=path) from err
        if payload.get("version") != STATE_VERSION:
            msg = f"{path} has state version {payload.get('version')}, this LoRA Loop reads {STATE_VERSION}"
            raise LoraFileError(msg, path=path)
        return cls(payload["step"], payload["losses"], payload["adapter"], payload["optimizer"], payload["scheduler"],
                   payload["scaler"], json.loads(payload["config"]))


def _class_name(optimizer: torch.optim.Optimizer) -> str:
    return f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"


def _on_cpu(value: Any) -> Any:
    """`value` (an optimizer state dict: nested dicts/lists of tensors) with every tensor copied to the CPU.

    The copy matters on the CPU too: `Optimizer.state_dict()` returns the live state tensors, which the next steps
    would change in place.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value


def _state_to_param_devices(optimizer: torch.optim.Optimizer) -> None:
    """Move each parameter's loaded state next to it. torch's own optimizers already do this in `load_state_dict`;
    others (bitsandbytes' 8-bit ones) keep the state where it was loaded, which is the CPU. Scalars stay: AdamW keeps
    its `step` counter on the CPU unless it is capturable, and then its own loader moves it."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.device != param.device and value.dim() > 0:
                state[key] = value.to(param.device)
