"""Stable Diffusion WebUI Forge: the loaded model's `forge_objects` as an engine bundle, and Forge's own ways.

Forge keeps the webui's extension API and UI but holds the model the ComfyUI way (docs/hosts.md §9):
`shared.sd_model.forge_objects.unet` is a ModelPatcher, `.clip` a CLIP, `.vae` a VAE object, and the UNet's
`apply_model(x, σ, …)` returns x0. Two Forges are trained in place:

* Forge Classic (`ldm_patched`): the objects are ComfyUI's of early 2024 (`BaseModel` with `model_config`,
  `model_sampling`, `extra_conds`, `encode_adm`; layers `ldm_patched.modules.ops.disable_weight_init.Linear`, nn.Linear
  subclasses), so the engine's `PatcherBundle` (trainer/bundles/patcher.py) trains it as it trains ComfyUI's MODEL:
  `ForgeBundle`. Verified in a real Forge Classic checkout at 1f95d717.
* Forge Neo (`backend`): `unet.model` is Neo's `KModel` (`config`: the huggingface_guess model config, e.g. `SD15`,
  `SDXL`, `Flux`; `predictor`: its sigma schedule, `prediction_type` epsilon/v_prediction/const;
  `storage_dtype`/`computation_dtype`). Its layers are `backend.operations.ForgeOperations.Linear` (in the 2025 backend
  a plain nn.Module that casts its weight on the fly, in v3.5 an nn.Linear subclass) and nn.Conv2d subclasses; text
  and latents go through the engine's own `get_learned_conditioning` / `encode_first_stage` / `decode_first_stage`.
  `NeoBundle` reads those; adapters go on Neo's Linear through the engine's custom LoRA layer
  (trainer/custom_layers.py), which calls the layer itself, so Neo's casts and offloading keep running. SD 1.x, SDXL
  and Flux.1 dev/schnell are trained; quantized layers (bitsandbytes nf4/fp4, GGUF, int8, nvfp4/mxfp8, Nunchaku SVDQ)
  and `--fast-fp8` are refused with the reason. Read from Neo's source (Haoming02/sd-webui-forge-classic, branch neo):
  backend/operations.py @e0680a3b and @06d6af9a, backend/modules/k_model.py @c9433ba9, backend/patcher/unet.py
  @1f7084af, backend/patcher/base.py @6c627e6f, backend/patcher/lora.py @419825e7; the real-module test
  (tests/test_a1111_forge_neo_real.py) runs Neo's backend modules of Oct 2025 and of Neo v3.5 (2026), both passing.
  No complete Neo webui was run.

This module adds Forge's own parts: clean weights in (`unload_all_models` unpatches any LoRA merged into them), the
UNet loaded through Forge's model management, and Forge's LoRA cache cleared after a file is written.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import re
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..trainer.bundle import SizeInfo
from ..trainer.bundles.patcher import PatcherBundle, text_encoder_slots
from ..trainer.bundles.patcher import detect_family as detect_patcher_family
from ..trainer.custom_layers import PLAIN_TENSORS, is_linear_like, unadaptable_reason
from ..trainer.errors import UnsupportedModelError
from ..trainer.families import FLOW, Family, get_family
from ..trainer.naming import UNetLayout, unet_targets
from . import webui

log = logging.getLogger(__name__)

MEMORY_MODULES = ("ldm_patched.modules.model_management", "backend.memory_management")
# Forge Neo's model config class (huggingface_guess model_list) → our family.
NEO_CONFIGS = {"SD15": "sd1", "SDXL": "sdxl", "Flux": "flux1", "FluxSchnell": "flux1-schnell"}
NEO_SUPPORTED = "SD 1.x, SDXL and Flux.1 dev/schnell"
NEO_ADM_SIZES = 6  # SDXL's size conditioning: height, width, crop top, crop left, target height, target width
UNRECOGNISED = ("this Forge model is not one LoRA Loop knows: forge_objects.unet.model is a {name}, neither Forge "
                "Classic's ldm_patched BaseModel (with model_sampling) nor Forge Neo's KModel (with a predictor)")
NEO_QUANTIZED = ("Forge Neo loaded this checkpoint with quantized layers ({path}: {cls}; {reason}). LoRA Loop attaches "
                 "adapters to layers whose weights are float matrices (fp32/fp16/bf16/fp8) and has not verified "
                 "training through Neo's dequantizing kernels (bitsandbytes nf4/fp4, GGUF, int8, nvfp4/mxfp8; "
                 "Nunchaku's SVDQ kernels have no backward at all). Load the fp16/bf16/fp8 checkpoint to train.")
NEO_FAST_FP8 = ("Forge Neo runs this model's fp8 Linear layers through torch._scaled_mm (--fast-fp8), which has no "
                "backward in PyTorch, so nothing can be trained through them; restart Forge without --fast-fp8.")
NEO_TEXT = "training the text encoder inside Forge Neo is not supported yet; turn train_text_encoder off"


def detected(model: Any = None) -> bool:
    """True inside Forge: its `modules_forge` package, or a model carrying `forge_objects`."""
    return (model is not None and hasattr(model, "forge_objects")) or webui.is_forge()


def memory_management() -> ModuleType | None:
    """Forge's model management (Classic: ldm_patched, Neo: backend), or None outside Forge."""
    for name in MEMORY_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def _objects(sd_model: Any) -> Any:
    """The pre-LoRA `forge_objects` (Forge keeps them as `forge_objects_original`), else the current ones."""
    return getattr(sd_model, "forge_objects_original", None) or sd_model.forge_objects


