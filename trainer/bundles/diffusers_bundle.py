"""A `ModelBundle` over diffusers/transformers components (standalone checkpoints and the tiny test model)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..bundle import Conditioning, SizeInfo, TextEncoderSlot
from ..families import Family
from ..naming import UNetLayout, kohya_unet_name, unet_targets
from .standalone import StandaloneModules

log = logging.getLogger(__name__)


class DiffusersBundle(StandaloneModules):
    """UNet2DConditionModel + AutoencoderKL + CLIP text encoder(s) and tokenizer(s).

    Args:
        family: the model family.
        unet, vae: diffusers modules.
        text_encoders: `CLIPTextModel` (SD1/SD2), or `[CLIPTextModel, CLIPTextModelWithProjection]` (SDXL).
        tokenizers: one `CLIPTokenizer` per text encoder.
        alphas_cumprod: the training noise schedule.
        name: shown in logs and metadata (e.g. the checkpoint's file name).
        prediction_type: overrides the family's (`epsilon` / `v_prediction`).
    """

    def __init__(self, family: Family, unet: nn.Module, vae: nn.Module, text_encoders: list[nn.Module],
                 tokenizers: list, alphas_cumprod: torch.Tensor, name: str, prediction_type: str | None = None) -> None:
        self.family = family
        self.unet = unet
        self.vae = vae
        self.tokenizers = tokenizers
        self.text_encoders = [TextEncoderSlot(te, prefix) for te, prefix in zip(text_encoders, family.te_prefixes,
                                                                                strict=True)]
        self.alphas_cumprod = alphas_cumprod.float()
        self.name = name
        self._prediction_type = prediction_type or family.prediction_type
        self._layout = UNetLayout.from_diffusers_config(unet.config)
        self.vae_scale = float(getattr(vae.config, "scaling_factor", family.latent_scale))

    @property
    def prediction_type(self) -> str:
        return self._prediction_type

    # -- encoders -----------------------------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        # The posterior mean, not a sample: cached latents stay deterministic and resumable.
        vae_param = next(self.vae.parameters())
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(vae_param.device, vae_param.dtype)).latent_dist
        return dist.mean.float() * self.vae_scale

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae_param = next(self.vae.parameters())
        with torch.no_grad():
            return self.vae.decode(latents.to(vae_param.device, vae_param.dtype) / self.vae_scale).sample.float()

    @staticmethod
    def _token_ids(tokenizer, captions: list[str], module: nn.Module) -> torch.Tensor:  # noqa: ANN001
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return ids.to(next(module.parameters()).device)  # the encoder may have been offloaded after caching

    def encode_text(self, captions: list[str]) -> Conditioning:
        if not self.family.is_sdxl:
            te = self.text_encoders[0].module
            return Conditioning(te(self._token_ids(self.tokenizers[0], captions, te))[0]).to(self.device)
        # SDXL: penultimate hidden states of both encoders, concatenated; pooled projection of the second.
        states, pooled = [], None
        for slot, tokenizer in zip(self.text_encoders, self.tokenizers, strict=True):
            out = slot.module(self._token_ids(tokenizer, captions, slot.module), output_hidden_states=True)
            states.append(out.hidden_states[-2].to(self.device))
            if hasattr(out, "text_embeds"):
                pooled = out.text_embeds.to(self.device)
        return Conditioning(torch.cat(states, dim=-1), pooled)

    # -- denoiser -----------------------------------------------------------------------------------------------
    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                sizes: list[SizeInfo] | None = None) -> torch.Tensor:
        dtype = self.dtype
        kwargs = {}
        if self.family.is_sdxl:
            h, w = noisy.shape[-2] * 8, noisy.shape[-1] * 8
            infos = sizes or [SizeInfo((h, w), (0, 0), (h, w))] * noisy.shape[0]
            time_ids = torch.tensor([s.as_list() for s in infos], device=noisy.device, dtype=dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(dtype), "time_ids": time_ids}  # type: ignore[union-attr]
        out = self.unet(noisy.to(dtype), timesteps, encoder_hidden_states=cond.context.to(dtype), **kwargs).sample
        return out.float()

    # -- naming ---------------------------------------------------------------------------------------------------
    def unet_lora_name(self, module_path: str) -> str:
        path = module_path if self.family.unet_names == "diffusers" else self._layout.to_ldm(module_path)
        return kohya_unet_name(path)

    def unet_targets(self, conv: bool) -> dict[str, str]:
        return unet_targets(self.unet, conv)
