"""A `ModelBundle` over a diffusers flow-matching transformer (Flux.1, SD3.5) for the command line.

What every flow family shares lives here: the VAE (16-channel `AutoencoderKL`, latents `(z − shift)·scale`), the
time shift (diffusers' FlowMatch `shift`, the family's α), offloading, LoRA names. What differs — how captions become
conditioning and how the transformer is called — is one small module per family behind `FlowArchitecture`
(bundles/flux.py, bundles/sd3.py).

LoRA names are diffusers' module paths under `transformer.` (`transformer.single_transformer_blocks.0.attn.to_q`),
saved with `lora_A`/`lora_B` keys: the format diffusers' `load_lora_weights` reads natively, and ComfyUI's loader maps
`transformer.<diffusers path>` for Flux and SD3 too (comfy/lora.py `model_lora_keys_unet`; Forge Neo's loader is the
same design). Inside ComfyUI the host bundle trains ComfyUI's own modules and writes kohya's native names instead.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ..bundle import Conditioning, SizeInfo, TextEncoderSlot
from ..families import Family
from ..flow import time_shift
from ..naming import dit_targets
from .standalone import StandaloneModules

LORA_PREFIX = "transformer."


class FlowArchitecture(Protocol):
    """One flow family's transformer plumbing (diffusers classes)."""

    blocks: str  # regex of the transformer-block module paths (diffusers names) whose Linears get LoRA
    exclude: str | None  # regex of Linears left out inside them
    attention: str  # regex of the attention projections (the `attention` preset)

    def encode_text(self, bundle: FlowBundle, captions: list[str]) -> Conditioning: ...

    def velocity(self, bundle: FlowBundle, noisy: torch.Tensor, sigmas: torch.Tensor,
                 cond: Conditioning) -> torch.Tensor: ...


class FlowBundle(StandaloneModules):
    """A diffusers flow transformer + VAE + text encoders, trained on the velocity.

    Args:
        family: a flow family (`flux1`, `flux1-schnell`, `sd3`).
        arch: the family's `FlowArchitecture`.
        transformer, vae: diffusers modules (the VAE an `AutoencoderKL` with `scaling_factor`/`shift_factor`).
        text_encoders: (kohya prefix, module) per encoder, in the order `arch` reads them.
        tokenizers: one per text encoder.
        name: shown in logs and metadata.
        shift: the time shift α (None: the family's).
    """

    prediction_type = "flow"
    lora_key_style = "diffusers"  # network.py writes lora_A/lora_B under these names

    def __init__(self, family: Family, arch: FlowArchitecture, transformer: nn.Module, vae: nn.Module,
                 text_encoders: list[tuple[str, nn.Module]], tokenizers: list, name: str,
                 shift: float | None = None) -> None:
        self.family = family
        self.arch = arch
        self.unet = transformer  # the engine's name for the denoiser
        self.vae = vae
        self.text_encoders = [TextEncoderSlot(module, prefix) for prefix, module in text_encoders]
        self.tokenizers = tokenizers
        self.name = name
        self.shift = float(shift if shift is not None else family.flow_shift or 1.0)
        self.guidance = family.guidance  # training value; the sampler switches to family.sample_guidance
        self.alphas_cumprod = torch.zeros(0)  # no DDPM schedule: σ comes from `shift_sigmas`
        self.vae_scale = float(getattr(vae.config, "scaling_factor", 1.0))
        self.vae_shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.latent_channels = int(vae.config.latent_channels)

    # -- encoders -----------------------------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae_param = next(self.vae.parameters())
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(vae_param.device, vae_param.dtype)).latent_dist
        return (dist.mean.float() - self.vae_shift) * self.vae_scale

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae_param = next(self.vae.parameters())
        z = latents.to(vae_param.device, vae_param.dtype) / self.vae_scale + self.vae_shift
        with torch.no_grad():
            return self.vae.decode(z).sample.float()

    def token_ids(self, index: int, captions: list[str], max_length: int | None = None) -> torch.Tensor:
        """Token ids of text encoder `index`, padded to its length (T5: the family's sequence length)."""
        tokenizer = self.tokenizers[index]
        length = max_length or tokenizer.model_max_length
        ids = tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                        return_tensors="pt").input_ids
        return ids.to(next(self.text_encoders[index].module.parameters()).device)

    def encode_text(self, captions: list[str]) -> Conditioning:
        return self.arch.encode_text(self, captions).to(self.device)

    # -- denoiser -----------------------------------------------------------------------------------------------
    def shift_sigmas(self, u: torch.Tensor) -> torch.Tensor:
        return time_shift(u.float(), self.shift)

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning,
                sizes: list[SizeInfo] | None = None) -> torch.Tensor:
        """The velocity ε − x0 at x_σ (float32)."""
        return self.arch.velocity(self, noisy, sigmas, cond).float()

    # -- naming ---------------------------------------------------------------------------------------------------
    def unet_lora_name(self, module_path: str) -> str:
        return LORA_PREFIX + module_path

    def unet_targets(self, conv: bool) -> dict[str, str]:
        return dit_targets(self.unet, self.arch.blocks, self.arch.exclude)
