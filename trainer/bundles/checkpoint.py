"""Load a base model from disk (single-file checkpoint or diffusers folder) into a `DiffusersBundle`, offline.

Single files (.safetensors / .ckpt in the LDM/SGM layout that A1111, ComfyUI and civitai use) are read in three steps:
1. the keys and shapes alone tell the family (`detect_family`), so a wrong file fails before any weight is read;
2. the UNet and VAE go through diffusers' `from_single_file` with `config=` pointing at the config-only folders
   shipped in `model_configs/` (docs/lora-format.md §4a: with a local config folder nothing is fetched from the Hub);
3. the text encoders are converted here (CLIP-L keys are already in transformers' layout; OpenCLIP keys are renamed and
   the fused attention projection split) and handed to transformers' `from_pretrained(None, config=…, state_dict=…)`.
diffusers' own text-encoder route picks the encoder by key presence and widths, which loads SDXL's CLIP-L weights into
the second encoder when both have the same width (the tiny test model) and leaves weights it did not find on the meta
device without a word; converting here keeps every load strict.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import zipfile
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, LoraLoopError, UnsupportedModelError
from ..families import get_family
from ..tokenizer import load_clip_tokenizer
from .diffusers_bundle import DiffusersBundle
from .tiny import build_tiny_bundle

log = logging.getLogger(__name__)

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "model_configs"
SUPPORTED = ("SD 1.x, SD 2.x (512 or 768-v) and SDXL base 1.0, as a single .safetensors/.ckpt file or a diffusers "
             "folder (with model_index.json)")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
_UNET_IN = UNET_PREFIX + "input_blocks.0.0.weight"
_LABEL_EMB = UNET_PREFIX + "label_emb.0.0.weight"
_BASE_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL base"}


@dataclass(frozen=True)
class TextEncoderSpec:
    """Where one text encoder lives in a single file and in a diffusers folder.

    Args:
        prefix: key prefix in the LDM/SGM single file.
        layout: `hf` (transformers CLIP names, as SD1 and SDXL's CLIP-L are stored) or `open_clip` (SD2, SDXL bigG).
        subfolder: diffusers subfolder of the model (and of our config folders).
        projection: the diffusers class is `CLIPTextModelWithProjection` (SDXL's second encoder).
        tokenizer: our offline tokenizer kind (`clip-l` / `open-clip`) and `tokenizer_subfolder` its diffusers folder.
    """

    prefix: str
    layout: str
    subfolder: str
    projection: bool
    tokenizer: str
    tokenizer_subfolder: str


TEXT_ENCODERS: dict[str, tuple[TextEncoderSpec, ...]] = {
    "sd1": (TextEncoderSpec("cond_stage_model.transformer.", "hf", "text_encoder", False, "clip-l", "tokenizer"),),
    "sd2": (TextEncoderSpec("cond_stage_model.model.", "open_clip", "text_encoder", False, "open-clip",
                            "tokenizer"),),
    "sdxl": (TextEncoderSpec("conditioner.embedders.0.transformer.", "hf", "text_encoder", False, "clip-l",
                             "tokenizer"),
             TextEncoderSpec("conditioner.embedders.1.model.", "open_clip", "text_encoder_2", True, "open-clip",
                             "tokenizer_2")),
}


# ---------------------------------------------------------------------------------------------------------------------
# Family detection on keys and shapes
# ---------------------------------------------------------------------------------------------------------------------
def _shape_of(value: Any) -> tuple[int, ...] | None:
    """A tensor's (or shape-like) shape; None for the non-tensor entries some pickles carry (`global_step`, …)."""
    shape = getattr(value, "shape", value)
    return tuple(int(d) for d in shape) if isinstance(shape, (tuple, list, torch.Size)) else None


def _key_prefixes(keys: list[str], limit: int = 6) -> str:
    """The most common key prefixes (two dotted parts), with counts: `model.diffusion_model (1680), …`."""
    counts = Counter(".".join(k.split(".")[:2]) if k.count(".") >= 2 else k.split(".")[0] for k in keys)
    return ", ".join(f"{p} ({n})" for p, n in counts.most_common(limit))


class FlowSingleFile(UnsupportedModelError):
    """A single-file Flux.1/SD3 transformer: loaded with `components_from` (bundles/flow_loading.py)."""


def _unsupported(source: str, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{source} is {what}, which LoRA Loop cannot train; supported: {SUPPORTED}")


_LORA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lycoris_")
_LORA_MARKERS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".lora.down.", ".hada_w1_a", ".lokr_w1")


def _reject_other_models(keys: list[str], source: str) -> None:
    """Raise for files that are known not to be SD1/SD2/SDXL checkpoints (checked before anything else)."""
    lora = next((k for k in keys if k.startswith(_LORA_PREFIXES) or any(m in k for m in _LORA_MARKERS)), None)
    if lora is not None:
        msg = (f"{source} is a LoRA, not a checkpoint (it has keys like {lora!r}); give the base model the LoRA was "
               f"made for instead. Supported base models: {SUPPORTED}")
        raise UnsupportedModelError(msg)
    host_only = (
        (lambda k: "joint_blocks." in k, "a Stable Diffusion 3 / 3.5 (MMDiT) model"),
        (lambda k: "double_blocks." in k, "a Flux.1 / Chroma model"),
    )
    for test, what in host_only:
        if any(test(k) for k in keys):
            raise FlowSingleFile(f"{source} is {what}")
    checks = (
        (lambda k: k == "clip_txt_mapper.weight" or ".channelwise." in k, "a Stable Cascade model"),
        (lambda k: k.startswith(UNET_PREFIX) and (".time_stack." in k or ".time_mixer." in k),
         "a Stable Video Diffusion (SVD) model"),
        (lambda k: "motion_modules." in k, "an AnimateDiff motion module"),
        (lambda k: k.startswith("control_model.") or "input_hint_block." in k or "controlnet_cond_embedding." in k,
         "a ControlNet"),
        (lambda k: k == "edm_mean", "Playground v2.5 (an EDM-schedule model)"),
    )
    for test, what in checks:
        if any(test(k) for k in keys):
            raise _unsupported(source, what)


def _no_unet_error(keys: list[str], source: str) -> UnsupportedModelError:
    """The error for a file without `model.diffusion_model.*`: say what it is if we can tell."""
    vae = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", VAE_PREFIX, "vae.")
    text = ("text_model.", "cond_stage_model.", "conditioner.", "text_projection", "logit_scale", "transformer.",
            "token_embedding", "positional_embedding", "ln_final")
    if all(k.startswith(vae) for k in keys):
        return _unsupported(source, "a VAE-only file (no UNet, no text encoder)")
    if all(k.startswith(text) for k in keys):
        return _unsupported(source, "a text-encoder-only file (no UNet, no VAE)")
    if "input_blocks.0.0.weight" in keys or "diffusion_model.input_blocks.0.0.weight" in keys:
        return _unsupported(source, "a UNet-only file (no VAE, no text encoder)")
    if "conv_in.weight" in keys and any(k.startswith("down_blocks.") for k in keys):
        return _unsupported(source, "the UNet weights of a diffusers folder; give the whole folder (the one with "
                                    "model_index.json) instead")
    msg = (f"{source} is not a Stable Diffusion checkpoint LoRA Loop recognises (no {UNET_PREFIX}* keys; key prefixes "
           f"found: {_key_prefixes(keys)}); supported: {SUPPORTED}")
    return UnsupportedModelError(msg)


def _check_in_channels(shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    channels = shapes[_UNET_IN][1]
    named = {9: "an inpainting model (UNet in_channels 9)", 8: "an InstructPix2Pix model (UNet in_channels 8)"}
    if channels in named:
        raise _unsupported(source, named[channels])
    if channels != 4:
        raise _unsupported(source, f"a model whose UNet takes {channels} input channels (e.g. depth-to-image or an "
                                   "upscaler; text-to-image models take 4)")


def _has(keys: list[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _base_from_text_encoders(keys: list[str], source: str) -> str:
    """`sd1` / `sd2` / `sdxl` from which text encoders the file holds (their layout differs per family)."""
    if _has(keys, "conditioner.embedders.0.model.") and not _has(keys, "conditioner.embedders.1."):
        raise _unsupported(source, "an SDXL refiner (only an OpenCLIP bigG text encoder)")
    for base, specs in TEXT_ENCODERS.items():
        if all(_has(keys, spec.prefix) for spec in specs):
            return base
    msg = (f"{source} has a UNet but no text-encoder weights LoRA Loop knows (looked for "
           f"{', '.join(s.prefix + '*' for specs in TEXT_ENCODERS.values() for s in specs)}; key prefixes found: "
           f"{_key_prefixes(keys)}); the standalone trainer needs a full checkpoint (UNet + VAE + text encoders)")
    raise UnsupportedModelError(msg)


def _text_width(shapes: Mapping[str, tuple[int, ...]], spec: TextEncoderSpec) -> int | None:
    names = ("token_embedding.weight",) if spec.layout == "open_clip" else (
        "text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight")
    for name in names:
        if spec.prefix + name in shapes:
            return shapes[spec.prefix + name][1]
    return None


def _check_widths(shapes: Mapping[str, tuple[int, ...]], base: str, source: str) -> None:
    """The UNet's cross-attention width must equal the text encoders' (summed for SDXL): catches odd merges."""
    context = next((s[1] for k, s in shapes.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")),
                   None)
    widths = [_text_width(shapes, spec) for spec in TEXT_ENCODERS[base]]
    if context is None or None in widths:
        msg = (f"{source} looks like an {_BASE_LABELS[base]} checkpoint but lacks the UNet cross-attention or "
               "text-embedding weights; the file is incomplete or damaged")
        raise UnsupportedModelError(msg)
    total = sum(w for w in widths if w is not None)
    if context != total:
        msg = (f"{source} looks like an {_BASE_LABELS[base]} checkpoint, but its UNet attends to width {context} while "
               f"its text encoders give {total}; it is damaged or of an unsupported kind; supported: {SUPPORTED}")
        raise UnsupportedModelError(msg)


def _detect_base(shapes: Mapping[str, tuple[int, ...]], source: str) -> str:
    keys = list(shapes)
    if not keys:
        raise UnsupportedModelError(f"{source} holds no tensors; supported: {SUPPORTED}")
    _reject_other_models(keys, source)
    if _UNET_IN not in shapes:
        raise _no_unet_error(keys, source)
    _check_in_channels(shapes, source)
    base = _base_from_text_encoders(keys, source)
    if (base == "sdxl") != (_LABEL_EMB in shapes):
        what = "an SDXL-layout file without SDXL's size conditioning" if base == "sdxl" else \
            f"a class-conditioned {_BASE_LABELS[base]} UNet (e.g. SD 2.1 unCLIP)"
        raise _unsupported(source, what)
    if not _has(keys, VAE_PREFIX):
        msg = (f"{source} has no VAE weights ({VAE_PREFIX}* keys); the standalone trainer needs a full checkpoint "
               "(UNet + VAE + text encoders). Use a full checkpoint, or the host's loaded model in ComfyUI/A1111")
        raise UnsupportedModelError(msg)
    _check_widths(shapes, base, source)
    return base


def _resolve_variant(base: str, family: str | None, prediction_type: str | None, source: str) -> str:
    """Our family name from the detected base, the caller's `family` and `prediction_type` (SD2 eps vs v)."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, not {prediction_type!r}",
                          key="prediction_type", value=prediction_type, allowed=PREDICTION_TYPES)
    name = base
    if family is not None:
        name = get_family(family).name
        if name.split("-")[0] != base:
            msg = (f"{source} is an {_BASE_LABELS[base]} checkpoint, but family={family!r} was asked for; leave "
                   f"family unset to use the detected one")
            raise UnsupportedModelError(msg)
    if base != "sd2":
        return name
    if name == "sd2-v" and prediction_type == "epsilon":
        raise ConfigError("family='sd2-v' is the v-prediction SD 2.x family; prediction_type='epsilon' contradicts it",
                          key="prediction_type", value=prediction_type, allowed=("v_prediction",))
    if prediction_type == "v_prediction":
        return "sd2-v"
    if family is None and prediction_type is None:
        # The weights of SD 2.x 512 (epsilon) and 768-v models have identical keys and shapes.
        log.info("%s: SD 2.x checkpoint, training it as epsilon-prediction (SD 2.x 512 base); for a 768-v model "
                 "(SD 2.0-v, SD 2.1 768) set family='sd2-v' or prediction_type='v_prediction'", source)
    return name


def detect_family(state_dict: Mapping[str, Any], *, family: str | None = None, prediction_type: str | None = None,
                  source: str = "the checkpoint") -> str:
    """The family (`sd1`, `sd2`, `sd2-v`, `sdxl`) of an LDM/SGM-layout single-file checkpoint, from keys and shapes.

    Args:
        state_dict: key → tensor, or anything with a `.shape`, or a shape tuple (no weight is read).
        family: the caller's family, checked against the file; `sd2-v` picks v-prediction for an SD2 file.
        prediction_type: `epsilon` / `v_prediction`; for SD2 files it picks `sd2` / `sd2-v`.
        source: names the file in error messages.

    Raises:
        UnsupportedModelError: a LoRA, VAE-only, refiner, inpainting, SD3, Flux, … file, or anything unknown.
    """
    shapes = {k: shape for k, v in state_dict.items() if (shape := _shape_of(v)) is not None}
    return _resolve_variant(_detect_base(shapes, source), family, prediction_type, source)


# ---------------------------------------------------------------------------------------------------------------------
# Reading single files
# ---------------------------------------------------------------------------------------------------------------------
class SingleFile:
    """The tensors of a single-file checkpoint: shapes up front, tensors per key prefix.

    safetensors files are read lazily, so only one component's weights are in memory at a time; pickled
    checkpoints are loaded once (memory-mapped when they are zip archives).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tensors: dict[str, torch.Tensor] | None = None
        if path.suffix.lower() == ".safetensors":
            self.shapes = self._safetensors_shapes()
        else:
            self._tensors = _torch_load(path)
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}

    def _safetensors_shapes(self) -> dict[str, tuple[int, ...]]:
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
        except Exception as e:  # safetensors raises its own error types for damaged files
            msg = f"cannot read {self.path} as a safetensors file ({e}); is it complete (not a partial download)?"
            raise LoraLoopError(msg) from e

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor whose key starts with `prefix`, keys unchanged."""
        if self._tensors is not None:
            return {k: v for k, v in self._tensors.items() if k.startswith(prefix)}
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in self.shapes if k.startswith(prefix)}


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A pickled checkpoint's tensors; `weights_only` so that opening a file cannot run code from it."""
    try:
        # mmap needs the zip format (torch ≥ 1.6); older files are read whole.
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # pickle, zip and torch errors all mean the same to the user
        msg = (f"cannot load {path} as a PyTorch checkpoint with weights_only=True ({e}); if you trust the file, "
               "convert it to .safetensors and give that instead")
        raise LoraLoopError(msg) from e
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]  # Lightning-style checkpoints nest the weights
    if not isinstance(data, dict):
        raise LoraLoopError(f"{path} does not hold a state dict (it holds a {type(data).__name__})")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def _prediction_hint(path: Path, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """v-prediction markers that travel with some files: a `v_pred` key, or an A1111 `<name>.yaml` beside the file."""
    if "v_pred" in shapes:
        log.info("%s has a 'v_pred' marker key: using v-prediction", path)
        return "v_prediction"
    yaml_path = path.with_suffix(".yaml")
    if yaml_path.is_file() and re.search(r"parameterization:\s*['\"]?v['\"]?\s*$",
                                         yaml_path.read_text(encoding="utf-8", errors="replace"), re.MULTILINE):
        log.info("%s says parameterization 'v': using v-prediction", yaml_path)
        return "v_prediction"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Text encoders: LDM keys → transformers keys
# ---------------------------------------------------------------------------------------------------------------------
_OPEN_CLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPEN_CLIP_LAYER = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "attn.out_proj.": "self_attn.out_proj.",
                    "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2."}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def _open_clip_layer(prefix: str, rest: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        # OpenCLIP fuses q, k, v into one projection (nn.MultiheadAttention), in that order.
        kind = rest.rsplit("_", 1)[1]
        q, k, v = value.chunk(3, dim=0)
        return {f"{prefix}self_attn.{n}_proj.{kind}": t.contiguous() for n, t in zip("qkv", (q, k, v), strict=True)}
    for src, dst in _OPEN_CLIP_LAYER.items():
        if rest.startswith(src):
            return {prefix + dst + rest[len(src):]: value}
    return {prefix + rest: value}  # unknown: reported as unexpected by the loader


def clip_keys_from_open_clip(weights: Mapping[str, torch.Tensor], num_layers: int,
                             projection: bool) -> dict[str, torch.Tensor]:
    """transformers `CLIPTextModel[WithProjection]` keys from OpenCLIP keys (prefix already removed).

    Layers from `num_layers` on are dropped: SD2 conditions on the penultimate layer, so its diffusers text encoder has
    23 of OpenCLIP-H's 24 layers. `text_projection` (used as `x @ P`) becomes a Linear weight, i.e. Pᵀ.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        if m := _RESBLOCK.fullmatch(key):
            if int(m.group(1)) < num_layers:
                out.update(_open_clip_layer(f"text_model.encoder.layers.{m.group(1)}.", m.group(2), value))
        elif key in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[key]] = value
        elif key == "text_projection":
            if projection:
                out["text_projection.weight"] = value.T.contiguous()
        elif key == "text_projection.weight":  # some savers (ComfyUI) store it already in Linear layout
            if projection:
                out[key] = value
        elif key not in ("logit_scale", "attn_mask"):
            out[key] = value  # unknown: reported as unexpected by the loader
    return out


def clip_keys_from_hf(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of a transformers-layout CLIP text model with `text_model.` in front (old checkpoints lack it)."""
    out = {}
    for key, value in weights.items():
        if key.endswith("position_ids"):
            continue  # a buffer that old transformers versions saved; rebuilt by the model
        out[key if key.startswith(("text_model.", "text_projection")) else "text_model." + key] = value
    return out


def _strip(weights: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def _text_encoder_class(spec: TextEncoderSpec) -> type:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection if spec.projection else CLIPTextModel


def _load_text_encoder(ckpt: SingleFile, spec: TextEncoderSpec, configs: Path, dtype: torch.dtype) -> nn.Module:
    from transformers import CLIPTextConfig

    config = CLIPTextConfig.from_pretrained(str(configs / spec.subfolder), local_files_only=True)
    raw = _strip(ckpt.tensors(spec.prefix), spec.prefix)
    if spec.layout == "open_clip":
        weights = clip_keys_from_open_clip(raw, config.num_hidden_layers, spec.projection)
    else:
        weights = clip_keys_from_hf(raw)
    what = f"text encoder {spec.prefix}*"
    try:
        model, info = _text_encoder_class(spec).from_pretrained(None, config=config, state_dict=weights,
                                                                output_loading_info=True)
    except (RuntimeError, ValueError) as e:  # size mismatches
        raise _does_not_fit(ckpt.path, what, configs / spec.subfolder, e) from e
    if info["missing_keys"]:
        raise _missing_weights(ckpt.path, what, sorted(info["missing_keys"]))
    if info["unexpected_keys"]:
        log.warning("%s: ignored %d unexpected %s weights, e.g. %s", ckpt.path, len(info["unexpected_keys"]), what,
                    sorted(info["unexpected_keys"])[:3])
    return model.to(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# UNet / VAE through diffusers' single-file loader
# ---------------------------------------------------------------------------------------------------------------------
def _does_not_fit(path: Path, what: str, config: Path, error: Exception) -> LoraLoopError:
    return LoraLoopError(f"{path}: the {what} weights do not fit the config in {config} ({error})")


def _missing_weights(path: Path, what: str, names: list[str]) -> LoraLoopError:
    return LoraLoopError(f"{path}: the {what} lacks {len(names)} weights, e.g. {', '.join(names[:5])}; the file is "
                         "incomplete or not of the detected family")


def _require_loaded(module: nn.Module, path: Path, what: str) -> None:
    """diffusers leaves weights that a file lacks on the meta device without a word: refuse them."""
    missing = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if missing:
        raise _missing_weights(path, what, missing)


class _DropEmptyFp32Warning(logging.Filter):
    """diffusers warns on every `ModelMixin.to(dtype)` that "modules … should be kept in float32: []", even when the
    list is empty (as for every SD UNet/VAE); the empty case says nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


@contextlib.contextmanager
def _quiet_diffusers_dtype_warning() -> Iterator[None]:
    logger = logging.getLogger("diffusers.models.modeling_utils")
    quiet = _DropEmptyFp32Warning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _names_not_converted(cls: type, weights: dict[str, torch.Tensor], configs: Path, subfolder: str) -> list[str]:
    """The model's weights that diffusers' LDM conversion of `weights` does not provide (for error messages only:
    it uses diffusers' internal table of converters, so any failure just means no names)."""
    try:
        from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

        convert = SINGLE_FILE_LOADABLE_CLASSES[cls.__name__]["checkpoint_mapping_fn"]
        config = cls.load_config(str(configs / subfolder))
        with torch.device("meta"):
            expected = cls.from_config(config).state_dict().keys()
        return sorted(set(expected) - set(convert(config=config, checkpoint=weights)))
    except Exception:
        return []


def _load_single_file_model(cls: type, ckpt: SingleFile, prefix: str, configs: Path, subfolder: str,
                            dtype: torch.dtype) -> nn.Module:
    what = {"unet": "UNet", "vae": "VAE"}[subfolder]
    # A dict instead of the path: only this component's tensors are read, and the file is read once.
    weights = ckpt.tensors(prefix)
    try:
        with _quiet_diffusers_dtype_warning():
            model = cls.from_single_file(weights, config=str(configs), subfolder=subfolder, local_files_only=True,
                                         torch_dtype=dtype)
    except (RuntimeError, ValueError, KeyError) as e:
        # Weights the file lacks stay on the meta device, and diffusers fails when it moves the model.
        missing = _names_not_converted(cls, weights, configs, subfolder) if "meta tensor" in str(e) else []
        if missing:
            raise _missing_weights(ckpt.path, what, missing) from e
        raise _does_not_fit(ckpt.path, what, configs / subfolder, e) from e
    _require_loaded(model, ckpt.path, what)
    return model


def _check_config_dir(configs: Path, family: str) -> None:
    base = family.split("-")[0]
    needed = ["unet/config.json", "vae/config.json", *(f"{s.subfolder}/config.json" for s in TEXT_ENCODERS[base])]
    missing = [n for n in needed if not (configs / n).is_file()]
    if missing:
        msg = (f"config folder {configs} lacks {', '.join(missing)}; it must be a diffusers-layout folder of config "
               f"files for {family} (see trainer/model_configs/)")
        raise LoraLoopError(msg)


def shipped_config_dir(family: str) -> Path:
    """Our config-only diffusers folder for `family` (no weights, no tokenizer)."""
    return CONFIG_ROOT / get_family(family).name


def _load_single_file(path: Path, family: str | None, prediction_type: str | None, dtype: torch.dtype,
                      config_dir: Path | None) -> DiffusersBundle:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    ckpt = SingleFile(path)
    prediction_type = prediction_type or _prediction_hint(path, ckpt.shapes)
    name = detect_family(ckpt.shapes, family=family, prediction_type=prediction_type, source=str(path))
    configs = Path(config_dir) if config_dir is not None else shipped_config_dir(name)
    _check_config_dir(configs, name)
    log.info("loading %s as %s (configs: %s)", path, name, configs)
    unet = _load_single_file_model(UNet2DConditionModel, ckpt, UNET_PREFIX, configs, "unet", dtype)
    # The VAE stays float32: SD VAEs overflow in fp16.
    vae = _load_single_file_model(AutoencoderKL, ckpt, VAE_PREFIX, configs, "vae", torch.float32)
    specs = TEXT_ENCODERS[name.split("-")[0]]
    encoders = [_load_text_encoder(ckpt, spec, configs, dtype) for spec in specs]
    tokenizers = [load_clip_tokenizer(spec.tokenizer) for spec in specs]
    return DiffusersBundle(get_family(name), unet, vae, encoders, tokenizers, alphas_cumprod_from(configs),
                           path.name, prediction_type)


# ---------------------------------------------------------------------------------------------------------------------
# diffusers folders
# ---------------------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LoraLoopError(f"cannot read {path} ({e})") from e


def _base_from_folder(folder: Path, index: dict) -> str:
    source = str(folder)
    pipeline = index.get("_class_name", "an unknown pipeline")
    if "unet" not in index or not (folder / "unet" / "config.json").is_file():
        raise _unsupported(source, f"a {pipeline} model without a UNet")
    unet_config = _read_json(folder / "unet" / "config.json")
    channels = unet_config.get("in_channels", 4)
    if channels != 4:
        raise _unsupported(source, f"a {pipeline} model whose UNet takes {channels} input channels")
    has_te1 = (index.get("text_encoder") or [None, None])[1] is not None
    if "text_encoder_2" in index:
        if not has_te1:
            raise _unsupported(source, "an SDXL refiner (only an OpenCLIP bigG text encoder)")
        if unet_config.get("addition_embed_type") != "text_time":
            raise _unsupported(source, f"a {pipeline} model without SDXL's size conditioning")
        return "sdxl"
    if not has_te1 or unet_config.get("addition_embed_type") or unet_config.get("class_embed_type"):
        raise _unsupported(source, f"a {pipeline} model")
    # SD2's encoder is OpenCLIP-H (gelu); SD1's is OpenAI CLIP-L (quick_gelu). Widths would not tell tiny models apart.
    text_config = _read_json(folder / "text_encoder" / "config.json")
    return "sd2" if text_config.get("hidden_act") == "gelu" else "sd1"


def _variant(folder: Path) -> str | None:
    """`fp16` when a component folder only has `*.fp16.*` weights (a common way to publish diffusers models)."""
    names = [p.name for p in folder.glob("*") if p.suffix in (".safetensors", ".bin")]
    if any(n.count(".") == 1 for n in names):
        return None
    return "fp16" if any(".fp16." in n for n in names) else None


def _from_folder(cls: type, folder: Path, subfolder: str, **kwargs: Any) -> nn.Module:
    try:
        with _quiet_diffusers_dtype_warning():
            return cls.from_pretrained(str(folder), subfolder=subfolder, local_files_only=True,
                                       variant=_variant(folder / subfolder), **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        raise LoraLoopError(f"cannot load {folder / subfolder} ({e})") from e


def _folder_tokenizer(folder: Path, spec: TextEncoderSpec):  # noqa: ANN202 - transformers type
    if not (folder / spec.tokenizer_subfolder).is_dir():
        return load_clip_tokenizer(spec.tokenizer)
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), subfolder=spec.tokenizer_subfolder, local_files_only=True)


def _load_diffusers_folder(folder: Path, family: str | None, prediction_type: str | None,
                           dtype: torch.dtype) -> DiffusersBundle:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    index = _read_json(folder / "model_index.json")
    from .flow_loading import is_flow_folder, load_flow_folder  # diffusers' flow classes load only when needed

    if is_flow_folder(index):
        return load_flow_folder(folder, index, family, dtype)  # type: ignore[return-value]
    base = _base_from_folder(folder, index)
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(scheduler_path) if scheduler_path.is_file() else {}
    prediction_type = prediction_type or scheduler.get("prediction_type")
    name = _resolve_variant(base, family, prediction_type, str(folder))
    log.info("loading diffusers folder %s as %s", folder, name)
    unet = _from_folder(UNet2DConditionModel, folder, "unet", torch_dtype=dtype)
    vae = _from_folder(AutoencoderKL, folder, "vae", torch_dtype=torch.float32)  # fp16 SD VAEs overflow
    specs = TEXT_ENCODERS[base]
    encoders = [_from_folder(_text_encoder_class(s), folder, s.subfolder).to(dtype) for s in specs]
    tokenizers = [_folder_tokenizer(folder, s) for s in specs]
    return DiffusersBundle(get_family(name), unet, vae, encoders, tokenizers, alphas_cumprod_from(folder),
                           folder.name, prediction_type)


# ---------------------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------------------
def alphas_cumprod_from(folder: Path) -> torch.Tensor:
    """ᾱ_t from a diffusers `scheduler/scheduler_config.json` (SD's scaled-linear schedule when there is none)."""
    path = folder / "scheduler" / "scheduler_config.json"
    config = _read_json(path) if path.is_file() else {"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                                       "beta_end": 0.012}
    steps = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    schedule = config.get("beta_schedule", "linear")  # diffusers' defaults for missing entries
    if config.get("trained_betas"):
        betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    elif schedule == "linear":
        betas = torch.linspace(start, end, steps, dtype=torch.float64)
    else:
        raise UnsupportedModelError(f"{path}: beta_schedule {schedule!r} is not supported (scaled_linear, linear)")
    if config.get("rescale_betas_zero_snr"):
        log.warning("%s asks for zero-terminal-SNR betas; training uses the plain schedule", path)
    return torch.cumprod(1.0 - betas, dim=0).float()


def _freeze(bundle: DiffusersBundle, device: torch.device | str) -> DiffusersBundle:
    # Each module already has its dtype (VAE float32); moving them one by one keeps it.
    for module in bundle.modules().values():
        module.eval().requires_grad_(False).to(device)
    return bundle


def load_checkpoint_bundle(path: str | Path, *, family: str | None = None, prediction_type: str | None = None,
                           dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                           config_dir: Path | None = None, components_from: str | None = None) -> DiffusersBundle:
    """Load a base model without network access: a single `.safetensors`/`.ckpt` file or a diffusers folder.

    Args:
        path: the checkpoint file, or a diffusers folder (with `model_index.json`).
        family: `sd1`/`sd2`/`sd2-v`/`sdxl`; detected when None (SD2 files default to `sd2`, epsilon).
        prediction_type: `epsilon`/`v_prediction`; overrides the family's (and a diffusers folder's scheduler).
        dtype: dtype of the UNet and text encoders (the VAE is always float32).
        device: where the modules end up.
        config_dir: a diffusers config folder to use for a single file instead of the shipped `model_configs/<family>`.
        components_from: for a single-file Flux.1/SD3 transformer, the family's diffusers folder that supplies the
            text encoders, tokenizers and VAE.

    Returns:
        A frozen (eval, no grad) `DiffusersBundle`.
    """
    path = Path(path).expanduser()
    if not path.exists():
        msg = (f"base model {path} does not exist; give a .safetensors/.ckpt checkpoint or a diffusers folder, or "
               "use builtin:tiny-sd1 for a try-out")
        raise LoraLoopError(msg)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise LoraLoopError(f"{path} is a folder without model_index.json, so not a diffusers model folder; give "
                                "the folder that has model_index.json, or a .safetensors/.ckpt file")
        if config_dir is not None:
            log.warning("config_dir %s is ignored: the diffusers folder %s has its own configs", config_dir, path)
        bundle = _load_diffusers_folder(path, family, prediction_type, dtype)
    elif path.suffix.lower() == ".safetensors" or path.suffix.lower() in TORCH_SUFFIXES:
        try:
            bundle = _load_single_file(path, family, prediction_type, dtype, config_dir)
        except FlowSingleFile:
            from .flow_loading import load_flow_single_file

            bundle = load_flow_single_file(path, components_from, family, dtype)  # type: ignore[assignment]
    else:
        raise LoraLoopError(f"{path}: unknown checkpoint type {path.suffix!r}; give a .safetensors, "
                            f"{', '.join(TORCH_SUFFIXES)} file or a diffusers folder")
    return _freeze(bundle, device)


def resolve_base_model(spec: str, **kwargs: Any) -> DiffusersBundle:
    """`builtin:<name>` → the tiny model (only `device`/`dtype` apply); anything else → `load_checkpoint_bundle`."""
    if not spec.startswith("builtin:"):
        return load_checkpoint_bundle(spec, **kwargs)
    bundle = build_tiny_bundle(spec.removeprefix("builtin:"))
    ignored = sorted(k for k, v in kwargs.items() if v is not None and k not in ("device", "dtype"))
    if ignored:
        log.warning("%s is a built-in model: %s ignored", spec, ", ".join(ignored))
    if kwargs.get("device") is not None or kwargs.get("dtype") is not None:
        with _quiet_diffusers_dtype_warning():
            bundle.to(kwargs.get("device") or "cpu", kwargs.get("dtype"))
    return bundle
