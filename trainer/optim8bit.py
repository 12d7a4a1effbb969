"""AdamW with 8-bit optimizer state in plain torch: the `adamw8bit` fallback when bitsandbytes is not installed.

The update is torch's AdamW (decoupled weight decay, bias correction, the same lr/betas/eps/weight_decay). Only the
storage of the two moments between steps differs. For every parameter with at least `min_8bit_size` elements the
moments are kept block-wise quantised: the flat state is cut into blocks of `block_size` elements, each block keeps
its absolute maximum in fp32 and every element one byte, a code relative to that maximum. A step dequantises the
moments to fp32, does the AdamW update with the current gradient in fp32 (so the step itself never sees rounding of
this step's gradient) and quantises the new moments for storage. Smaller tensors (biases, norms, LoRA factors of tiny
layers) keep fp32 state like torch's AdamW: for them the bytes saved are few and the rounding would cost most.

Why the codes are not linear:

* Within a block the moments span orders of magnitude. A linear code (value/absmax · 127) has one step of absmax/127,
  so every element below ~1/254 of its block's maximum would be stored as zero: most of a block's small entries
  would be lost. The codes here are "companded" (as in μ-law audio): the stored byte is a power of the normalised
  value, so the spacing of the codes is fine near zero and coarser near the maximum, and the relative error stays a
  few percent over several orders of magnitude.
* First moment `exp_avg` (signed, int8): code = round(127 · sign(x) · |x|^(1/2)) with x = m / absmax in [-1, 1];
  decoded as sign(c) · (|c| / 127)² · absmax. The smallest non-zero value is absmax/127² ≈ 6e-5 · absmax.
* Second moment `exp_avg_sq` (non-negative, uint8): it is squared gradients, so its range in a block is the square of
  the gradients' range. Storing its square root r = sqrt(v) halves that range in log terms, and r is what the update
  divides by. r is then companded the same way: code = round(255 · (r / absmax)^(1/2)), decoded as
  (c / 255)² · absmax, i.e. v is stored as v^(1/4) in 255 steps: the smallest non-zero v is ~2e-10 of the block's
  largest. That matters most for the second moment: a v flushed to zero while its m is not would turn the next
  update into m / eps, a huge step; with this code that needs a gradient over 1e5× below its block's largest.

Rounding is to the nearest code and deterministic, so a run resumed from a saved state continues exactly. The price:
a change of a moment smaller than half a code step is lost in storage (with beta2 = 0.999 one step moves v by ~0.1 %),
so the stored v follows the gradients' scale in jumps; the update of the current step is still exact. On a LoRA-like
fit (tests/test_optim8bit.py) the loss stays within 5 % of AdamW's at every step; exponent 2 for both codes did as well
as or better than 1 (linear) and 3 on that fit, a small MLP and a fit with inputs over 3 orders of magnitude.

Memory: 2 bytes per element plus 2 · 4 bytes per block (≈ 25 % of AdamW's 8 bytes per element for block_size 256),
and a transient fp32 copy of one parameter's moments during its step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

BLOCK_SIZE = 256
# bitsandbytes' default too: below this, 8-bit state saves little and the fp32 state is exact.
MIN_8BIT_SIZE = 4096
# Exponents of the companding codes (see the module docstring): stored code ∝ value^(1/P).
SIGNED_POWER = 2.0
UNSIGNED_POWER = 2.0
INT8_MAX = 127
UINT8_MAX = 255
# The fp32 keys that torch's AdamW uses; our 8-bit entries use other names so that the two are never confused.
FP32_KEYS = ("exp_avg", "exp_avg_sq")
CODE_KEYS = ("exp_avg_codes", "exp_avg_scales", "exp_avg_sq_root_codes", "exp_avg_sq_root_scales")


# -- block-wise companding codes ----------------------------------------------------------------------------------
def _blocks(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """`flat` as rows of `block_size`; the last row is zero-padded (zeros never change a block's absmax)."""
    pad = (-flat.numel()) % block_size
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size)


def _safe(scales: torch.Tensor) -> torch.Tensor:
    # An all-zero block has absmax 0: divide by the smallest normal float instead, which maps every element to code 0.
    return scales.clamp(min=torch.finfo(torch.float32).tiny)


def quantize_signed(values: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes of the flattened `values`, fp32 absmax per block)."""
    blocks = _blocks(values.reshape(-1).float(), block_size)
    scales = blocks.abs().amax(dim=1)
    normalised = blocks / _safe(scales)[:, None]
    codes = (normalised.sign() * normalised.abs().pow(1.0 / SIGNED_POWER) * INT8_MAX).round()
    return codes.to(torch.int8).view(-1)[: values.numel()], scales


def dequantize_signed(codes: torch.Tensor, scales: torch.Tensor, shape: torch.Size, block_size: int
                      ) -> torch.Tensor:
    blocks = _blocks(codes.float(), block_size) / INT8_MAX
    values = blocks.sign() * blocks.abs().pow(SIGNED_POWER) * scales[:, None]
    return values.view(-1)[: codes.numel()].view(shape)


def quantize_unsigned(values: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes of the flattened non-negative `values`, fp32 max per block)."""
    blocks = _blocks(values.reshape(-1).float(), block_size)
    scales = blocks.amax(dim=1)
    normalised = (blocks / _safe(scales)[:, None]).clamp(min=0.0)
    codes = (normalised.pow(1.0 / UNSIGNED_POWER) * UINT8_MAX).round()
    return codes.to(torch.uint8).view(-1)[: values.numel()], scales