def is_neo(sd_model: Any) -> bool:
    """Forge Neo: its UNet patcher's model is a KModel, which carries a `predictor` (Classic's has `model_sampling`)."""
    return hasattr(getattr(_objects(sd_model).unet, "model", None), "predictor")


def check_trainable(model: Any) -> None:
    """Refuse a Forge model whose UNet LoRA Loop cannot adapt, naming why."""
    base = getattr(model.forge_objects.unet, "model", None)
    if is_neo(model):
        _check_neo_layers(_objects(model).unet.model)
    elif not hasattr(base, "model_sampling"):
        raise UnsupportedModelError(UNRECOGNISED.format(name=type(base).__name__))


def _check_neo_layers(kmodel: Any) -> None:
    storage = getattr(kmodel, "storage_dtype", None)
    for path, module in kmodel.diffusion_model.named_modules():
        if not _looks_linear(module):
            continue
        fp8 = getattr(getattr(module, "weight", None), "dtype", None) == torch.float8_e4m3fn
        if fp8 and type(module).__qualname__.startswith("fp8Operations."):  # --fast-fp8's layer class
            raise UnsupportedModelError(NEO_FAST_FP8)
        reason = _neo_layer_problem(module)
        if reason is not None:
            raise UnsupportedModelError(NEO_QUANTIZED.format(path=path, cls=type(module).__qualname__,
                                                             reason=f"{reason}; storage {storage}"))


def _neo_layer_problem(module: nn.Module) -> str | None:
    """Why a Neo layer cannot be trained through (None when it can): torch's own layer classes need a plain float
    weight too (Neo's quantized ops may subclass them), any other class must be linear-like."""
    if isinstance(module, nn.Linear | nn.Conv2d):
        weight = module.weight
        if type(weight) in PLAIN_TENSORS and weight.dtype.is_floating_point:
            return None
        return f"its weight is a {type(weight).__name__} of {weight.dtype}"
    return unadaptable_reason(module)


def detect_family(model: Any) -> tuple[Family, str]:
    """(family, prediction type) of a Forge model, Classic or Neo; anything else raises naming what it is."""
    check_trainable(model)
    if is_neo(model):
        return neo_family(_objects(model).unet.model)
    return detect_patcher_family(model.forge_objects.unet)


