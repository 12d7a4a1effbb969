"""Write diffusers Flux.1 / SD3 transformers out in the single-file layouts users download, for the loader's tests.

* `flux_to_bfl`: Black Forest Labs' layout (flux1-dev.safetensors): `double_blocks.N.img_attn.qkv` (q, k, v fused),
  `single_blocks.N.linear1` (q, k, v and the MLP's input fused), `final_layer.adaLN_modulation.1` as (shift, scale).
* `sd3_to_sai`: Stability AI's MMDiT layout (sd3.5_large.safetensors): `joint_blocks.N.{x,context}_block.attn.qkv`,
  the last context block's adaLN and the final adaLN as (shift, scale).

Both are the inverse of what `loraloop.trainer.bundles.flow_keys` reads, written here key by key on their own, so that
a round trip checks the reader; the tests also hold the layouts against diffusers' own converters.
`write_flow_file` adds what real files carry: ComfyUI's `model.diffusion_model.` prefix, the text encoders and VAE of
an all-in-one file, and fp8 weights (plain float8_e4m3fn, or ComfyUI's fp8_scaled with `scale_weight` per Linear).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

Tensors = Mapping[str, torch.Tensor]


def _linear(sd: Tensors, out: dict, diffusers: str, original: str) -> None:
    out[original + ".weight"] = sd[diffusers + ".weight"]
    out[original + ".bias"] = sd[diffusers + ".bias"]


def _fused(sd: Tensors, out: dict, parts: list[str], original: str) -> None:
    out[original + ".weight"] = torch.cat([sd[p + ".weight"] for p in parts])
    out[original + ".bias"] = torch.cat([sd[p + ".bias"] for p in parts])


def _shift_scale(sd: Tensors, out: dict, diffusers: str, original: str) -> None:
    """diffusers' AdaLayerNormContinuous projects to (scale, shift); the original code to (shift, scale)."""
    for suffix in (".weight", ".bias"):
        scale, shift = sd[diffusers + suffix].chunk(2)
        out[original + suffix] = torch.cat([shift, scale])


def _count(sd: Tensors, prefix: str) -> int:
    return len({k.split(".")[1] for k in sd if k.startswith(prefix)})


