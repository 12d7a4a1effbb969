"""Traced phases of a run on a meta bundle: one training step, a VAE encode, a text encode, a sample.

`simulate_step` mirrors `loop._optimizer_step` for one micro-batch chunk (noise → predict → loss → backward → clip →
optimizer step) with the real `Network`, `gradient_checkpointing`, `diffusion_loss` and `DiffusersBundle.predict`;
it cannot call the loop itself because the loop reads `loss.item()`, which meta tensors do not have.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ...bundle import Conditioning, SizeInfo
from ...bundles.diffusers_bundle import DiffusersBundle
from ...checkpointing import CHECKPOINT_CLASSES, gradient_checkpointing
from ...loss import LossSettings, diffusion_loss, draw_noise
from ...network import Network, NetworkSpec
from .tracer import AutocastEmulation, LiveBytes, StepTrace

log = logging.getLogger(__name__)

# CLIP's context length: every SD family pads captions to 77 tokens.
CONTEXT_TOKENS = 77


@dataclass(frozen=True)
class StepSetup:
    """One traced micro-batch chunk.

    Args:
        batch: samples that go through the model at once (the loop's chunk).
        latent_hw: latent height and width (pixels / 8).
        autocast: the autocast dtype (mixed precision), or None.
        gradient_checkpointing: recompute block activations in backward.
        attention: `flash` (the fused kernels CUDA/CPU pick) or `math`.
        device_type: `cuda` or `cpu`: which kernels to model.
        cached_text: text conditioning comes from the cache (else the text encoders run every step).
        fp16_scaler: the loss is scaled for fp16 (one extra multiply).
    """

    batch: int
    latent_hw: tuple[int, int]
    autocast: torch.dtype | None = None
    gradient_checkpointing: bool = False
    attention: str = "flash"
    device_type: str = "cuda"
    cached_text: bool = True
    fp16_scaler: bool = False


def _meta_token_ids(bundle: DiffusersBundle, captions: list[str]) -> torch.Tensor:
    return torch.zeros((len(captions), CONTEXT_TOKENS), dtype=torch.long, device=bundle.device)


def _cached_conditioning(bundle: DiffusersBundle, batch: int) -> Conditioning:
    """What `BatchMaker` caches: each encoder's output dtype, concatenated (SDXL: 768 + 1280 wide, plus pooled)."""
    dtype = bundle.dtype
    width = bundle.unet.config.cross_attention_dim
    pooled = None
    if bundle.family.is_sdxl:
        pooled = torch.zeros((batch, bundle.text_encoders[-1].module.config.projection_dim), dtype=dtype,
                             device=bundle.device)
    return Conditioning(torch.zeros((batch, CONTEXT_TOKENS, width), dtype=dtype, device=bundle.device), pooled)


@contextmanager
def _emulate_inside_blocks(root: torch.nn.Module, emulation: AutocastEmulation) -> Iterator[None]:
    """Make every checkpointed block enter `emulation` itself: real checkpointing re-enters the forward's autocast
    when it recomputes a block in backward, but torch-function modes are not active there."""
    from torch.overrides import _get_current_function_mode_stack

    def wrap(forward: Callable) -> Callable:
        def emulated(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if emulation in _get_current_function_mode_stack():
                return forward(*args, **kwargs)
            with emulation:
                return forward(*args, **kwargs)

        return emulated

    wrapped = [m for m in root.modules() if type(m).__name__ in CHECKPOINT_CLASSES]
    for module in wrapped:
        module.forward = wrap(module.forward)
    try:
        yield
    finally:
        for module in wrapped:
            del module.forward


def simulate_step(bundle: DiffusersBundle, spec: NetworkSpec, setup: StepSetup) -> StepTrace:
    """Trace one optimizer step with one chunk of `setup.batch` samples on a meta `bundle` (adapters are added and
    removed here; AdamW is traced, other optimizers' state is scaled from it by `estimate.py`)."""
    # The meta bundle has no tokenizer: feed zero token ids of CLIP's length instead.
    bundle._token_ids = lambda tokenizer, captions, *_: _meta_token_ids(bundle, captions)  # type: ignore[method-assign]
    h, w = setup.latent_hw
    sizes = [SizeInfo((h * 8, w * 8))] * setup.batch
    with Network(bundle, spec) as network:
        params = network.parameters()
        adapter_params = sum(p.numel() for p in params)
        optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
        generator = torch.Generator().manual_seed(0)
        latents = torch.zeros((setup.batch, 4, h, w))
        draw = draw_noise(latents.shape, generator, LossSettings(), len(bundle.alphas_cumprod))
        live = LiveBytes()
        emulation = AutocastEmulation(setup.autocast, setup.attention, setup.device_type)
        with live, _emulate_inside_blocks(bundle.unet, emulation), \
                gradient_checkpointing(bundle.unet, setup.gradient_checkpointing):
            with emulation:
                if setup.cached_text:
                    cond = _cached_conditioning(bundle, setup.batch)
                else:
                    with torch.set_grad_enabled(spec.train_text_encoder):
                        cond = bundle.encode_text([""] * setup.batch)
                loss = diffusion_loss(bundle, latents, cond, draw, LossSettings(), sizes)
                if setup.fp16_scaler:
                    loss = loss * 65536.0
                live.mark("forward")
                after_forward = live.live
                loss.backward()
                del loss, cond
            live.mark("backward")
            traffic, ops, flops = live.traffic, live.ops, live.flops  # forward + backward only
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            before_step = live.live
            live.reset_peak()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            live.mark("optimizer")
            state = live.live
    marks = live.marks
    return StepTrace(peak=marks[1].peak, after_forward=after_forward, optimizer_state=state,
                     optimizer_peak=max(live.peak, before_step), flops=flops, adapter_params=adapter_params,
                     traffic=traffic, ops=ops, marks=marks)


def simulate_vae_encode(bundle: DiffusersBundle, batch: int, pixel_hw: tuple[int, int]) -> int:
    """Peak bytes of encoding `batch` images of `pixel_hw` with the (float32) VAE, as `BatchMaker` does without a
    latent cache."""
    live = LiveBytes()
    with live, AutocastEmulation(None):
        pixels = torch.zeros((batch, 3, *pixel_hw), device=bundle.device)
        latents = bundle.encode_images(pixels)
        del pixels, latents
    return live.peak


def simulate_vae_decode(bundle: DiffusersBundle, batch: int, latent_hw: tuple[int, int]) -> int:
    """Peak bytes of decoding `batch` latents (sample images)."""
    live = LiveBytes()
    with live, AutocastEmulation(None):
        latents = torch.zeros((batch, 4, *latent_hw), device=bundle.device)
        images = bundle.decode_latents(latents)
        del latents, images
    return live.peak


def simulate_inference(bundle: DiffusersBundle, batch: int, latent_hw: tuple[int, int],
                       autocast: torch.dtype | None) -> int:
    """Peak bytes of one no-grad denoiser call (a sampling step with classifier-free guidance uses 2× the images)."""
    live = LiveBytes()
    h, w = latent_hw
    with live, AutocastEmulation(autocast), torch.no_grad():
        cond = _cached_conditioning(bundle, batch)
        noisy = torch.zeros((batch, 4, h, w), device=bundle.device)
        t = torch.zeros((batch,), dtype=torch.long, device=bundle.device)
        out = bundle.predict(noisy, t, cond, [SizeInfo((h * 8, w * 8))] * batch)
        del out, noisy, cond
    return live.peak