def neo_family(kmodel: Any) -> tuple[Family, str]:
    """(family, prediction type) of Neo's KModel from its model config's class and its predictor."""
    config = kmodel.config
    name = type(config).__name__
    key = NEO_CONFIGS.get(name)
    if key is None:
        repo = getattr(config, "huggingface_repo", None)
        raise UnsupportedModelError(f"this Forge Neo model is {name} ({repo}); inside Forge Neo LoRA Loop trains "
                                    f"{NEO_SUPPORTED}")
    predictor = kmodel.predictor
    kind = str(getattr(predictor, "prediction_type", ""))
    if "EDM" in type(predictor).__name__ or kind == "edm":
        raise UnsupportedModelError(f"EDM sampling ({type(predictor).__name__}) is not supported")
    prediction = {"const": FLOW, "epsilon": "epsilon", "eps": "epsilon", "v_prediction": "v_prediction"}.get(kind)
    if prediction is None:
        raise UnsupportedModelError(f"unknown prediction type {kind!r} of {type(predictor).__name__}")
    family = get_family(key)
    if (prediction == FLOW) != family.is_flow:
        raise UnsupportedModelError(f"this {name} model samples as {prediction}, not as {family.prediction_type}")
    # Input channels beyond the latent's: an inpainting/fill model. Not config.inpaint_model(), which says True for
    # every Flux (16 > 4); Neo's Flux engine overrides it.
    channels = (getattr(config, "unet_config", None) or {}).get("in_channels")
    if channels is not None and channels > family.latent_channels:
        raise UnsupportedModelError(f"inpainting models ({name} with {channels} input channels) are not supported")
    return family, prediction


def _looks_linear(module: nn.Module) -> bool:
    """A layer LoRA targets: torch's Linear/Conv2d, or a host class named Linear (Neo's ForgeOperations*.Linear, its
    quantized ones included, so that those are refused by name rather than skipped) or adaptable as one."""
    return isinstance(module, nn.Linear | nn.Conv2d) or type(module).__name__ == "Linear" or is_linear_like(module)


def neo_unet_targets(unet: nn.Module, conv: bool) -> dict[str, str]:
    """naming.unet_targets over Neo's layers: kohya's default UNet targets → `linear` or `conv3x3`."""
    return unet_targets(unet, conv, _looks_linear)


def neo_dit_targets(root: nn.Module, blocks: str, exclude: str | None = None) -> dict[str, str]:
    """naming.dit_targets over Neo's layers: every linear layer under a path matching `blocks`, minus `exclude`."""
    block_re, exclude_re = re.compile(blocks), re.compile(exclude) if exclude else None
    return {name: "linear" for name, module in root.named_modules()
            if _looks_linear(module) and not isinstance(module, nn.Conv2d) and block_re.match(name)
            and not (exclude_re is not None and exclude_re.search(name))}


class ForgeBundle(PatcherBundle):
    """`PatcherBundle` over `sd_model.forge_objects`, with the attributes the tab's run uses (a1111/training.py).

    `ForgeBundle(sd_model)` gives a `NeoBundle` for a Forge Neo model: the tab builds bundles through this one name.
    """

    lowvram = True  # Forge's model management places modules: the tab's own offloading stays out of its way

    def __new__(cls, sd_model: Any, name: str = "") -> ForgeBundle:
        if cls is ForgeBundle and is_neo(sd_model):
            cls = NeoBundle
        return super().__new__(cls)

    def __init__(self, sd_model: Any, name: str = "") -> None:
        objects = _objects(sd_model)
        super().__init__(objects.unet, objects.clip, objects.vae, name or webui.checkpoint_name(sd_model))
        self.sd_model = sd_model
        self._train_text = False
        self.inplace_residuals = True  # ldm_patched's transformer blocks add `x += attn(norm(x))` in place

    @property
    def text_module(self) -> nn.Module:
        return self.clip.cond_stage_model  # type: ignore[attr-defined]

    @property
    def train_text(self) -> bool:
        return self._train_text

    @train_text.setter
    def train_text(self, on: bool) -> None:
        """The tab's switch: with adapters on the CLIP, captions are encoded through it at every step."""
        self._train_text = bool(on)
        if on:
            self.train_text_encoders()
        else:
            self.live_text = False
            self.text_encoders = []

    def can_train_text(self) -> bool:
        try:
            text_encoder_slots(self.clip, self.family)
        except UnsupportedModelError:
            return False
        return True


