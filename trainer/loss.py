"""The diffusion training loss for one micro-batch.

Noise, timesteps, target and weighting, all deterministic per step. DDPM families regress ε or v at an integer
timestep; flow families regress the velocity ε − x0 at a σ the bundle shifts as its host does (trainer/flow.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bundle import Conditioning, ModelBundle, SizeInfo
from .flow import add_flow_noise, draw_u, velocity_target
from .schedule import add_noise, min_snr_weight, target_for


@dataclass(frozen=True)
class LossSettings:
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    timestep_sampling: str = "logit_normal"  # flow families only (trainer/flow.py)


@dataclass
class NoiseDraw:
    """The random numbers of one micro-batch, drawn once so that splitting it into chunks changes nothing.

    `timesteps` are integer DDPM timesteps, or for flow families u ∈ (0, 1) before the model's shift.
    """

    noise: torch.Tensor
    timesteps: torch.Tensor

    def __getitem__(self, index: slice) -> NoiseDraw:
        return NoiseDraw(self.noise[index], self.timesteps[index])


def draw_noise(shape: torch.Size | tuple[int, ...], generator: torch.Generator, settings: LossSettings,
               num_timesteps: int, flow: bool = False) -> NoiseDraw:
    """ε ~ N(0,1) (+ noise offset per channel) and t ~ U{0..T-1} (flow: u from the timestep density), from
    `generator` on the CPU (device-independent)."""
    noise = torch.randn(shape, generator=generator)
    if settings.noise_offset:
        noise = noise + settings.noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    if flow:
        return NoiseDraw(noise, draw_u(shape[0], generator, settings.timestep_sampling))
    timesteps = torch.randint(0, num_timesteps, (shape[0],), generator=generator)
    return NoiseDraw(noise, timesteps)


def diffusion_loss(bundle: ModelBundle, latents: torch.Tensor, cond: Conditioning, draw: NoiseDraw,
                   settings: LossSettings, sizes: list[SizeInfo] | None = None) -> torch.Tensor:
    """Mean (weighted) MSE between the model's prediction and its target (ε, v or the flow velocity), in float32."""
    device = bundle.device
    x0 = latents.to(device, torch.float32)
    noise = draw.noise.to(device)
    if bundle.prediction_type == "flow":
        sigmas = bundle.shift_sigmas(draw.timesteps.to(device))  # type: ignore[attr-defined]
        pred = bundle.predict(add_flow_noise(x0, noise, sigmas), sigmas, cond, sizes)
        target = velocity_target(x0, noise)
        return _mse(pred, target).mean()
    t = draw.timesteps.to(device)
    ac = bundle.alphas_cumprod
    noisy = add_noise(x0, noise, t, ac)
    pred = bundle.predict(noisy, t, cond, sizes)
    target = target_for(bundle.prediction_type, x0, noise, t, ac)
    per_sample = _mse(pred, target)
    if settings.min_snr_gamma:
        per_sample = per_sample * min_snr_weight(t, ac, settings.min_snr_gamma, bundle.prediction_type)
    return per_sample.mean()


def _mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error."""
    err = torch.nn.functional.mse_loss(pred.float(), target, reduction="none")
    return err.mean(dim=tuple(range(1, err.dim())))
