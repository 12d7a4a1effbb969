"""The A1111 host bundle: the engine's `ModelBundle` over `shared.sd_model`, the model the webui already loaded.

What the webui holds (docs/hosts.md §9):
* SD1/SD2: ldm `LatentDiffusion`. `apply_model(x, t, cond)` takes integer DDPM timesteps and returns ε or v
  (`parameterization` "eps"/"v"), which is the engine's form already; `get_learned_conditioning(texts)` runs the
  webui's prompt encoder (75-token chunks, clip skip, textual-inversion embeddings); `encode_first_stage` gives a
  DiagonalGaussianDistribution whose mean, times `scale_factor`, is the latent.
* SDXL: sgm `DiffusionEngine` extended by the webui (sd_models_xl.py): `get_learned_conditioning` returns
  {"crossattn", "vector"} where "vector" = pooled bigG embedding followed by the size embeddings for 1024² —
  `predict` rebuilds those per sample from the bucket sizes with the conditioner's own size embedders;
  `encode_first_stage` already scales.

Captions are encoded literally: the webui's prompt syntax `(word:1.2)` would otherwise re-weight and strip brackets
(kohya trains captions as plain text), so brackets are escaped the way the webui's prompt parser reads `\\(`.
Only SD1's CLIP-L (`cond_stage_model.wrapped.transformer`, a transformers CLIPTextModel) is exposed for text-encoder
LoRA; SD2's and SDXL's OpenCLIP encoders use fused `nn.MultiheadAttention`, which the engine's adapters do not cover.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..trainer.bundle import Conditioning, SizeInfo, TextEncoderSlot
from ..trainer.errors import UnsupportedModelError
from ..trainer.families import Family, get_family
from ..trainer.naming import TE_CLASSES, UNetLayout, find_targets, ldm_unet_lora_name, unet_targets
from . import forge, webui

log = logging.getLogger(__name__)

SUPPORTED_TEXT = "SD 1.x, SD 2.x (512 and 768-v) and SDXL base"
CHUNK_TOKENS = 77  # one prompt chunk of the webui's text encoders: BOS + 75 tokens + EOS
SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
SD_VERSIONS = {"sd1": "SD1", "sd2": "SD2", "sd2-v": "SD2", "sdxl": "SDXL"}  # Lora extension's network.SdVersion names
_PROMPT_SYNTAX = re.compile(r"([\\()\[\]])")


@dataclass(frozen=True)
class ModelFacts:
    """What the tab shows about the loaded model before anything runs."""

    family: Family
    prediction_type: str
    dtype: torch.dtype
    title: str
    text_encoder_trainable: bool

    @property
    def label(self) -> str:
        te = "UNet + text encoder" if self.text_encoder_trainable else "UNet only"
        dtype = str(self.dtype).replace("torch.", "")
        version = SD_VERSIONS[self.family.name]
        return f"{self.title}: {version} ({self.family.name}, {self.prediction_type}, {dtype}); trains {te}"


def detect_family(model: Any) -> tuple[Family, str]:
    """(family, prediction type) of `shared.sd_model`; anything but SD1/SD2/SDXL base raises naming what it is."""
    if model is None:
        raise UnsupportedModelError("no model is loaded; choose a Stable Diffusion checkpoint at the top of the page")
    if hasattr(model, "forge_objects"):  # Forge holds the model the ComfyUI way (Classic) or its own (Neo)
        return forge.detect_family(model)
    if getattr(model, "is_sd3", False):
        raise UnsupportedModelError(f"SD3 models cannot be trained in the webui; LoRA Loop trains {SUPPORTED_TEXT}")
    parameterization = getattr(model, "parameterization", "eps")
    if parameterization not in ("eps", "v"):
        raise UnsupportedModelError(f"models with {parameterization!r} parameterization are not supported")
    prediction = "v_prediction" if parameterization == "v" else "epsilon"
    if getattr(model, "is_sdxl", False) or hasattr(model, "conditioner"):
        if getattr(model, "is_sdxl_inpaint", False):
            raise UnsupportedModelError("SDXL inpainting models are not supported; load an SDXL base model")
        keys = [getattr(e, "input_key", None) for e in getattr(model.conditioner, "embedders", [])]
        if "aesthetic_score" in keys or not all(k in keys for k in SIZE_KEYS):
            raise UnsupportedModelError("this SDXL model has no size conditioning (an SDXL refiner?); load an SDXL "
                                        "base model")
        key = "sdxl"
    elif getattr(model, "is_sd2", False) or hasattr(getattr(getattr(model, "cond_stage_model", None), "wrapped", None),
                                                    "model"):
        key = "sd2-v" if prediction == "v_prediction" else "sd2"
    else:
        key = "sd1"
    wrapper = getattr(model, "model", None)
    conditioning = getattr(wrapper, "conditioning_key", "crossattn")
    if key != "sdxl" and conditioning != "crossattn":
        raise UnsupportedModelError(f"this model is conditioned by {conditioning!r} (inpainting, instruct-pix2pix or "
                                    f"depth model); LoRA Loop trains {SUPPORTED_TEXT} text-to-image models")
    unet = getattr(wrapper, "diffusion_model", None)
    if unet is None:
        raise UnsupportedModelError("the loaded model has no `model.diffusion_model` UNet")
    if getattr(unet, "in_channels", 4) != 4:
        raise UnsupportedModelError(f"this UNet takes {unet.in_channels} input channels (an inpainting model?); "
                                    f"LoRA Loop trains {SUPPORTED_TEXT} text-to-image models")
    if any(p.dtype in _FP8 for p in unet.parameters()):
        raise UnsupportedModelError("the UNet is stored in FP8 (Settings → Optimizations → FP8 weight); turn that "
                                    "off to train")
    return get_family(key), prediction


_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def sd1_text_encoder(model: Any) -> nn.Module | None:
    """SD1's CLIP-L (a transformers CLIPTextModel) under the webui's prompt wrapper, when it has CLIP layers."""
    wrapped = getattr(getattr(model, "cond_stage_model", None), "wrapped", None)
    te = getattr(wrapped, "transformer", None)
    if not isinstance(te, nn.Module) or not find_targets(te, TE_CLASSES):
        return None
    return te


def describe(model: Any) -> ModelFacts:
    family, prediction = detect_family(model)
    if hasattr(model, "forge_objects"):
        unet = model.forge_objects.unet.model.diffusion_model
        trainable = forge.ForgeBundle(model).can_train_text()
        return ModelFacts(family, prediction, next(unet.parameters()).dtype, webui.checkpoint_name(model), trainable)
    unet = model.model.diffusion_model
    te = sd1_text_encoder(model) if family.name == "sd1" else None
    return ModelFacts(family, prediction, next(unet.parameters()).dtype, webui.checkpoint_name(model), te is not None)


def text_stage(model: Any) -> nn.Module:
    """The module that encodes prompts: `conditioner` (SDXL) or the prompt wrapper `cond_stage_model`."""
    return model.conditioner if hasattr(model, "conditioner") else model.cond_stage_model


def literal(caption: str) -> str:
    """`caption` escaped for the webui's prompt parser, so brackets and backslashes are read as text."""
    return _PROMPT_SYNTAX.sub(r"\\\1", caption)