class NeoBundle(ForgeBundle):
    """Forge Neo's `forge_objects`: `PatcherBundle`'s engine side (autograd set-up, caching, ε/v/velocity from x0)
    over Neo's KModel, with Neo's own ways to encode text and latents, its layers and its predictor.

    Text goes through the engine's `get_learned_conditioning` (Neo's prompt engines: chunking, clip skip, embeddings),
    latents through `encode_first_stage`/`decode_first_stage` (scaled as Neo scales them); SDXL's size conditioning is
    rebuilt per sample with the engine's own `embedder`.
    """

    def __init__(self, sd_model: Any, name: str = "") -> None:
        # Not PatcherBundle.__init__: it reads ComfyUI's model_config/model_sampling/latent_format, which Neo's KModel
        # does not have. The same attributes are set from Neo's objects (a test keeps the two sets equal).
        objects = _objects(sd_model)
        self.patcher = objects.unet
        self.clip = objects.clip
        self.vae = objects.vae
        self.sd_model = sd_model
        self.base_model = self.patcher.model
        self.family, self._prediction_type = neo_family(self.base_model)
        self.unet: nn.Module = self.base_model.diffusion_model
        self.text_encoders = []
        self.model_sampling = self.base_model.predictor
        if self.family.is_flow:
            self.sigmas = torch.zeros(0)
            self.alphas_cumprod = torch.zeros(0)
            self.layout = None
        else:
            self.sigmas = self.model_sampling.sigmas.detach().float().cpu().clone()
            self.alphas_cumprod = (1.0 / (1.0 + self.sigmas.double() ** 2)).float()
            self.layout = UNetLayout.from_ldm_module(self.unet)
        self.video_latent = False
        self.guidance = self.family.guidance
        self.name = name or webui.checkpoint_name(sd_model)
        self.context_tokens = None
        self.preview_decode = False
        self._text_cache = {}
        self.live_text = False
        self.clip_resident = False
        self.vae_resident = False
        self._attention_override = None
        self._train_text = False
        # Neo's UNet adds `x += attn(norm(x))` in place (backend/nn/unet.py) like ldm_patched; so does its Flux since
        # v3.5 (2026; its 2025 Flux did not).
        self.inplace_residuals = True

    @property
    def dtype(self) -> torch.dtype:
        """What Neo stores the UNet weights in (fp8 included: they are trained on as they are)."""
        return self.base_model.storage_dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.base_model.computation_dtype

    def can_train_text(self) -> bool:
        return False  # Neo's CLIPs are built from its own layers and encoded by its prompt engines: not wired up yet

    def train_text_encoders(self) -> None:
        raise UnsupportedModelError(NEO_TEXT)

    # -- images ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [-1, 1] → scaled latents, through the engine (it loads the VAE); a clone: Neo encodes under
        inference mode."""
        latents = self.sd_model.encode_first_stage(pixels.float())
        return latents.float().clone().to(self.device)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self.preview_decode:
            return self._neo_rgb_preview(latents)
        return self.sd_model.decode_first_stage(latents.float()).float().clone()

    def _neo_rgb_preview(self, latents: torch.Tensor) -> torch.Tensor:
        """The latent→RGB approximation of the model config's latent format (no VAE load mid-training)."""
        factors = getattr(getattr(self.base_model.config, "latent_format", None), "latent_rgb_factors", None)
        if factors is None or len(factors) != latents.shape[1]:
            rgb = latents[:, :3].float()
        else:
            weight = torch.tensor(factors, dtype=torch.float32, device=latents.device)
            rgb = torch.einsum("bchw,cr->brhw", latents.float(), weight)
        return torch.nn.functional.interpolate(rgb.clamp(-1, 1), scale_factor=8, mode="nearest")

    # -- text -----------------------------------------------------------------------------------------------------
    def _encode_tokens(self, caption: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context, pooled or None) of one caption from the engine's prompt encoder, read literally (brackets
        escaped, as the webui bundle does); cloned, since Neo encodes under inference mode. SDXL's pooled part is the
        CLIP-G embedding alone: `_adm` appends each sample's size embeddings."""
        from .bundle import literal  # a1111/bundle.py imports this module

        out = self.sd_model.get_learned_conditioning([literal(caption)])
        context, pooled = (out["crossattn"], out.get("vector")) if isinstance(out, dict) else (out, None)
        if pooled is not None and self.family.is_sdxl:
            pooled = pooled[:, : pooled.shape[1] - NEO_ADM_SIZES * self._embed_width()]
        pooled = pooled.clone() if pooled is not None and self.family.pooled_text else None
        return context.clone(), pooled

    def _embed_width(self) -> int:
        return int(self._embedder()(torch.zeros(1)).shape[-1])

    def _embedder(self) -> Any:
        embedder = getattr(self.sd_model, "embedder", None)
        if embedder is None:
            raise UnsupportedModelError("this Forge Neo SDXL engine has no size `embedder`; cannot condition on sizes")
        return embedder

    # -- denoiser -------------------------------------------------------------------------------------------------
    def shift_sigmas(self, u: torch.Tensor) -> torch.Tensor:
        """u ∈ (0, 1) → σ. Neo's Flux predictor keeps the identity as `sigma(t)` and bakes its μ shift into the sigma
        table only (backend/modules/k_prediction.py PredictionFlux), so the shift is applied here from `mu`, as
        ComfyUI's ModelSamplingFlux does: σ = e^μ / (e^μ + 1/u − 1). Other predictors shift in `sigma` itself."""
        mu = getattr(self.model_sampling, "mu", None)
        if mu is None:
            return super().shift_sigmas(u)
        t = u.float()
        return (math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))).to(u.device)

    def _adm(self, pooled: torch.Tensor | None, sizes: list[SizeInfo] | None, noisy: torch.Tensor) -> torch.Tensor:
        """SDXL's `y`: the pooled CLIP-G embedding and the engine's size embeddings of each sample, in Neo's order."""
        if pooled is None:
            raise UnsupportedModelError("SDXL conditioning without a pooled text embedding")
        embed = self._embedder()
        h, w = noisy.shape[-2] * 8, noisy.shape[-1] * 8
        infos = sizes or [SizeInfo((h, w), (0, 0), (h, w))] * noisy.shape[0]
        rows = []
        for i, info in enumerate(infos):
            target = info.target or info.original
            values = (*info.original, *info.crop_top_left, *target)
            flat = torch.cat([embed(torch.tensor([float(v)])) for v in values]).flatten().unsqueeze(0)
            rows.append(torch.cat([pooled[i : i + 1].float(), flat.float().to(pooled.device)], dim=1))
        return torch.cat(rows).to(noisy.device)

    def _velocity(self, x: torch.Tensor, sigmas: torch.Tensor, context: torch.Tensor,
                  pooled: torch.Tensor | None) -> torch.Tensor:
        """One KModel.apply_model call with Flux's inputs as Neo's sampler passes them (`y`, `guidance`)."""
        extra: dict[str, torch.Tensor] = {}
        if pooled is not None:
            extra["y"] = pooled
        if self.guidance is not None:
            extra["guidance"] = torch.full((x.shape[0],), float(self.guidance), device=x.device)
        denoised = self.base_model.apply_model(x.float(), sigmas, c_crossattn=context, transformer_options={},
                                               **extra).float()
        return (x.float() - denoised) / sigmas.view(-1, 1, 1, 1)

    # -- naming ---------------------------------------------------------------------------------------------------
    def unet_targets(self, conv: bool) -> dict[str, str]:
        if self.family.blocks is not None:
            return neo_dit_targets(self.unet, self.family.blocks, self.family.exclude)
        return neo_unet_targets(self.unet, conv)


