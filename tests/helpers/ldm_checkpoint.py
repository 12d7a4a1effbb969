"""Write diffusers/transformers modules out in the LDM/SGM single-file layout that A1111, ComfyUI and civitai use.

The inverse of what `loraloop.trainer.bundles.checkpoint` reads, written independently of diffusers' converters, so
that a round trip through our loader (which uses diffusers' LDM → diffusers conversion for the UNet and VAE) checks
both:
* UNet: `model.diffusion_model.` + the LDM module path from `UNetLayout.to_ldm`;
* VAE: `first_stage_model.` + `encoder.down.N.block.M…`, `mid.block_1`, `mid.attn_1.{q,k,v,proj_out}` as 1×1 convs;
* CLIP-L: transformers names under `cond_stage_model.transformer.text_model.` (SD1) or
  `conditioner.embedders.0.transformer.text_model.` (SDXL);
* OpenCLIP (SD2 `cond_stage_model.model.`, SDXL bigG `conditioner.embedders.1.model.`): `transformer.resblocks.N` with
  the fused `attn.in_proj_*`, `ln_final`, `positional_embedding` and `text_projection` used as `x @ P`.
The helpers work on meta tensors too, so tests can build real-size key/shape maps without allocating weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from loraloop.trainer.bundles.diffusers_bundle import DiffusersBundle
from loraloop.trainer.families import get_family
from loraloop.trainer.naming import UNetLayout
from loraloop.trainer.schedule import scaled_linear_alphas_cumprod
from loraloop.trainer.tokenizer import load_clip_tokenizer

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_PREFIXES = {"sd1": ["cond_stage_model.transformer."], "sd2": ["cond_stage_model.model."],
                 "sdxl": ["conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."]}
TE_SUBFOLDERS = ("text_encoder", "text_encoder_2")


# -- UNet -------------------------------------------------------------------------------------------------------------
def unet_to_ldm(unet: nn.Module, prefix: str = UNET) -> dict[str, torch.Tensor]:
    layout = UNetLayout.from_diffusers_config(unet.config)
    out = {}
    for key, value in unet.state_dict().items():
        module, param = key.rsplit(".", 1)
        out[f"{prefix}{layout.to_ldm(module)}.{param}"] = value
    return out


# -- VAE --------------------------------------------------------------------------------------------------------------
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def _vae_key(key: str, levels: int) -> str:
    """LDM name of a diffusers AutoencoderKL key (decoder up blocks are numbered from the lowest resolution)."""
    key = key.replace("conv_norm_out", "norm_out")
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet(m[3])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet(m[3])}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
    return key  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv: same names


def vae_to_ldm(vae: nn.Module, prefix: str = VAE) -> dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        ldm = _vae_key(key, levels)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and value.dim() == 2:
            value = value.reshape(*value.shape, 1, 1)  # LDM's attention projections are 1×1 convolutions
        out[prefix + ldm] = value
    return out


# -- text encoders ----------------------------------------------------------------------------------------------------
def _text_state(te: nn.Module) -> dict[str, torch.Tensor]:
    """transformers CLIP keys with `text_model.` in front (transformers ≥ 5.6 dropped it from CLIPTextModel)."""
    sd = te.state_dict()
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in sd.items()}


def clip_to_ldm(te: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    out = {prefix + k: v for k, v in _text_state(te).items()}
    # Real SD1 files carry this buffer (saved by old transformers versions); loaders must skip it.
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(te.config.max_position_embeddings)[None]
    return out


def _open_clip_layer(sd: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    src = f"text_model.encoder.layers.{i}."
    out = {}
    for kind in ("weight", "bias"):
        out[f"attn.in_proj_{kind}"] = torch.cat([sd[f"{src}self_attn.{n}_proj.{kind}"] for n in "qkv"], dim=0)
        for ldm, hf in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                        ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[f"{ldm}.{kind}"] = sd[f"{src}{hf}.{kind}"]
    return {f"transformer.resblocks.{i}.{k}": v for k, v in out.items()}


def _random(shape: tuple[int, ...], like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random values, or a meta tensor when building real-size key/shape maps on the meta device."""
    return torch.empty(shape, device="meta") if like.is_meta else torch.randn(shape, generator=gen)