def flux_to_bfl(sd: Tensors) -> dict[str, torch.Tensor]:
    """A diffusers `FluxTransformer2DModel` state dict in BFL's key layout."""
    out: dict[str, torch.Tensor] = {}
    _linear(sd, out, "x_embedder", "img_in")
    _linear(sd, out, "context_embedder", "txt_in")
    _linear(sd, out, "time_text_embed.timestep_embedder.linear_1", "time_in.in_layer")
    _linear(sd, out, "time_text_embed.timestep_embedder.linear_2", "time_in.out_layer")
    _linear(sd, out, "time_text_embed.text_embedder.linear_1", "vector_in.in_layer")
    _linear(sd, out, "time_text_embed.text_embedder.linear_2", "vector_in.out_layer")
    if "time_text_embed.guidance_embedder.linear_1.weight" in sd:  # dev has it, schnell not
        _linear(sd, out, "time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer")
        _linear(sd, out, "time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")
    for i in range(_count(sd, "transformer_blocks.")):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        _linear(sd, out, d + "norm1.linear", b + "img_mod.lin")
        _linear(sd, out, d + "norm1_context.linear", b + "txt_mod.lin")
        _fused(sd, out, [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"], b + "img_attn.qkv")
        _fused(sd, out, [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"], b + "txt_attn.qkv")
        out[b + "img_attn.norm.query_norm.scale"] = sd[d + "attn.norm_q.weight"]
        out[b + "img_attn.norm.key_norm.scale"] = sd[d + "attn.norm_k.weight"]
        out[b + "txt_attn.norm.query_norm.scale"] = sd[d + "attn.norm_added_q.weight"]
        out[b + "txt_attn.norm.key_norm.scale"] = sd[d + "attn.norm_added_k.weight"]
        _linear(sd, out, d + "attn.to_out.0", b + "img_attn.proj")
        _linear(sd, out, d + "attn.to_add_out", b + "txt_attn.proj")
        _linear(sd, out, d + "ff.net.0.proj", b + "img_mlp.0")
        _linear(sd, out, d + "ff.net.2", b + "img_mlp.2")
        _linear(sd, out, d + "ff_context.net.0.proj", b + "txt_mlp.0")
        _linear(sd, out, d + "ff_context.net.2", b + "txt_mlp.2")
    for i in range(_count(sd, "single_transformer_blocks.")):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        _linear(sd, out, d + "norm.linear", b + "modulation.lin")
        _fused(sd, out, [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"], b + "linear1")
        out[b + "norm.query_norm.scale"] = sd[d + "attn.norm_q.weight"]
        out[b + "norm.key_norm.scale"] = sd[d + "attn.norm_k.weight"]
        _linear(sd, out, d + "proj_out", b + "linear2")
    _linear(sd, out, "proj_out", "final_layer.linear")
    _shift_scale(sd, out, "norm_out.linear", "final_layer.adaLN_modulation.1")
    return out


def sd3_to_sai(sd: Tensors) -> dict[str, torch.Tensor]:
    """A diffusers `SD3Transformer2DModel` state dict in SAI's MMDiT key layout (qk-norm and attn2 when present)."""
    out: dict[str, torch.Tensor] = {"pos_embed": sd["pos_embed.pos_embed"]}
    _linear(sd, out, "pos_embed.proj", "x_embedder.proj")
    _linear(sd, out, "time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0")
    _linear(sd, out, "time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2")
    _linear(sd, out, "time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0")
    _linear(sd, out, "time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2")
    _linear(sd, out, "context_embedder", "context_embedder")
    depth = _count(sd, "transformer_blocks.")
    for i in range(depth):
        d, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        _linear(sd, out, d + "norm1.linear", x + "adaLN_modulation.1")
        _fused(sd, out, [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"], x + "attn.qkv")
        _linear(sd, out, d + "attn.to_out.0", x + "attn.proj")
        _linear(sd, out, d + "ff.net.0.proj", x + "mlp.fc1")
        _linear(sd, out, d + "ff.net.2", x + "mlp.fc2")
        _fused(sd, out, [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"], c + "attn.qkv")
        if d + "attn.norm_q.weight" in sd:  # SD3.5: RMS qk-norm
            out[x + "attn.ln_q.weight"] = sd[d + "attn.norm_q.weight"]
            out[x + "attn.ln_k.weight"] = sd[d + "attn.norm_k.weight"]
            out[c + "attn.ln_q.weight"] = sd[d + "attn.norm_added_q.weight"]
            out[c + "attn.ln_k.weight"] = sd[d + "attn.norm_added_k.weight"]
        if d + "attn2.to_q.weight" in sd:  # SD3.5 medium's second image attention
            _fused(sd, out, [d + "attn2.to_q", d + "attn2.to_k", d + "attn2.to_v"], x + "attn2.qkv")
            _linear(sd, out, d + "attn2.to_out.0", x + "attn2.proj")
            if d + "attn2.norm_q.weight" in sd:
                out[x + "attn2.ln_q.weight"] = sd[d + "attn2.norm_q.weight"]
                out[x + "attn2.ln_k.weight"] = sd[d + "attn2.norm_k.weight"]
        if i == depth - 1:  # the last context block is "pre_only": a (shift, scale) adaLN and nothing after it
            _shift_scale(sd, out, d + "norm1_context.linear", c + "adaLN_modulation.1")
        else:
            _linear(sd, out, d + "norm1_context.linear", c + "adaLN_modulation.1")
            _linear(sd, out, d + "attn.to_add_out", c + "attn.proj")
            _linear(sd, out, d + "ff_context.net.0.proj", c + "mlp.fc1")
            _linear(sd, out, d + "ff_context.net.2", c + "mlp.fc2")
    _linear(sd, out, "proj_out", "final_layer.linear")
    _shift_scale(sd, out, "norm_out.linear", "final_layer.adaLN_modulation.1")
    return out


def to_fp8(tensors: Tensors, scaled: bool) -> dict[str, torch.Tensor]:
    """The 2-D weights as float8_e4m3fn, the rest unchanged. `scaled`: ComfyUI's fp8_scaled format (a float32
    `scale_weight` beside each weight, so weight = fp8 · scale; plus its `scaled_fp8` marker and `scale_input`s)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not (key.endswith(".weight") and value.ndim == 2):
            out[key] = value
            continue
        if not scaled:
            out[key] = value.to(torch.float8_e4m3fn)
            continue
        scale = value.float().abs().max().clamp(min=1e-12) / 448.0
        out[key] = (value.float() / scale).to(torch.float8_e4m3fn)
        out[key.removesuffix("weight") + "scale_weight"] = scale.reshape(1)
        out[key.removesuffix("weight") + "scale_input"] = torch.ones(1)
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def dequantized(tensors: Tensors) -> dict[str, torch.Tensor]:
    """What an fp8 file's weights are worth (fp8 · scale_weight), in float32, marker keys dropped."""
    out = {}
    for key, value in tensors.items():
        if key.endswith(("scale_weight", "scale_input", "scaled_fp8")):
            continue
        scale = tensors.get(key.removesuffix("weight") + "scale_weight") if key.endswith(".weight") else None
        out[key] = value.float() * scale if scale is not None else value.float()
    return out


def write_flow_file(path: Path, transformer: Tensors, prefix: str = "", extra: Tensors | None = None) -> Path:
    """`transformer` under `prefix`, plus `extra` (an all-in-one file's other components) as they are."""
    tensors = {prefix + k: v.contiguous() for k, v in transformer.items()}
    tensors.update({k: v.contiguous() for k, v in (extra or {}).items()})
    save_file(tensors, str(path))
    return path


def save_flow_folder(bundle: object, folder: Path) -> Path:
    """A tiny flow bundle (bundles/tiny.py) saved as its diffusers pipeline folder, as `components_from` expects."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    tes = [slot.module for slot in bundle.text_encoders]
    toks = bundle.tokenizers
    if bundle.family.name.startswith("flux1"):
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=bundle.vae,
                            text_encoder=tes[0], tokenizer=toks[0], text_encoder_2=tes[1], tokenizer_2=toks[1],
                            transformer=bundle.unet)
    else:
        pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=bundle.vae,
                                        text_encoder=tes[0], tokenizer=toks[0], text_encoder_2=tes[1],
                                        tokenizer_2=toks[1], text_encoder_3=tes[2], tokenizer_3=toks[2],
                                        transformer=bundle.unet)
    pipe.save_pretrained(str(folder))
    return folder
