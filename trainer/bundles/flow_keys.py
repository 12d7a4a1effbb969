"""Single-file Flux.1 and SD3/3.5 transformers as downloaded, read into diffusers' key layout.

The files come in the original code's layouts: Black Forest Labs' for Flux.1 (flux1-dev.safetensors: `double_blocks`,
`single_blocks`, fused q/k/v) and Stability AI's MMDiT for SD3/3.5 (`joint_blocks`), either bare or under ComfyUI's
`model.diffusion_model.` prefix next to text encoders and a VAE (all-in-one files). Their weights may be fp8:
plain float8_e4m3fn, or ComfyUI's fp8_scaled (a `scale_weight` beside each weight: the value is fp8 · scale).

`read_transformer` takes the transformer's tensors only (prefix stripped, fp8 turned into the run's dtype).
`flux_to_diffusers` is our own converter: diffusers' (`convert_flux_transformer_checkpoint_to_diffusers`) hard-codes
the released 3072-wide model, so it cannot read a file of another width; here every width comes from the tensors.
SD3's converter in diffusers reads the sizes from the tensors already, so `sd3_to_diffusers` is that one.
Converters pop what they convert from the dict they get: what is left afterwards was not recognised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..errors import LoraLoopError

if TYPE_CHECKING:
    from .checkpoint import SingleFile

FLUX_MARKER = "double_blocks."
SD3_MARKER = "joint_blocks."
# ComfyUI saves the diffusion model under `model.diffusion_model.`; its UNETLoader also reads `diffusion_model.`
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
# Components of an all-in-one file that are not the transformer (SAI's and ComfyUI's names)
OTHER_COMPONENTS = ("text_encoders.", "first_stage_model.", "cond_stage_model.", "conditioner.", "vae.")
# Per-weight scales of quantized files (ComfyUI's fp8_scaled `scale_weight`; its newer quantized format's
# `weight_scale`): the stored weight times the scale is the value
WEIGHT_SCALES = ("scale_weight", "weight_scale")
# Markers and activation scales of quantized files: nothing a LoRA trainer needs (inputs are not quantized here)
QUANT_MARKERS = ("scaled_fp8", "scale_input", "input_scale", "comfy_quant")


def find_prefix(keys: list[str], marker: str) -> str | None:
    """The prefix under which the file holds the blocks named `marker`; None when it has none."""
    for prefix in TRANSFORMER_PREFIXES:
        if any(k.startswith(prefix + marker) for k in keys):
            return prefix
    return None


def transformer_keys(keys: list[str], prefix: str) -> list[str]:
    """The keys of the transformer: everything under `prefix`; without a prefix, all but other components."""
    if prefix:
        return [k for k in keys if k.startswith(prefix)]
    return [k for k in keys if not k.startswith(OTHER_COMPONENTS)]


def _is_quant_extra(key: str) -> bool:
    name = key.rsplit(".", 1)[-1]
    return name in QUANT_MARKERS or name in WEIGHT_SCALES


def _scale_key(keys: set[str], key: str) -> str | None:
    if not key.endswith(".weight"):
        return None
    stem = key.removesuffix("weight")
    return next((stem + s for s in WEIGHT_SCALES if stem + s in keys), None)


def dequantize(key: str, value: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """`value` (· `scale`) in `dtype`. fp8 values are exact in fp16/bf16/fp32; a scale is applied in float32, so the
    product is rounded once, to `dtype`."""
    if not value.is_floating_point():
        # packed formats (int8, nvfp4 in uint8, GGUF-style) store something other than the weight itself
        raise ValueError(f"{key} is stored as {value.dtype}, a quantized format LoRA Loop cannot read")
    if scale is None:
        return value.to(dtype)
    if scale.numel() == 1:  # one scale per tensor (ComfyUI's fp8_scaled)
        scale = scale.reshape(())
    elif scale.numel() == value.shape[0]:  # one per output row
        scale = scale.reshape(-1, *[1] * (value.ndim - 1))
    else:
        raise ValueError(f"{key} has a scale of shape {tuple(scale.shape)} for a weight of {tuple(value.shape)}")
    return (value.float() * scale.float()).to(dtype)


def _read(keys: list[str], prefix: str, get: Callable[[str], torch.Tensor],
          dtype: torch.dtype) -> dict[str, torch.Tensor]:
    known = set(keys)
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        if not _is_quant_extra(key):
            scale_key = _scale_key(known, key)
            out[key.removeprefix(prefix)] = dequantize(key, get(key), get(scale_key) if scale_key else None, dtype)
    return out


def read_transformer(ckpt: SingleFile, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The transformer's tensors in `ckpt` (those under `prefix`, see `transformer_keys`), prefix stripped, in `dtype`;
    the quantization's scales applied and its extra keys dropped.

    safetensors files are read key by key, so the text encoders of an all-in-one file are never loaded, and an fp8
    file is widened one tensor at a time.

    Raises:
        LoraLoopError: a weight is stored in a packed format (int8, 4-bit) or has a scale that does not fit it.
    """
    keys = transformer_keys(list(ckpt.shapes), prefix)
    try:
        if ckpt.path.suffix.lower() != ".safetensors":
            return _read(keys, prefix, ckpt.tensors(prefix).__getitem__, dtype)
        from safetensors import safe_open

        with safe_open(str(ckpt.path), framework="pt", device="cpu") as f:
            return _read(keys, prefix, f.get_tensor, dtype)
    except ValueError as e:
        raise LoraLoopError(f"{ckpt.path}: {e}; use a bf16, fp16 or fp8 release of the model instead") from e