@contextlib.contextmanager
def upcast(module: nn.Module) -> Iterator[None]:
    """Run `module` in float32 for a moment; every tensor gets its own dtype back (fp16/bf16 → fp32 → back is exact)."""
    saved = [(t, t.dtype) for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()]
    for t, _ in saved:
        t.data = t.data.float()
    try:
        yield
    finally:
        for t, dtype in saved:
            t.data = t.data.to(dtype)


class WebuiBundle:
    """`ModelBundle` over the webui's loaded model.

    Args:
        model: `shared.sd_model` (SD1/SD2 LatentDiffusion or SDXL DiffusionEngine).
        device: the webui's compute device (`devices.device`).
        name: written as `ss_sd_model_name`.
    """

    def __init__(self, model: Any, device: torch.device | str, name: str = "") -> None:
        self.family, self._prediction_type = detect_family(model)
        self.sd_model = model
        self.unet: nn.Module = model.model.diffusion_model
        self.is_sdxl = self.family.is_sdxl
        te = sd1_text_encoder(model) if self.family.name == "sd1" else None
        self.text_encoders: list[TextEncoderSlot] = []
        if te is not None:
            self.text_encoders.append(TextEncoderSlot(te, self.family.te_prefixes[0]))
        self.alphas_cumprod = model.alphas_cumprod.detach().float().cpu().clone()
        self.device = torch.device(device)
        self.name = name or webui.checkpoint_name(model)
        self.context_tokens: int | None = None  # every context is padded to this length (see set_caption_lengths)
        self.train_text = False  # True while a text encoder carries trainable adapters: nothing text is cached then
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._empty: torch.Tensor | None = None
        self._layout: UNetLayout | None = None
        self._size_embedders: list[nn.Module] = []
        if self.is_sdxl:
            embedders = model.conditioner.embedders
            self._size_embedders = [e for e in embedders if getattr(e, "input_key", None) in SIZE_KEYS]

    @property
    def prediction_type(self) -> str:
        return self._prediction_type

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def lowvram(self) -> bool:
        """--medvram/--lowvram: the webui moves model parts between CPU and GPU itself (modules/lowvram.py)."""
        return bool(getattr(self.sd_model, "lowvram", False))

    @property
    def vae(self) -> nn.Module:
        return self.sd_model.first_stage_model

    @property
    def text_module(self) -> nn.Module:
        return text_stage(self.sd_model)

    # -- images ---------------------------------------------------------------------------------------------------
    def _vae_input(self, pixels: torch.Tensor) -> torch.Tensor:
        param = next(self.vae.parameters())
        device = self.device if self.lowvram else param.device  # medvram moves the VAE to the device when it runs
        return pixels.to(device=device, dtype=param.dtype)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        model = self.sd_model
        if self.is_sdxl:
            vae = model.first_stage_model
            if not self.lowvram and hasattr(vae, "encoder") and hasattr(vae, "quant_conv"):
                # The posterior mean (sgm's encode samples): cached latents stay deterministic and resumable.
                moments = vae.quant_conv(vae.encoder(x))
                return moments.chunk(2, dim=1)[0] * model.scale_factor
            return model.encode_first_stage(x)
        posterior = model.encode_first_stage(x)
        return model.get_first_stage_encoding(getattr(posterior, "mean", posterior))

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            latents = self._encode(self._vae_input(pixels))
            if not torch.isfinite(latents).all() and next(self.vae.parameters()).dtype != torch.float32:
                log.info("LoRA Loop: the half-precision VAE produced NaNs; encoding this batch in float32")
                with upcast(self.vae):
                    latents = self._encode(self._vae_input(pixels))
        return latents.float().to(self.device)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            images = self.sd_model.decode_first_stage(self._vae_input(latents))
            if not torch.isfinite(images).all() and next(self.vae.parameters()).dtype != torch.float32:
                with upcast(self.vae):
                    images = self.sd_model.decode_first_stage(self._vae_input(latents))
        return images.float().clamp(-1, 1)

    # -- text -----------------------------------------------------------------------------------------------------
    def prompt_text(self, caption: str) -> str:
        """A caption as the webui's prompt encoder must see it to read it as plain text."""
        return caption if webui.option("emphasis", "Original") == "None" else literal(caption)

    def _raw_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        texts = [self.prompt_text(c) for c in captions]
        with webui.autocast(self.device.type):
            out = self.sd_model.get_learned_conditioning(texts)
        if not self.is_sdxl:
            return out, None
        vector = out["vector"]
        pooled_width = vector.shape[1] - self._size_width()
        return out["crossattn"], vector[:, :pooled_width]

    def _empty_chunk(self) -> torch.Tensor:
        """The encoding of "" (one chunk): what the webui pads shorter prompts of a batch with."""
        if self._empty is None or self.train_text:
            with torch.no_grad():
                empty = self._raw_text([""])[0][:, :CHUNK_TOKENS].detach()
            if self.train_text:
                return empty
            self._empty = empty.cpu()
        return self._empty

    def _pad(self, context: torch.Tensor) -> torch.Tensor:
        target = self.context_tokens or context.shape[1]
        missing = (target - context.shape[1]) // CHUNK_TOKENS
        if missing <= 0:
            return context
        pad = self._empty_chunk().to(device=context.device, dtype=context.dtype)
        return torch.cat([context, pad.expand(context.shape[0], -1, -1).repeat(1, missing, 1)], dim=1)

    def encode_text(self, captions: list[str]) -> Conditioning:
        if not self.train_text and captions and all(c in self._text_cache for c in captions):
            pairs = [self._text_cache[c] for c in captions]
            pooled = torch.cat([p for _, p in pairs]).to(self.device) if self.is_sdxl else None  # type: ignore[misc]
            return Conditioning(torch.cat([c for c, _ in pairs]).to(self.device), pooled)
        context, pooled = self._raw_text(captions)
        return Conditioning(self._pad(context).to(self.device), None if pooled is None else pooled.to(self.device))

    def set_caption_lengths(self, captions: list[str]) -> int:
        """Fix the context length of the run to the longest caption's chunk count (the webui's prompt encoder gives
        77 tokens per 75-token chunk); shorter contexts are padded with the empty chunk, as the webui pads the prompts
        of one batch. Without this, cached conditionings of different lengths could not be batched. Returns it."""
        texts = sorted({self.prompt_text(c) for c in captions} | {""})
        counter = getattr(self.text_module, "process_texts", None)
        chunks = 1
        if callable(counter):
            batch_chunks, _ = counter(texts)
            chunks = max(len(c) for c in batch_chunks)
        else:  # a prompt encoder without the webui's tokenizer helpers: measure by encoding
            with torch.no_grad():
                for text in texts:
                    chunks = max(chunks, self._raw_text([text])[0].shape[1] // CHUNK_TOKENS)
        self.context_tokens = chunks * CHUNK_TOKENS
        return self.context_tokens

    def cache_text(self, captions: list[str]) -> None:
        """Encode `captions` now, so that sampling previews later need no text encoder on the device."""
        todo = [c for c in dict.fromkeys(captions) if c not in self._text_cache]
        with torch.no_grad():
            for start in range(0, len(todo), 16):
                chunk = todo[start : start + 16]
                cond = self.encode_text(chunk)
                for i, caption in enumerate(chunk):
                    pooled = None if cond.pooled is None else cond.pooled[i : i + 1].detach().cpu()
                    self._text_cache[caption] = (cond.context[i : i + 1].detach().cpu(), pooled)

    # -- denoiser -------------------------------------------------------------------------------------------------
    def _size_width(self) -> int:
        return self._size_vector([SizeInfo((8, 8))], torch.device("cpu")).shape[1]

    def _size_vector(self, sizes: list[SizeInfo], device: torch.device) -> torch.Tensor:
        rows = torch.tensor([s.as_list() for s in sizes], dtype=torch.float32, device=device)
        columns = {"original_size_as_tuple": rows[:, 0:2], "crop_coords_top_left": rows[:, 2:4],
                   "target_size_as_tuple": rows[:, 4:6]}
        return torch.cat([e(columns[e.input_key]).float() for e in self._size_embedders], dim=1)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                sizes: list[SizeInfo] | None = None) -> torch.Tensor:
        if self.is_sdxl:
            if cond.pooled is None:
                raise UnsupportedModelError("SDXL conditioning without the pooled text embedding")
            h, w = noisy.shape[-2] * 8, noisy.shape[-1] * 8
            infos = sizes or [SizeInfo((h, w), (0, 0), (h, w))] * noisy.shape[0]
            vector = torch.cat([cond.pooled.float(), self._size_vector(list(infos), noisy.device)], dim=1)
            c: Any = {"crossattn": cond.context, "vector": vector}
        else:
            c = cond.context
        with webui.autocast(self.device.type):  # the loop's own autocast when training, the webui's when sampling
            return self.sd_model.apply_model(noisy, timesteps, c).float()

    # -- naming ---------------------------------------------------------------------------------------------------
    def unet_lora_name(self, module_path: str) -> str:
        if self._layout is None and self.family.unet_names != "ldm":
            self._layout = UNetLayout.from_ldm_module(self.unet)
        return ldm_unet_lora_name(self.family.unet_names, self._layout, module_path)  # type: ignore[arg-type]

    def unet_targets(self, conv: bool) -> dict[str, str]:
        return unet_targets(self.unet, conv)