def dequantize_unsigned(codes: torch.Tensor, scales: torch.Tensor, shape: torch.Size, block_size: int
                        ) -> torch.Tensor:
    blocks = _blocks(codes.float(), block_size) / UINT8_MAX
    values = blocks.pow(UNSIGNED_POWER) * scales[:, None]
    return values.view(-1)[: codes.numel()].view(shape)


# -- the optimizer ------------------------------------------------------------------------------------------------
class AdamW8bit(torch.optim.Optimizer):
    """torch.optim.AdamW's update with block-wise 8-bit moments (see the module docstring for the codes).

    `block_size` elements share one fp32 scale; parameters with fewer than `min_8bit_size` elements keep fp32 state.
    Works for fp32/bf16/fp16 parameters on any device; the state lies on the parameter's device. The update is done
    in fp32 and written back in the parameter's dtype.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 block_size: int = BLOCK_SIZE, min_8bit_size: int = MIN_8BIT_SIZE) -> None:
        if lr < 0.0 or eps < 0.0 or weight_decay < 0.0:
            msg = f"AdamW8bit needs lr, eps and weight_decay >= 0 (got {lr}, {eps}, {weight_decay})"
            raise ValueError(msg)
        if not all(0.0 <= b < 1.0 for b in betas):
            msg = f"AdamW8bit needs betas in [0, 1) (got {betas})"
            raise ValueError(msg)
        if block_size < 1:
            msg = f"AdamW8bit needs block_size >= 1 (got {block_size})"
            raise ValueError(msg)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "block_size": block_size,
                    "min_8bit_size": min_8bit_size}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict) -> None:
        if param.grad.is_sparse:
            msg = "AdamW8bit does not support sparse gradients"
            raise RuntimeError(msg)
        state = self.state[param]
        if not state:
            self._init_state(param, state, group)
        grad = param.grad.float()
        exp_avg, exp_avg_sq = self._read_moments(param, state, group)
        state["step"] += 1
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        # The same operations, in the same order, as torch's single-tensor AdamW: with fp32 state and fp32
        # parameters the result is torch's to the last bit.
        weights = param.float()  # a copy for bf16/fp16 params; fp32 params are updated in place
        weights.mul_(1.0 - lr * group["weight_decay"])
        exp_avg.lerp_(grad, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        step_size = lr / (1.0 - beta1 ** state["step"])
        denom = (exp_avg_sq.sqrt() / (1.0 - beta2 ** state["step"]) ** 0.5).add_(eps)
        weights.addcdiv_(exp_avg, denom, value=-step_size)
        if weights is not param:
            param.copy_(weights)
        self._write_moments(state, exp_avg, exp_avg_sq, group)

    @staticmethod
    def _init_state(param: torch.Tensor, state: dict, group: dict) -> None:
        state["step"] = 0
        zeros = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.preserve_format)
        if param.numel() < group["min_8bit_size"]:
            state["exp_avg"], state["exp_avg_sq"] = zeros, zeros.clone()
            return
        AdamW8bit._store_codes(state, zeros, zeros, group["block_size"])

    @staticmethod
    def _read_moments(param: torch.Tensor, state: dict, group: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (exp_avg, exp_avg_sq) to update: the stored fp32 tensors themselves, or decoded copies."""
        if "exp_avg" in state:
            return state["exp_avg"], state["exp_avg_sq"]
        size = group["block_size"]
        exp_avg = dequantize_signed(state["exp_avg_codes"], state["exp_avg_scales"], param.shape, size)
        root = dequantize_unsigned(state["exp_avg_sq_root_codes"], state["exp_avg_sq_root_scales"], param.shape, size)
        return exp_avg, root.square_()

    @staticmethod
    def _write_moments(state: dict, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, group: dict) -> None:
        if "exp_avg" in state:
            return  # fp32 state was updated in place
        AdamW8bit._store_codes(state, exp_avg, exp_avg_sq, group["block_size"])

    @staticmethod
    def _store_codes(state: dict, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, block_size: int) -> None:
        state["exp_avg_codes"], state["exp_avg_scales"] = quantize_signed(exp_avg, block_size)
        root_codes, root_scales = quantize_unsigned(exp_avg_sq.sqrt(), block_size)
        state["exp_avg_sq_root_codes"], state["exp_avg_sq_root_scales"] = root_codes, root_scales

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader, then each state entry put back exactly as saved (only moved to its parameter's device).

        torch casts every loaded state tensor to its parameter's dtype: that would turn our int8/uint8 codes into
        floats and round the fp32 scales and fp32 moments of bf16/fp16 parameters, so a resumed run would diverge.
        """
        super().load_state_dict(state_dict)
        for param, saved in zip(self._params(self.param_groups), _saved_states(state_dict), strict=True):
            if saved is None:
                continue
            self.state[param] = {key: value.to(param.device, copy=True) if isinstance(value, torch.Tensor) else value
                                 for key, value in saved.items()}

    @staticmethod
    def _params(groups: list[dict]) -> Iterator[torch.Tensor]:
        for group in groups:
            yield from group["params"]


def _saved_states(state_dict: dict[str, Any]) -> Iterator[dict | None]:
    """The saved state of each parameter in parameter order (torch matches saved ids to parameters by order)."""
    for group in state_dict["param_groups"]:
        for index in group["params"]:
            yield state_dict["state"].get(index)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors of an optimizer's state (for memory checks and reports)."""
    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for value in state.values() if isinstance(value, torch.Tensor))
