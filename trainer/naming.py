"""UNet module paths in the two layouts (LDM/SGM `input_blocks…` and diffusers `down_blocks…`) and kohya's key names.

kohya names SD1/SD2 UNet LoRA keys after the diffusers path and SDXL keys after the SGM/LDM path (docs/lora-format.md
§1.3); hosts hold LDM-layout UNets, the standalone loader holds diffusers-layout ones. `UNetLayout` maps a module path
in either direction, so every bundle can emit exactly kohya's names.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from torch import nn

# LDM ResBlock sub-module ↔ diffusers ResnetBlock2D sub-module.
_RESNET_LDM_TO_DIFFUSERS = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}
_BASIC_LDM_TO_DIFFUSERS = {
    "input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
    "out.0": "conv_norm_out", "out.2": "conv_out",
}


@dataclass(frozen=True)
class UNetLayout:
    """Block structure of an SD-style UNet.

    Args:
        layers_per_block: ResNets per down level (the up path has one more).
        down_attention: per down level (highest resolution first), whether it has cross-attention blocks.
        up_attention: per up level (lowest resolution first, diffusers' `up_blocks` order), likewise.
    """

    layers_per_block: int
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]

    @property
    def levels(self) -> int:
        return len(self.down_attention)

    @classmethod
    def from_diffusers_config(cls, config: object) -> UNetLayout:
        """Layout of a diffusers `UNet2DConditionModel` config (an object or dict with `down_block_types` …)."""
        get = config.get if isinstance(config, dict) else lambda k: getattr(config, k)  # type: ignore[attr-defined]
        lpb = get("layers_per_block")
        lpb = lpb if isinstance(lpb, int) else lpb[0]
        return cls(lpb, tuple("CrossAttn" in t for t in get("down_block_types")),
                   tuple("CrossAttn" in t for t in get("up_block_types")))

    @classmethod
    def from_ldm_module(cls, unet: nn.Module) -> UNetLayout:
        """Layout read off an LDM/SGM-layout UNet's module tree (A1111, ComfyUI, Forge, sgm)."""
        names = {n for n, _ in unet.named_modules()}
        n_in = 1 + max(int(m.group(1)) for n in names if (m := re.fullmatch(r"input_blocks\.(\d+)", n)))
        n_down = sum(1 for n in names if re.fullmatch(r"input_blocks\.\d+\.0\.op", n))
        levels = n_down + 1
        lpb = (n_in - 1 - n_down) // levels
        down = []
        for lvl in range(levels):
            first = 1 + lvl * (lpb + 1)
            down.append(f"input_blocks.{first}.1.transformer_blocks" in names)
        up = []
        for lvl in range(levels):
            first = lvl * (lpb + 1)
            up.append(f"output_blocks.{first}.1.transformer_blocks" in names)
        return cls(lpb, tuple(down), tuple(up))

    @cached_property
    def _blocks(self) -> list[tuple[str, str, str]]:
        """(ldm prefix, diffusers prefix, kind) for every block, kind ∈ resnet/attention/downsample/upsample."""
        out: list[tuple[str, str, str]] = []
        n = 1
        for lvl in range(self.levels):
            for i in range(self.layers_per_block):
                out.append((f"input_blocks.{n}.0", f"down_blocks.{lvl}.resnets.{i}", "resnet"))
                if self.down_attention[lvl]:
                    out.append((f"input_blocks.{n}.1", f"down_blocks.{lvl}.attentions.{i}", "attention"))
                n += 1
            if lvl < self.levels - 1:
                out.append((f"input_blocks.{n}.0.op", f"down_blocks.{lvl}.downsamplers.0.conv", "downsample"))
                n += 1
        out.append(("middle_block.0", "mid_block.resnets.0", "resnet"))
        out.append(("middle_block.1", "mid_block.attentions.0", "attention"))
        out.append(("middle_block.2", "mid_block.resnets.1", "resnet"))
        n = 0
        for lvl in range(self.levels):
            for i in range(self.layers_per_block + 1):
                out.append((f"output_blocks.{n}.0", f"up_blocks.{lvl}.resnets.{i}", "resnet"))
                if self.up_attention[lvl]:
                    out.append((f"output_blocks.{n}.1", f"up_blocks.{lvl}.attentions.{i}", "attention"))
                if i == self.layers_per_block and lvl < self.levels - 1:
                    k = 2 if self.up_attention[lvl] else 1
                    out.append((f"output_blocks.{n}.{k}.conv", f"up_blocks.{lvl}.upsamplers.0.conv", "upsample"))
                n += 1
        return out

    def to_diffusers(self, ldm_path: str) -> str:
        """Diffusers path of an LDM module path.

        E.g. `input_blocks.1.1.proj_in` → `down_blocks.0.attentions.0.proj_in`.
        """
        return _convert(ldm_path, [(a, b, k) for a, b, k in self._blocks], _BASIC_LDM_TO_DIFFUSERS,
                        _RESNET_LDM_TO_DIFFUSERS)

    def to_ldm(self, diffusers_path: str) -> str:
        """LDM/SGM path of a diffusers module path (the inverse of `to_diffusers`)."""
        blocks = [(b, a, k) for a, b, k in self._blocks]
        basic = {v: k for k, v in _BASIC_LDM_TO_DIFFUSERS.items()}
        resnet = {v: k for k, v in _RESNET_LDM_TO_DIFFUSERS.items()}
        return _convert(diffusers_path, blocks, basic, resnet)


def _convert(path: str, blocks: list[tuple[str, str, str]], basic: dict[str, str], resnet: dict[str, str]) -> str:
    for src, dst in basic.items():
        if path == src or path.startswith(src + "."):
            return dst + path[len(src):]
    for src, dst, kind in blocks:
        if path == src or path.startswith(src + "."):
            rest = path[len(src):].lstrip(".")
            if kind == "resnet" and rest:
                for a, b in resnet.items():
                    if rest == a or rest.startswith(a + "."):
                        rest = b + rest[len(a):]
                        break
            return dst + ("." + rest if rest else "")
    msg = f"UNet module path {path!r} has no counterpart in the other layout"
    raise KeyError(msg)


def kohya_unet_name(path_in_kohya_layout: str) -> str:
    """`lora_unet_<path with . → _>`; the path must already be in the family's kohya layout."""
    return "lora_unet_" + path_in_kohya_layout.replace(".", "_")


def ldm_unet_lora_name(unet_names: str, layout: UNetLayout, ldm_path: str) -> str:
    """kohya stem for a module of an LDM-layout UNet (hosts): SGM path for SDXL, diffusers path for SD1/SD2."""
    return kohya_unet_name(ldm_path if unet_names == "ldm" else layout.to_diffusers(ldm_path))


def kohya_te_name(prefix: str, module_path: str, layer_pattern: str) -> str:
    """`<prefix>_text_model_encoder_layers_<i>_<sub>` for a CLIP layer module path, whatever the host calls it."""
    m = re.fullmatch(layer_pattern, module_path)
    if m is None:
        msg = f"text-encoder module {module_path!r} does not look like a CLIP encoder layer"
        raise KeyError(msg)
    return f"{prefix}_text_model_encoder_layers_{m.group(1)}_{m.group(2).replace('.', '_')}"


# Class names of the blocks kohya targets (diffusers, ldm/sgm, ComfyUI, Forge share the ldm names).
TRANSFORMER_CLASSES = {"Transformer2DModel", "SpatialTransformer"}
RESNET_CLASSES = {"ResnetBlock2D", "Downsample2D", "Upsample2D", "ResBlock", "Downsample", "Upsample"}
TE_CLASSES = {"CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"}


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d))


