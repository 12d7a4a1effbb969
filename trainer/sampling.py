"""Sample images from a bundle with a deterministic sampler (DDIM; Euler for flow models) and classifier-free guidance.

Works for any `ModelBundle` (epsilon, v or flow prediction) because it only needs `predict`, the noise schedule and the
VAE decoder; samples with fixed seeds make before/after comparisons and progress previews meaningful.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .bundle import ModelBundle, SizeInfo
from .config import TrainConfig
from .flow import sampler_sigmas


def _eps_and_x0(pred: torch.Tensor, x: torch.Tensor, a: torch.Tensor,
                prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    if prediction_type == "v_prediction":
        x0 = a.sqrt() * x - (1 - a).sqrt() * pred
        eps = (1 - a).sqrt() * x + a.sqrt() * pred
    else:
        eps = pred
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    return eps, x0


@torch.no_grad()
def sample_latents(bundle: ModelBundle, prompts: list[str], *, height: int, width: int, steps: int = 20,
                   cfg: float = 7.0, seed: int = 0, negative: str = "",
                   on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """DDIM (η=0) from pure noise; one fixed-seed noise per prompt, so repeated calls are comparable.
    `on_step(done, steps)` is called after each sampler step (a host's progress bar)."""
    device = bundle.device
    n = len(prompts)
    gen = torch.Generator("cpu").manual_seed(seed)
    channels = getattr(bundle, "latent_channels", bundle.family.latent_channels)
    x = torch.randn((n, channels, height // 8, width // 8), generator=gen).to(device)
    cond = bundle.encode_text(prompts)
    uncond = bundle.encode_text([negative] * n)
    both = type(cond).cat([uncond, cond])
    sizes = [SizeInfo((height, width), (0, 0), (height, width))] * (2 * n)
    if bundle.prediction_type == "flow":
        return _euler_flow(bundle, x, both, sizes, steps, cfg, on_step)
    ac = bundle.alphas_cumprod.to(device)
    timesteps = torch.linspace(len(ac) - 1, 0, steps).round().long().tolist()
    for i, t in enumerate(timesteps):
        a = ac[t]
        a_prev = ac[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0, device=device)
        pred = bundle.predict(torch.cat([x, x]), torch.full((2 * n,), t, device=device), both, sizes)
        p_uncond, p_cond = pred.chunk(2)
        guided = p_uncond + cfg * (p_cond - p_uncond)
        eps, x0 = _eps_and_x0(guided, x, a, bundle.prediction_type)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    return x


def _euler_flow(bundle: ModelBundle, x: torch.Tensor, both: object, sizes: list[SizeInfo], steps: int, cfg: float,
                on_step: Callable[[int, int], None] | None) -> torch.Tensor:
    """Euler on the velocity from σ=1 to 0, sigmas shifted as in training (the bundle's shift: the host's own).
    Guidance-distilled families sample as their users do: cfg 1 (no unconditional pass) and their sampling guidance
    (a bundle with a `guidance` attribute feeds it; training feeds the family's training value)."""
    family = bundle.family
    cfg = family.sample_cfg if family.sample_cfg is not None else cfg
    sigmas = sampler_sigmas(steps, bundle.shift_sigmas).to(x.device)  # type: ignore[attr-defined]
    n = x.shape[0]
    uncond_sizes, cond_sizes = sizes[:n], sizes[n:]
    previous = getattr(bundle, "guidance", None)
    if family.sample_guidance is not None and hasattr(bundle, "guidance"):
        bundle.guidance = family.sample_guidance  # type: ignore[attr-defined]
    try:
        for i in range(steps):
            if cfg == 1.0:
                v = bundle.predict(x, sigmas[i].expand(n), both[n:], cond_sizes).float()  # type: ignore[index]
            else:
                sigma = sigmas[i].expand(2 * n)
                v_uncond, v_cond = bundle.predict(torch.cat([x, x]), sigma, both,  # type: ignore[arg-type]
                                                  uncond_sizes + cond_sizes).float().chunk(2)
                v = v_uncond + cfg * (v_cond - v_uncond)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
            if on_step is not None:
                on_step(i + 1, steps)
    finally:
        if hasattr(bundle, "guidance"):
            bundle.guidance = previous  # type: ignore[attr-defined]
    return x


def sample_settings(config: TrainConfig) -> dict:
    """The sampler settings of a run's sample images (`sample_steps`, `sample_cfg`, its resolution and seed)."""
    return {"height": config.resolution, "width": config.resolution, "steps": config.sample_steps,
            "cfg": config.sample_cfg, "seed": config.seed}


def sample_images(bundle: ModelBundle, prompts: list[str], **kwargs: object) -> torch.Tensor:
    """Decoded images [B,3,H,W] in [-1,1]."""
    return bundle.decode_latents(sample_latents(bundle, prompts, **kwargs))  # type: ignore[arg-type]
