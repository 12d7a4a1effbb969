"""Rectified flow (Flux, SD3.5, Z-Image, Lumina 2, Qwen-Image, Chroma): noising, target, σ sampling, sampler sigmas.

x_σ = (1−σ)·x0 + σ·ε and the network predicts the velocity v = ε − x0 (docs/families.md §1.2). Training draws u in
(0, 1) from a density (diffusers' `compute_density_for_timestep_sampling`: uniform or logit-normal, as SD3's paper and
kohya's `sigmoid` sampling do) and then applies the model's time shift σ = α·u/(1+(α−1)·u) — inside a host the bundle
asks the host's own model_sampling for that shift (ComfyUI's ModelSamplingFlux/DiscreteFlow, or a user's shift node).
"""

from __future__ import annotations

import torch

TIMESTEP_SAMPLINGS = ("logit_normal", "uniform")
SIGMA_MIN = 1e-3  # σ is bounded away from 0 and 1: the velocity of a clean or pure-noise input is ill-posed


def draw_u(n: int, generator: torch.Generator, sampling: str) -> torch.Tensor:
    """u ∈ (0, 1) per sample, on the CPU (device-independent draws): `logit_normal` = sigmoid(N(0, 1)), or `uniform`."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    if sampling not in TIMESTEP_SAMPLINGS:
        msg = f"timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLINGS)} (got {sampling!r})"
        raise ValueError(msg)
    scheme = "logit_normal" if sampling == "logit_normal" else "none"
    u = compute_density_for_timestep_sampling(scheme, n, logit_mean=0.0, logit_std=1.0, generator=generator)
    return u.clamp(SIGMA_MIN, 1.0 - SIGMA_MIN)


def time_shift(u: torch.Tensor, alpha: float) -> torch.Tensor:
    """σ = α·u / (1 + (α−1)·u): ComfyUI's `time_snr_shift`, diffusers' FlowMatch `shift` (α = e^μ for Flux's μ)."""
    return alpha * u / (1 + (alpha - 1) * u)


def add_flow_noise(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = sigmas.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def sampler_sigmas(steps: int, shift: object) -> torch.Tensor:
    """steps+1 decreasing sigmas from 1 to 0 for an Euler sampler, shifted like training (`shift`: u → σ)."""
    u = torch.linspace(1.0, 0.0, steps + 1)
    return torch.cat([shift(u[:-1]), torch.zeros(1)])  # type: ignore[operator]