def find_targets(root: nn.Module, block_classes: set[str],
                 is_layer: Callable[[nn.Module], bool] = _is_layer) -> list[str]:
    """Paths of every layer (`is_layer`: Linear/Conv2d) inside a module whose class name is in `block_classes` (kohya's
    rule). A host whose layers are not torch's (Forge Neo) passes its own `is_layer`."""
    found: dict[str, None] = {}
    for name, module in root.named_modules():
        if type(module).__name__ in block_classes:
            for child_name, child in module.named_modules():
                if child_name and is_layer(child):
                    found[f"{name}.{child_name}" if name else child_name] = None
    return list(found)


def unet_targets(unet: nn.Module, conv: bool,
                 is_layer: Callable[[nn.Module], bool] = _is_layer) -> dict[str, str]:
    """kohya's default UNet targets → kind: `linear` (rank = network rank) or `conv3x3` (rank = conv rank, LoCon)."""
    targets = dict.fromkeys(find_targets(unet, TRANSFORMER_CLASSES, is_layer), "linear")
    if conv:
        modules = dict(unet.named_modules())
        for path in find_targets(unet, RESNET_CLASSES, is_layer):
            layer = modules[path]
            k = getattr(layer, "kernel_size", (1, 1))
            targets.setdefault(path, "conv3x3" if tuple(k) != (1, 1) else "linear")
    return targets


def native_lora_name(module_path: str) -> str:
    """kohya/ComfyUI stem of a DiT module: `lora_unet_<original module path with . → _>`.

    ComfyUI's loader maps this for every `diffusion_model.*` weight of any model (comfy/lora.py), and for Flux.1 it is
    exactly kohya's format, which Forge and diffusers' Flux loader read too (docs/families.md §3).
    """
    return "lora_unet_" + module_path.replace(".", "_")


def dit_targets(root: nn.Module, blocks: str, exclude: str | None = None,
                last_block_exclude: str | None = None) -> dict[str, str]:
    """Every Linear under a module path matching `blocks` (from the start), except paths matching `exclude`, and in
    the last block those matching `last_block_exclude` (layers whose output the model discards there)."""
    block_re, exclude_re = re.compile(blocks), re.compile(exclude) if exclude else None
    found = {name: "linear" for name, module in root.named_modules()
             if isinstance(module, nn.Linear) and block_re.match(name)
             and not (exclude_re is not None and exclude_re.search(name))}
    if last_block_exclude and found:
        last = max({block_re.match(name).group(0) for name in found},  # type: ignore[union-attr]
                   key=lambda prefix: [int(n) for n in re.findall(r"\d+", prefix)])
        dead = re.compile(re.escape(last) + last_block_exclude)
        found = {name: kind for name, kind in found.items() if not dead.match(name)}
    return found


SD_ATTENTION = r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$"  # diffusers, ldm and sgm share these attention names
TARGET_PRESETS = ("default", "attention")


def apply_preset(paths: list[str], preset: str, attention: str | None) -> list[str]:
    """`default`: all of `paths`; `attention`: only the attention projections (`attention`: the family's regex)."""
    if preset == "default":
        return paths
    if preset != "attention":
        msg = f"target_preset must be one of {', '.join(TARGET_PRESETS)} (got {preset!r})"
        raise ValueError(msg)
    pattern = re.compile(attention or SD_ATTENTION)
    return [p for p in paths if pattern.search(p)]