@contextlib.contextmanager
def training_memory(bundle: ForgeBundle) -> Iterator[None]:
    """Clean base weights in, the UNet on the compute device for the run, Forge's placement back afterwards.

    `unload_all_models` unpatches every loaded model (Forge merges LoRA patches into the weights at load time and
    keeps a backup; Neo restores it when a patcher without those LoRAs, the pre-LoRA one the bundle holds, is loaded),
    so training sees the checkpoint's own weights; then the UNet alone is loaded. On exit everything is unloaded again:
    the next generation loads what it needs, LoRAs included, as Forge always does. Classic and Neo name these three
    functions alike (ldm_patched.modules.model_management, backend.memory_management).
    """
    mm = memory_management()
    if mm is not None:
        mm.unload_all_models()
        mm.load_models_gpu([bundle.patcher])
    try:
        yield
    finally:
        if mm is not None:
            mm.unload_all_models()
            mm.soft_empty_cache()


def forget_cached_lora() -> None:
    """Forge's Lora extension caches files by name (`load_lora_state_dict`, an lru_cache): a retrained file of the
    same name would not be read again. Clear it after writing."""
    networks = webui.lora_extension()
    for name in ("load_lora_state_dict", "load_networks_from_file"):
        cached = getattr(networks, name, None) if networks is not None else None
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()


__all__ = ["ForgeBundle", "NeoBundle", "check_trainable", "detect_family", "detected", "forget_cached_lora",
           "is_neo", "memory_management", "neo_family", "torch", "training_memory"]
