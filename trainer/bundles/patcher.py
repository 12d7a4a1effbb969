"""The engine's `ModelBundle` over a ComfyUI-design model: a ModelPatcher MODEL, a CLIP and a VAE.

ComfyUI holds its models this way, and so do the hosts built on its design (Forge Classic's `ldm_patched`, Forge Neo's
`backend`): the host bundles (nodes/bundle.py, a1111/forge.py) subclass `PatcherBundle` and add only what is theirs.
Everything here is duck-typed on those objects; no host module is imported.

Three facts of that design shape it (docs/hosts.md §3):
* `BaseModel.apply_model(x, sigma, …)` works in the variance-exploding form x = x0 + σ·n and returns the x0
  prediction, while the engine works in the DDPM form with integer timesteps and wants ε (or v). `predict` converts:
  x_ve = x_t/√ᾱ, σ = √((1-ᾱ)/ᾱ), ε = (x_ve - x0̂)/σ, v = √ᾱ·ε - √(1-ᾱ)·x0̂; ᾱ = 1/(1+σ²) comes from the model's own
  `model_sampling.sigmas`, so schedule patches (ModelSamplingDiscrete, zsnr) apply. Flow models (CONST sampling)
  return the velocity (x − x0̂)/σ.
* The host runs under `torch.inference_mode()`, so the loaded weights are inference tensors, which autograd
  refuses to save for backward. `trainable_weights` re-wraps each such parameter's storage as a normal tensor for the
  run (no copy: same memory) and puts the original Parameter objects back afterwards.
* VAEEncode latents are unscaled: `process_latent_in` scales them; SDXL needs `y` from `encode_adm`.

The CLIP's text models are `cond_stage_model.clip_<l|h|g>.transformer` with Hugging Face module names
(`text_model.encoder.layers.N.self_attn.q_proj`), so kohya's `lora_te_`/`lora_te1_`/`lora_te2_` names follow directly.
With `train_text_encoder` the captions are encoded through the CLIP at every step with autograd on; otherwise once.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import sys
from collections.abc import Iterator

import torch
from torch import nn

from ..bundle import Conditioning, SizeInfo, TextEncoderSlot
from ..errors import ConfigError, UnsupportedModelError
from ..families import FLOW, Family, get_family
from ..naming import UNetLayout, dit_targets, ldm_unet_lora_name, native_lora_name, unet_targets

log = logging.getLogger(__name__)

# ComfyUI model-config class name (comfy/supported_models.py) → our family.
SUPPORTED_CONFIGS = {"SD15": "sd1", "SD20": "sd2", "SDXL": "sdxl", "Flux": "flux1", "FluxSchnell": "flux1-schnell",
                     "Chroma": "chroma", "SD3": "sd3", "ZImage": "zimage", "Lumina2": "lumina2",
                     "QwenImage": "qwen-image"}
SUPPORTED_TEXT = ("SD 1.x, SD 2.x (incl. 768-v), SDXL, Flux.1 dev/schnell/Kontext, Chroma, SD3/3.5, Z-Image, Lumina 2 "
                  "and Qwen-Image")
# Models ComfyUI loads that we refuse, with what is missing (docs/families.md §2).
REFUSED_CONFIGS = {
    "FluxInpaint": "Flux Fill trains on a masked image beside the noise; train the base Flux.1 dev instead",
    "Flux2": "Flux.2 (dev/Klein) latents are 128-channel at 1/16 size, which our data pipeline does not produce yet",
    "ChromaRadiance": "Chroma Radiance works in pixel space, not on VAE latents",
    "ZImagePixelSpace": "this Z-Image variant works in pixel space, not on VAE latents",
}
TOKENS_PER_CHUNK = 77
MAX_CONTEXT_CHUNKS = 12  # lcm of the chunk counts of all captions; 1-4 chunks give at most 12


def _mro_names(obj: object) -> set[str]:
    return {cls.__name__ for cls in type(obj).__mro__}


def prediction_type_of(model_sampling: object) -> str:
    """`epsilon`, `v_prediction` or `flow` from a ComfyUI model_sampling object (V_PREDICTION subclasses EPS: test it
    first; CONST is rectified flow)."""
    names = _mro_names(model_sampling)
    if "CONST" in names:
        if float(getattr(model_sampling, "noise_scale", 1.0)) != 1.0:
            raise UnsupportedModelError(f"flow model sampling with noise_scale {model_sampling.noise_scale} "
                                        "is not supported")
        return FLOW
    if not hasattr(model_sampling, "sigmas"):
        msg = (f"model sampling {type(model_sampling).__name__} has no discrete sigma schedule; "
               "LoRA Loop trains DDPM and rectified-flow models only")
        raise UnsupportedModelError(msg)
    if "EDM" in names:
        raise UnsupportedModelError("EDM model sampling is not supported")
    if "V_PREDICTION" in names:
        return "v_prediction"
    if "EPS" in names:
        return "epsilon"
    raise UnsupportedModelError(f"unknown prediction type of {type(model_sampling).__name__}")


def model_object(patcher: object, name: str) -> object:
    """`patcher.get_model_object(name)`: an object patch (a ModelSampling* node's) or the model's own. Forge Classic's
    older ModelPatcher has no such method: its object patches are looked up by hand."""
    get = getattr(patcher, "get_model_object", None)
    if get is not None:
        return get(name)
    patches = getattr(patcher, "object_patches", {}) or {}
    return patches[name] if name in patches else getattr(patcher.model, name)  # type: ignore[attr-defined]


def detect_family(patcher: object) -> tuple[Family, str]:
    """(family, prediction type) of a ComfyUI MODEL; anything else raises naming what it is and what we train."""
    base = patcher.model  # type: ignore[attr-defined]
    config_name = type(getattr(base, "model_config", None)).__name__
    if config_name in REFUSED_CONFIGS:
        raise UnsupportedModelError(f"this MODEL is {config_name}: {REFUSED_CONFIGS[config_name]}")
    key = SUPPORTED_CONFIGS.get(config_name)
    if key is None:
        msg = (f"this MODEL is {config_name} ({type(base).__name__}); "
               f"LoRA Loop can train {SUPPORTED_TEXT}")
        raise UnsupportedModelError(msg)
    if getattr(base, "concat_keys", ()):
        msg = (f"inpainting/instruct models ({config_name} with extra input channels {list(base.concat_keys)}) "
               "are not supported")
        raise UnsupportedModelError(msg)
    prediction = prediction_type_of(model_object(patcher, "model_sampling"))
    family = get_family(key)
    if (prediction == FLOW) != family.is_flow:
        msg = (f"this {config_name} MODEL samples as {prediction}, not as {family.prediction_type}; "
               "remove the model-sampling node that changed it, then train")
        raise UnsupportedModelError(msg)
    if key == "sd2" and prediction == "v_prediction":
        key = "sd2-v"
    return get_family(key), prediction


def _normal_view(t: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) tensor over the same storage as `t`: no copy, no new memory."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), t.size(),
                                                               t.stride())


def _needs_view(t: torch.Tensor | None) -> bool:
    if t is None or type(t) not in (torch.Tensor, nn.Parameter) or t.is_meta:
        return False  # quantized/lazy weight classes are cast to fresh tensors by comfy.ops on every forward
    return t.is_inference()


@contextlib.contextmanager
def trainable_weights(root: nn.Module) -> Iterator[int]:
    """Make every inference-tensor parameter/buffer of `root` usable by autograd for the duration, without copying.

    Each one is replaced by a frozen Parameter (or plain buffer) viewing the same storage; on exit the original objects
    are put back, so the module is bit-identical and identical in identity afterwards. Must run with inference mode off.
    Yields how many tensors were re-wrapped.
    """
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    try:
        for module in root.modules():
            for table in (module._parameters, module._buffers):
                for name, tensor in list(table.items()):
                    if not _needs_view(tensor):
                        continue
                    view = _normal_view(tensor)
                    table[name] = nn.Parameter(view, requires_grad=False) if isinstance(tensor, nn.Parameter) else view
                    swapped.append((table, name, tensor))
        yield len(swapped)
    finally:
        for table, name, original in reversed(swapped):
            table[name] = original


def _eager_rope1(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """ComfyUI's own PyTorch rope (comfy/ldm/flux/math.py `_apply_rope1`), which autograd can differentiate."""
    x_ = x.to(dtype=freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    if x_.shape[2] != 1 and freqs_cis.shape[2] != 1 and x_.shape[2] != freqs_cis.shape[2]:
        freqs_cis = freqs_cis[:, :, : x_.shape[2]]
    out = freqs_cis[..., 0] * x_[..., 0] + freqs_cis[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


def _eager_rope(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _eager_rope1(xq, freqs_cis), _eager_rope1(xk, freqs_cis)


_EAGER_ROPE = {"apply_rope": _eager_rope, "apply_rope1": _eager_rope1}


@contextlib.contextmanager
def host_autograd() -> Iterator[int]:
    """The host's models run kernels that autograd can differentiate, for the duration.

    ComfyUI runs rope (Flux, Chroma, Lumina 2, Z-Image, Qwen-Image, …) through comfy_kitchen's fused custom ops, which
    have no backward ("Trying to backward through comfy_kitchen.apply_rope1…"). ComfyUI 0.3x switches to its eager code
    while `comfy.model_management.in_training` is set (what its own LoRA trainer does); 0.12.x binds the kernels into
    the model modules at import (`from comfy.ldm.flux.math import apply_rope1`), so those names point at the eager code
    for the duration. Everything is put back on exit. Yields how many module names were re-pointed.
    """
    mm = sys.modules.get("comfy.model_management")
    previous = getattr(mm, "in_training", None)
    swapped: list[tuple[object, str, object]] = []
    try:
        if isinstance(previous, bool):
            mm.in_training = True  # type: ignore[union-attr]
        for name, module in list(sys.modules.items()):
            if module is None or name.startswith("comfy_kitchen"):
                continue
            for attr, eager in _EAGER_ROPE.items():
                kernel = getattr(module, "__dict__", {}).get(attr)
                if kernel is not None and str(getattr(kernel, "__module__", "")).startswith("comfy_kitchen"):
                    setattr(module, attr, eager)
                    swapped.append((module, attr, kernel))
        yield len(swapped)
    finally:
        for module, attr, kernel in reversed(swapped):
            setattr(module, attr, kernel)
        if isinstance(previous, bool):
            mm.in_training = previous  # type: ignore[union-attr]


def _clone_input(_module: nn.Module, args: tuple) -> tuple | None:
    if not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor) or not args[0].requires_grad:
        return None
    return (args[0].clone(), *args[1:])


@contextlib.contextmanager
def autograd_safe_residuals(roots: list[nn.Module]) -> Iterator[int]:
    """Let autograd run through ComfyUI's CLIP, whose layers update the residual stream in place
    (`x += self.self_attn(self.layer_norm1(x))`, comfy/clip_model.py): each LayerNorm gets a private copy of its input,
    which is what backward needs, so the in-place add no longer invalidates it ("modified by an inplace operation").

    Only norm layers are hooked (two per transformer layer, one [tokens, width] copy each); the hooks are removed on
    exit. Yields how many were added.
    """
    handles = []
    try:
        for root in roots:
            for module in root.modules():
                if isinstance(module, nn.LayerNorm | nn.GroupNorm):
                    handles.append(module.register_forward_pre_hook(_clone_input))
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()


# ComfyUI CLIP slot → kohya prefix, per family: SD1 has clip_l, SD2 clip_h, SDXL clip_l (te1) and clip_g (te2).
# Flux.1's CLIP-L (te1; it gives the pooled vector) and SD3's CLIP-L/G (te1/te2) are what kohya trains; their T5 is not.
CLIP_SLOTS = {"sd1": (("clip_l", "lora_te"),), "sd2": (("clip_h", "lora_te"),), "sd2-v": (("clip_h", "lora_te"),),
              "sdxl": (("clip_l", "lora_te1"), ("clip_g", "lora_te2")), "flux1": (("clip_l", "lora_te1"),),
              "flux1-schnell": (("clip_l", "lora_te1"),), "sd3": (("clip_l", "lora_te1"), ("clip_g", "lora_te2"))}


def text_encoder_slots(clip: object, family: Family) -> list[TextEncoderSlot]:
    """The CLIP's text models as engine slots (for text-encoder LoRA training)."""
    model = getattr(clip, "cond_stage_model", None)
    slots = []
    if family.name not in CLIP_SLOTS:
        msg = (f"{family.name} has no CLIP text encoder to train (its encoder is an LLM or T5, which LoRA trainers "
               "leave frozen); set train_text_encoder off")
        raise UnsupportedModelError(msg)
    expected = CLIP_SLOTS[family.name]
    for attr, prefix in expected:
        transformer = getattr(getattr(model, attr, None), "transformer", None)
        if isinstance(transformer, nn.Module):
            slots.append(TextEncoderSlot(transformer, prefix))
    if len(slots) != len(expected):
        found = sorted(n for n, _ in model.named_children()) if isinstance(model, nn.Module) else type(model).__name__
        msg = (f"cannot train the text encoder of this CLIP ({found}); a {family.name} CLIP has "
               f"{' and '.join(a for a, _ in expected)}; set train_text_encoder off to train the UNet only")
        raise UnsupportedModelError(msg)
    return slots


def _drop_padding(context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A DiT text encoder's mask (ones, then padding) applied by dropping the padded tokens: ComfyUI hands the mask to
    the model, which then attends to the first mask.sum() tokens, the same input as the shorter context."""
    if mask is None or context.shape[0] != 1:
        return context
    flat = mask.reshape(-1)
    n = max(1, int(flat.sum().item()))
    return context[:, :n] if bool(flat[:n].all()) else context


def _lcm(values: list[int]) -> int:
    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out


class PatcherBundle:
    """`ModelBundle` over a ComfyUI-design MODEL (ModelPatcher), CLIP and VAE.

    Args:
        model: the MODEL input (trained in place through the engine's adapters, restored afterwards).
        clip: the CLIP input (encodes captions; its text models get adapters when the text encoder trains).
        vae: the VAE input (encodes images; frozen); may be None when latents are never encoded.
        name: written as `ss_sd_model_name`.
        attention_override: a host's `transformer_options["optimized_attention_override"]` for training (None: the
            host's own attention).
    """

    def __init__(self, model: object, clip: object, vae: object, name: str = "ComfyUI model",
                 attention_override: object | None = None) -> None:
        self.patcher = model
        self.clip = clip
        self.vae = vae
        self.family, self._prediction_type = detect_family(model)
        self.base_model = model.model  # type: ignore[attr-defined]
        self.unet: nn.Module = self.base_model.diffusion_model
        self.text_encoders: list[TextEncoderSlot] = []
        self.model_sampling = model_object(model, "model_sampling")
        if self.family.is_flow:
            self.sigmas = torch.zeros(0)
            self.alphas_cumprod = torch.zeros(0)  # flow models have no ᾱ table: σ comes from `shift_sigmas`
            self.layout = None
        else:
            # a normal tensor, even if read under inference mode
            self.sigmas = self.model_sampling.sigmas.detach().float().cpu().clone()
            self.alphas_cumprod = (1.0 / (1.0 + self.sigmas.double() ** 2)).float()
            self.layout = UNetLayout.from_ldm_module(self.unet)
        # Qwen-Image's (Wan 2.1) latents are video-shaped [B,C,T,H,W]: the engine holds [B,C,H,W], the bundle adds T.
        self.video_latent = getattr(self.base_model.latent_format, "latent_dimensions", 2) == 3
        # Flux.1 dev's distilled-guidance input: 1.0 while training, as kohya/musubi/ai-toolkit feed it (a LoRA
        # trained at the sampling value 3.5 learns to undo the guidance); the sampler switches it to 3.5.
        self.guidance = self.family.guidance
        self.name = name
        self.context_tokens: int | None = None  # every context is repeated to this length (see `set_caption_lengths`)
        self.preview_decode = False  # True while training: decode previews without loading the VAE
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.live_text = False  # True while the text encoder trains: encode through the (adapted) CLIP every time
        self.clip_resident = False  # True while TrainLoRA holds the CLIP loaded for training (see `_encode_tokens`)
        self.vae_resident = False  # … and the VAE, when images are encoded every step (`cache_latents: false`)
        self._attention_override = attention_override
        # ComfyUI's DiT blocks add residuals in place right after a norm saved the same tensor (`img += …`,
        # comfy/ldm/flux/layers.py); its SD UNets do not, and hooking their norms would copy activations for nothing.
        self.inplace_residuals = self.family.is_flow

    @contextlib.contextmanager
    def trainable(self, text: bool | None = None) -> Iterator[int]:
        """Autograd through the host's modules for a run: the UNet's (and with `text`, default: while the text encoder
        trains, the CLIP's) inference-tensor weights re-wrapped (`trainable_weights`), kernels that have a backward
        (`host_autograd`), and the norms' saved inputs kept from in-place residual adds where the model does them
        (`inplace_residuals`; ComfyUI's CLIP always, comfy/clip_model.py). Yields how many tensors were re-wrapped."""
        text = self.live_text if text is None else text
        with contextlib.ExitStack() as stack:
            count = stack.enter_context(trainable_weights(self.unet))
            stack.enter_context(host_autograd())
            if self.inplace_residuals:
                stack.enter_context(autograd_safe_residuals([self.unet]))
            if text:
                clip_model = self.clip.cond_stage_model  # type: ignore[attr-defined]
                count += stack.enter_context(trainable_weights(clip_model))
                stack.enter_context(autograd_safe_residuals([clip_model]))
            yield count

    @property
    def prediction_type(self) -> str:
        return self._prediction_type

    @property
    def device(self) -> torch.device:
        return torch.device(self.patcher.load_device)  # type: ignore[attr-defined]

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype as ComfyUI holds them (fp8 included: they are trained on as they are)."""
        return self.patcher.model_dtype()  # type: ignore[attr-defined]

    @property
    def compute_dtype(self) -> torch.dtype:
        """What ComfyUI computes in: its manual-cast dtype for weights stored narrower (fp8 → bf16/fp16)."""
        return getattr(self.base_model, "manual_cast_dtype", None) or self.dtype

    # -- images ---------------------------------------------------------------------------------------------------
    # The VAE and CLIP are frozen and their weights are inference tensors with requires_grad=True (ComfyUI 0.12.3):
    # with autograd on (training runs outside inference mode), a layer that uses such a weight without a dtype cast
    # fails with "Inference tensors cannot be saved for backward". Nothing needs gradients through them: no_grad.
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        images = ((pixels.float() + 1.0) / 2.0).clamp(0, 1).movedim(1, -1)  # ComfyUI IMAGE: [B,H,W,C] in [0,1]
        vae = self.vae
        if self.vae_resident and all(hasattr(vae, n) for n in ("first_stage_model", "process_input", "vae_dtype")):
            # VAE.encode without its load_models_gpu (see `_encode_tokens`): TrainLoRA loaded the VAE for training.
            x = vae.process_input(images.movedim(-1, 1)).to(vae.vae_dtype).to(vae.device)  # type: ignore[attr-defined]
            raw = vae.first_stage_model.encode(x)  # type: ignore[attr-defined]
        else:
            raw = vae.encode(images)  # type: ignore[attr-defined]
        latents = self.base_model.process_latent_in(raw.float())
        if latents.dim() == 5:  # an image is one frame of a video latent
            latents = latents[:, :, 0]
        return latents.to(self.device)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self.preview_decode:
            return self._rgb_preview(latents)
        latents = latents.float().unsqueeze(2) if self.video_latent else latents.float()
        images = self.vae.decode(self.base_model.process_latent_out(latents))  # type: ignore[attr-defined]
        images = images.reshape(-1, *images.shape[-3:])  # video VAEs decode [B,T,H,W,C]
        return images.float().movedim(-1, 1) * 2.0 - 1.0

    def _rgb_preview(self, latents: torch.Tensor) -> torch.Tensor:
        """ComfyUI's latent→RGB approximation (latent_format.latent_rgb_factors): no VAE load mid-training."""
        fmt = self.base_model.latent_format
        factors = getattr(fmt, "latent_rgb_factors", None)
        if factors is not None and len(factors) != latents.shape[1]:
            factors = None
        if factors is None:
            rgb = latents[:, :3]
        else:
            weight = torch.tensor(factors, dtype=torch.float32, device=latents.device)
            rgb = torch.einsum("bchw,cr->brhw", latents.float(), weight)
            bias = getattr(fmt, "latent_rgb_factors_bias", None)
            if bias is not None:
                rgb = rgb + torch.tensor(bias, dtype=torch.float32, device=latents.device).view(1, -1, 1, 1)
        return torch.nn.functional.interpolate(rgb.clamp(-1, 1), scale_factor=8, mode="nearest")

    # -- text -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_one(self, caption: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if caption not in self._text_cache:
            context, pooled = self._encode_tokens(caption)
            pooled = pooled.detach().float().cpu().clone() if pooled is not None else None
            self._text_cache[caption] = (context.detach().float().cpu().clone(), pooled)
        return self._text_cache[caption]

    def _encode_live(self, caption: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Through the CLIP as it is now (adapters included), with autograd as the caller has it."""
        context, pooled = self._encode_tokens(caption)
        return context.float(), pooled.float() if pooled is not None else None

    def _encode_tokens(self, caption: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context, pooled or None) of one caption.

        While `clip_resident` (TrainLoRA loaded the CLIP beside the UNet for training) this is `CLIP.encode_from_tokens`
        without its `load_model()`: a model-management call mid-training could unload part of the UNet, to make room
        for inference memory, while its weights are re-wrapped for autograd. Otherwise (and on a ComfyUI without these
        methods) it is the public call, which loads the CLIP as ComfyUI likes.
        """
        tokens = self.clip.tokenize(caption)  # type: ignore[attr-defined]
        model = self.clip.cond_stage_model  # type: ignore[attr-defined]
        direct = ("reset_clip_options", "set_clip_options", "encode_token_weights")
        if self.clip_resident and all(hasattr(model, n) for n in direct):
            model.reset_clip_options()
            if getattr(self.clip, "layer_idx", None) is not None:
                model.set_clip_options({"layer": self.clip.layer_idx})  # type: ignore[attr-defined]
            model.set_clip_options({"execution_device": self.clip.patcher.load_device})  # type: ignore[attr-defined]
            out = model.encode_token_weights(tokens)
            context, pooled = out[:2]
            extra = out[2] if len(out) > 2 and isinstance(out[2], dict) else {}
        else:
            encode = self.clip.encode_from_tokens  # type: ignore[attr-defined]
            if "return_dict" in inspect.signature(encode).parameters:
                extra = encode(tokens, return_pooled=True, return_dict=True)
            else:  # an older design (Forge Classic's ldm_patched) returns (cond, pooled) only
                cond, pooled_out = encode(tokens, return_pooled=True)
                extra = {"cond": cond, "pooled_output": pooled_out}
            context, pooled = extra["cond"], extra.get("pooled_output")
        if self.family.is_flow:
            context = _drop_padding(context, extra.get("attention_mask"))
        return context, pooled if self.family.pooled_text else None

    def train_text_encoders(self) -> None:
        """Expose the CLIP's text models to the engine and encode captions live from now on."""
        self.text_encoders = text_encoder_slots(self.clip, self.family)
        self.live_text = True

    def set_caption_lengths(self, captions: list[str]) -> None:
        """Fix the context length for a run: captions longer than 75 tokens give 154/231… tokens; like ComfyUI's own
        conditioning batching, shorter contexts are repeated to a common multiple (attention is unchanged by that).
        DiT text encoders are not chunked: each caption keeps its own length (`Conditioning.lengths`)."""
        if self.family.is_flow:
            return
        chunks = {self._encode_one(c)[0].shape[1] // TOKENS_PER_CHUNK for c in set(captions)}
        common = _lcm(sorted(chunks)) if chunks else 1
        if common > MAX_CONTEXT_CHUNKS:
            msg = (f"captions of {sorted(chunks)} x 75 tokens cannot share one context length "
                   f"(it would be {common} x 77 tokens); shorten the longest captions")
            raise ConfigError(msg, key="captions")
        self.context_tokens = common * TOKENS_PER_CHUNK if chunks else None

    def cache_text(self, captions: list[str]) -> None:
        """Encode `captions` now (before the UNet is loaded), so training never has to load the CLIP."""
        for caption in captions:
            self._encode_one(caption)

    def encode_text(self, captions: list[str]) -> Conditioning:
        pairs = [self._encode_live(c) if self.live_text else self._encode_one(c) for c in captions]
        if self.family.is_flow:
            return Conditioning.cat([Conditioning(ctx, p, torch.tensor([ctx.shape[1]])) for ctx, p in pairs]).to(
                self.device)
        lengths = [ctx.shape[1] for ctx, _ in pairs]
        target = _lcm([*lengths, self.context_tokens or lengths[0]])
        contexts = [ctx.repeat(1, target // ctx.shape[1], 1) for ctx, _ in pairs]
        pooled = torch.cat([p for _, p in pairs]).to(self.device) if self.family.pooled_text else None
        return Conditioning(torch.cat(contexts).to(self.device), pooled)

    # -- denoiser -------------------------------------------------------------------------------------------------
    def shift_sigmas(self, u: torch.Tensor) -> torch.Tensor:
        """u ∈ (0, 1) → σ through the MODEL's own model_sampling: `timestep` maps an unshifted σ to model time and
        `sigma` applies the shift (ModelSamplingFlux's μ, DiscreteFlow's α, or a user's ModelSampling* node)."""
        ms = self.model_sampling
        return ms.sigma(ms.timestep(u.float())).float().to(u.device)  # type: ignore[attr-defined]

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                sizes: list[SizeInfo] | None = None) -> torch.Tensor:
        if self.family.is_flow:
            return self._predict_flow(noisy, timesteps, cond)
        device = noisy.device
        a = self.alphas_cumprod.to(device)[timesteps].view(-1, 1, 1, 1)
        sigma = self.sigmas.to(device)[timesteps]
        x_ve = noisy.float() / a.sqrt()
        extra = {}
        if self.family.is_sdxl:
            extra["y"] = self._adm(cond.pooled, sizes, noisy)
        options = {"optimized_attention_override": self._attention_override} if self._attention_override else {}
        x0 = self.base_model.apply_model(x_ve, sigma, c_crossattn=cond.context, transformer_options=options, **extra)
        eps = (x_ve - x0.float()) / sigma.view(-1, 1, 1, 1)
        if self.prediction_type == "v_prediction":
            return a.sqrt() * eps - (1 - a).sqrt() * x0.float()
        return eps

    def _predict_flow(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Velocity v̂ = (x_σ − D)/σ from ComfyUI's x0 prediction D; rows whose captions differ in length run apart."""
        groups = cond.rows()
        if len(groups) == 1:
            return self._velocity(noisy, sigmas, cond.context[:, : groups[0][0]], cond.pooled)
        order, parts = [], []
        for length, rows in groups:
            index = torch.tensor(rows, device=noisy.device)
            pooled = None if cond.pooled is None else cond.pooled[index]
            parts.append(self._velocity(noisy[index], sigmas[index], cond.context[index, :length], pooled))
            order.extend(rows)
        return torch.cat(parts)[torch.tensor(order).argsort().to(noisy.device)]

    def _velocity(self, x: torch.Tensor, sigmas: torch.Tensor, context: torch.Tensor,
                  pooled: torch.Tensor | None) -> torch.Tensor:
        """One apply_model call with the conditioning built by the model's own `extra_conds` (guidance, num_tokens,
        pooled `y` — whatever the family takes), as ComfyUI's sampler builds it."""
        x_in = x.float().unsqueeze(2) if self.video_latent else x.float()
        # `pooled_output` always (None where the family has none), as in every ComfyUI conditioning: 0.12.3's
        # Flux.encode_adm, which Chroma inherits, reads kwargs["pooled_output"] and raises KeyError without it.
        kwargs: dict[str, object] = {"noise": x_in, "device": x.device, "cross_attn": context, "pooled_output": pooled}
        if self.guidance is not None:
            kwargs["guidance"] = self.guidance
        conds = self.base_model.extra_conds(**kwargs)
        extra = {name: c.process_cond(batch_size=x.shape[0], device=x.device, area=None).cond
                 for name, c in conds.items()}
        options = {"optimized_attention_override": self._attention_override} if self._attention_override else {}
        denoised = self.base_model.apply_model(x_in, sigmas, transformer_options=options, **extra).float()
        if self.video_latent:
            denoised = denoised[:, :, 0]
        return (x.float() - denoised) / sigmas.view(-1, 1, 1, 1)

    def _adm(self, pooled: torch.Tensor | None, sizes: list[SizeInfo] | None, noisy: torch.Tensor) -> torch.Tensor:
        if pooled is None:
            raise UnsupportedModelError("SDXL conditioning without a pooled text embedding; is the CLIP an SDXL CLIP?")
        h, w = noisy.shape[-2] * 8, noisy.shape[-1] * 8
        infos = sizes or [SizeInfo((h, w), (0, 0), (h, w))] * noisy.shape[0]
        rows = []
        for i, info in enumerate(infos):
            target = info.target or info.original
            rows.append(self.base_model.encode_adm(
                pooled_output=pooled[i : i + 1], height=info.original[0], width=info.original[1],
                crop_h=info.crop_top_left[0], crop_w=info.crop_top_left[1], target_height=target[0],
                target_width=target[1]))
        return torch.cat(rows).to(noisy.device)

    # -- naming ---------------------------------------------------------------------------------------------------
    def unet_lora_name(self, module_path: str) -> str:
        if self.layout is None:
            return native_lora_name(module_path)
        return ldm_unet_lora_name(self.family.unet_names, self.layout, module_path)

    def unet_targets(self, conv: bool) -> dict[str, str]:
        if self.family.blocks is not None:  # DiTs: Linears of the transformer blocks (no convs to add)
            return dit_targets(self.unet, self.family.blocks, self.family.exclude, self.family.last_block_unused)
        return unet_targets(self.unet, conv)