def clip_to_open_clip(te: nn.Module, prefix: str, extra_layers: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """OpenCLIP text-tower keys; `extra_layers` random layers are appended (SD2 files hold 24, its encoder uses 23)."""
    sd = _text_state(te)
    layers = te.config.num_hidden_layers
    width = te.config.hidden_size
    out = {"token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           "ln_final.bias": sd["text_model.final_layer_norm.bias"],
           "logit_scale": torch.tensor(4.6052)}
    for i in range(layers):
        out.update(_open_clip_layer(sd, i))
    gen = torch.Generator().manual_seed(seed)
    for i in range(layers, layers + extra_layers):
        template = _open_clip_layer(sd, 0)
        out.update({k.replace(".resblocks.0.", f".resblocks.{i}."): _random(v.shape, v, gen)
                    for k, v in template.items()})
    if "text_projection.weight" in sd:
        out["text_projection"] = sd["text_projection.weight"].T.contiguous()  # OpenCLIP computes x @ P
    else:  # SD2 files hold the projection although SD conditions on the hidden states
        out["text_projection"] = _random((width, width), out["positional_embedding"], gen)
    return {prefix + k: v for k, v in out.items()}


# -- whole checkpoints ------------------------------------------------------------------------------------------------
def text_encoders_to_ldm(family: str, encoders: list[nn.Module]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for prefix, te in zip(CLIP_PREFIXES[family], encoders, strict=True):
        if prefix.endswith(".model."):
            out.update(clip_to_open_clip(te, prefix, extra_layers=1 if family == "sd2" else 0))
        else:
            out.update(clip_to_ldm(te, prefix))
    return out


def ldm_state_dict(bundle: DiffusersBundle) -> dict[str, torch.Tensor]:
    """The bundle as one LDM/SGM-layout state dict (contiguous copies, ready for safetensors)."""
    family = bundle.family.name.split("-")[0]
    out = unet_to_ldm(bundle.unet)
    out.update(vae_to_ldm(bundle.vae))
    out.update(text_encoders_to_ldm(family, [slot.module for slot in bundle.text_encoders]))
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def save_ldm_checkpoint(bundle: DiffusersBundle, path: Path, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the bundle as a single file: `.safetensors`, or a torch pickle `{"state_dict": …}` for `.ckpt`."""
    sd = ldm_state_dict(bundle)
    sd.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 1}, path)
    return path


def save_config_dir(bundle: DiffusersBundle, folder: Path) -> Path:
    """A config-only diffusers folder for the bundle (what `model_configs/<family>` is for the real models)."""
    bundle.unet.save_config(folder / "unet")
    bundle.vae.save_config(folder / "vae")
    for sub, slot in zip(TE_SUBFOLDERS, bundle.text_encoders, strict=False):
        slot.module.config.save_pretrained(folder / sub)
    return folder


def save_diffusers_folder(bundle: DiffusersBundle, folder: Path, *, tokenizers: bool = True,
                          prediction_type: str = "epsilon") -> Path:
    """The bundle as a diffusers model folder (weights + model_index.json + scheduler config)."""
    sdxl = bundle.family.is_sdxl
    index = {"_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
             "_diffusers_version": "0.42.1", "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    bundle.unet.save_pretrained(folder / "unet")
    bundle.vae.save_pretrained(folder / "vae")
    for i, (slot, tok) in enumerate(zip(bundle.text_encoders, bundle.tokenizers, strict=True)):
        suffix = f"_{i + 1}" if i else ""
        slot.module.save_pretrained(folder / f"text_encoder{suffix}")
        index[f"text_encoder{suffix}"] = ["transformers", type(slot.module).__name__]
        if tokenizers:
            tok.save_pretrained(folder / f"tokenizer{suffix}")
            index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
    scheduler = {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                 "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": prediction_type}
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler), encoding="utf-8")
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder


def build_tiny_sd2_bundle(seed: int = 0) -> DiffusersBundle:
    """A tiny SD2-style model (OpenCLIP-style gelu text encoder padded with "!", linear transformer projections)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=8,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                    attention_head_dim=(4, 8), use_linear_projection=True, norm_num_groups=32)
        vae = AutoencoderKL(block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8,
                            sample_size=64)
        te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                          num_hidden_layers=3, vocab_size=49408, max_position_embeddings=77,
                                          bos_token_id=49406, eos_token_id=49407, pad_token_id=0, hidden_act="gelu"))
    for module in (unet, vae, te):
        module.eval().requires_grad_(False)
    return DiffusersBundle(get_family("sd2"), unet, vae, [te], [load_clip_tokenizer("open-clip")],
                           scaled_linear_alphas_cumprod(), "tiny-sd2")