def block_count(keys: list[str] | dict, marker: str) -> int:
    """How many `marker` blocks the keys hold: the highest index + 1 (a gap shows up as missing keys later)."""
    indices = [int(k[len(marker):].split(".", 1)[0]) for k in keys if k.startswith(marker)]
    return max(indices) + 1 if indices else 0


# -- Flux.1 (BFL) → diffusers --------------------------------------------------------------------------------------
def _copy(src: dict, out: dict, old: str, new: str) -> None:
    out[new] = src.pop(old)


def _linear(src: dict, out: dict, old: str, new: str) -> None:
    _copy(src, out, old + ".weight", new + ".weight")
    _copy(src, out, old + ".bias", new + ".bias")


def _split(src: dict, out: dict, old: str, news: list[str], sizes: list[int]) -> None:
    """A fused Linear (rows stacked in the order of `news`) as separate Linears of `sizes` rows."""
    for suffix in (".weight", ".bias"):
        value = src.pop(old + suffix)
        if value.shape[0] != sum(sizes):
            raise ValueError(f"{old}{suffix} has {value.shape[0]} rows, not {' + '.join(map(str, sizes))}")
        for new, part in zip(news, torch.split(value, sizes), strict=True):
            out[new + suffix] = part


def _split_in_three(src: dict, out: dict, old: str, news: list[str]) -> None:
    rows = src[old + ".weight"].shape[0]
    _split(src, out, old, news, [rows // 3] * 3)


def _shift_scale(src: dict, out: dict, old: str, new: str) -> None:
    """The original adaLN projects to (shift, scale); diffusers' AdaLayerNormContinuous to (scale, shift)."""
    for suffix in (".weight", ".bias"):
        shift, scale = src.pop(old + suffix).chunk(2)
        out[new + suffix] = torch.cat([scale, shift])


_FLUX_EMBEDDERS = (
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
)
_FLUX_GUIDANCE = (
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
)
# per stream of a double block: (BFL stream, diffusers modulation, q/k/v, q-norm, k-norm, attention out, MLP)
_FLUX_STREAMS = (
    ("img", "norm1", ("attn.to_q", "attn.to_k", "attn.to_v"), "attn.norm_q", "attn.norm_k", "attn.to_out.0", "ff"),
    ("txt", "norm1_context", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "attn.norm_added_q",
     "attn.norm_added_k", "attn.to_add_out", "ff_context"),
)


def _flux_double(src: dict, out: dict, i: int) -> None:
    b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
    for stream, mod, qkv, norm_q, norm_k, proj, ff in _FLUX_STREAMS:
        _linear(src, out, f"{b}{stream}_mod.lin", f"{d}{mod}.linear")
        _split_in_three(src, out, f"{b}{stream}_attn.qkv", [d + name for name in qkv])
        _copy(src, out, f"{b}{stream}_attn.norm.query_norm.scale", f"{d}{norm_q}.weight")
        _copy(src, out, f"{b}{stream}_attn.norm.key_norm.scale", f"{d}{norm_k}.weight")
        _linear(src, out, f"{b}{stream}_attn.proj", d + proj)
        _linear(src, out, f"{b}{stream}_mlp.0", f"{d}{ff}.net.0.proj")
        _linear(src, out, f"{b}{stream}_mlp.2", f"{d}{ff}.net.2")


def _flux_single(src: dict, out: dict, i: int) -> None:
    b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
    # linear1 stacks q, k, v (hidden rows each) and the MLP's input (the rest); linear2 maps back to hidden
    hidden = src[b + "linear2.weight"].shape[0]
    mlp = src[b + "linear1.weight"].shape[0] - 3 * hidden
    names = [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"]
    _split(src, out, b + "linear1", names, [hidden, hidden, hidden, mlp])
    _linear(src, out, b + "modulation.lin", d + "norm.linear")
    _copy(src, out, b + "norm.query_norm.scale", d + "attn.norm_q.weight")
    _copy(src, out, b + "norm.key_norm.scale", d + "attn.norm_k.weight")
    _linear(src, out, b + "linear2", d + "proj_out")


def flux_to_diffusers(src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Flux.1 transformer in BFL's layout (prefix stripped) as `FluxTransformer2DModel` keys, at any size.

    Raises:
        KeyError: a key the layout needs is missing (the BFL name).
        ValueError: a fused Linear does not split as the layout says.
    """
    out: dict[str, torch.Tensor] = {}
    for old, new in _FLUX_EMBEDDERS:
        _linear(src, out, old, new)
    if "guidance_in.in_layer.weight" in src:  # dev is guidance-distilled; schnell has no guidance input
        for old, new in _FLUX_GUIDANCE:
            _linear(src, out, old, new)
    for i in range(block_count(list(src), "double_blocks.")):
        _flux_double(src, out, i)
    for i in range(block_count(list(src), "single_blocks.")):
        _flux_single(src, out, i)
    _linear(src, out, "final_layer.linear", "proj_out")
    _shift_scale(src, out, "final_layer.adaLN_modulation.1", "norm_out.linear")
    return out


# -- SD3/3.5 (SAI MMDiT) → diffusers -------------------------------------------------------------------------------
def sd3_to_diffusers(src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An SD3/3.5 MMDiT in SAI's layout (prefix stripped) as `SD3Transformer2DModel` keys: diffusers' converter, which
    takes depth, widths, qk-norm and SD3.5 medium's second attention from the tensors.

    Raises:
        KeyError: a key the layout needs is missing (the SAI name).
    """
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    return convert_sd3_transformer_checkpoint_to_diffusers(src)
