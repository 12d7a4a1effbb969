"""Pure functions of (step, config): the DDPM noise schedule, loss targets and weights, and learning-rate schedules."""

from __future__ import annotations

import math

import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012  # SD1/SD2/SDXL "scaled_linear" schedule (sd-scripts, diffusers)


def scaled_linear_alphas_cumprod(steps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """ᾱ_t of Stable Diffusion's scaled-linear schedule, float32 [steps]."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·ε."""
    a = alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def target_for(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
               alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The regression target: ε, or v = √ᾱ·ε − √(1-ᾱ)·x0."""
    if prediction_type == "epsilon":
        return noise
    a = alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def snr(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.to(t.device)[t]
    return a / (1 - a)


def min_snr_weight(t: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weight per sample: min(SNR,γ)/SNR for ε, min(SNR,γ)/(SNR+1) for v (arXiv 2303.09556)."""
    s = snr(t, alphas_cumprod)
    clipped = torch.clamp(s, max=gamma)
    return clipped / (s + 1) if prediction_type == "v_prediction" else clipped / s


LR_SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_restarts")


def lr_factor(step: int, *, scheduler: str, warmup_steps: int, total_steps: int, num_cycles: int = 1) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based): linear warmup, then the schedule."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if scheduler == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if scheduler == "linear":
        return max(0.0, 1.0 - progress)
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if scheduler == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0)))
    msg = f"unknown lr_scheduler {scheduler!r}; choose one of {', '.join(LR_SCHEDULERS)}"
    raise ValueError(msg)
