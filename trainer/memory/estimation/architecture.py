"""A model family's architecture on the meta device: parameter counts, adapter sizes, and a bundle to trace.

The shipped diffusers configs (`model_configs/<family>`) hold the exact shapes of SD1.x, SD2.x and SDXL; built under
`torch.device("meta")` they cost no memory and let us count every parameter the real model has without its weights.
A `DiffusersBundle` (the tiny models, standalone checkpoints) can also be mirrored from its own module configs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from ...bundles.diffusers_bundle import DiffusersBundle
from ...families import get_family
from ...naming import RESNET_CLASSES, TE_CLASSES, TRANSFORMER_CLASSES, find_targets
from ...schedule import scaled_linear_alphas_cumprod

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComponentSizes:
    """Parameter counts of a model's parts, and the adapter parameters per unit of rank (LoRA: (in + out) per layer).

    Args:
        unet, vae: parameters of the denoiser and the autoencoder.
        text_encoders: parameters of each text encoder.
        unet_linear_per_rank: Σ(in + out) over the UNet's default (attention) targets: LoRA params = this × rank.
        unet_conv_per_rank: Σ(in·k·k + out) over the 3×3 ResNet convs LoCon adds (× conv rank).
        te_per_rank: Σ(in + out) over the text-encoder targets (for train_text_encoder).
    """

    unet: int
    vae: int
    text_encoders: tuple[int, ...]
    unet_linear_per_rank: int
    unet_conv_per_rank: int
    te_per_rank: int

    def adapter_params(self, rank: int, *, conv_rank: int | None = None, text_encoder: bool = False) -> int:
        """Trainable LoRA/LoCon parameters (LoHa/LoKr have about 2× / fewer; the planner traces those)."""
        total = self.unet_linear_per_rank * rank
        if conv_rank:
            total += self.unet_conv_per_rank * conv_rank
        if text_encoder:
            total += self.te_per_rank * rank
        return total


def _per_rank(root: nn.Module, paths: list[str]) -> tuple[int, int]:
    """(Σ in+out of linear-like targets, Σ in·k·k+out of 3×3 convs) for `paths` inside `root`."""
    modules = dict(root.named_modules())
    linear = conv = 0
    for path in paths:
        layer = modules[path]
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            if (kh, kw) == (1, 1):
                linear += layer.in_channels + layer.out_channels
            else:
                conv += layer.in_channels * kh * kw + layer.out_channels
        else:
            linear += layer.in_features + layer.out_features  # type: ignore[operator]
    return linear, conv


def component_sizes(unet: nn.Module, vae: nn.Module, text_encoders: list[nn.Module]) -> ComponentSizes:
    """Count parameters of real or meta modules (no tensor data is read)."""
    linear, _ = _per_rank(unet, find_targets(unet, TRANSFORMER_CLASSES))
    resnet_paths = [p for p in find_targets(unet, RESNET_CLASSES)]
    extra_linear, conv = _per_rank(unet, resnet_paths)
    te = sum(_per_rank(m, find_targets(m, TE_CLASSES))[0] for m in text_encoders)

    def count(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    # LoCon also adapts the 1×1 shortcut convs of ResNets at `rank`; they are counted with the conv share for
    # simplicity (they are < 2% of it).
    return ComponentSizes(count(unet), count(vae), tuple(count(m) for m in text_encoders), linear,
                          conv + extra_linear, te)


def _meta_modules(folder: Path, family: str) -> tuple[nn.Module, nn.Module, list[nn.Module]]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        encoders: list[nn.Module] = [CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder / "text_encoder")))]
        if get_family(family).is_sdxl:
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(folder / "text_encoder_2"))))
    for module in (unet, vae, *encoders):
        module.eval().requires_grad_(False)
    return unet, vae, encoders


def family_config_dir(family: str) -> Path:
    from ...bundles.checkpoint import shipped_config_dir

    return shipped_config_dir(family)


SIZES_FILE = Path(__file__).with_name("profiles.json")  # written with the profiles (profiles.write_shipped)


@lru_cache(maxsize=8)
def family_sizes(family: str) -> ComponentSizes:
    """Parameter counts of the full-size architecture of `family` (sd1, sd2, sd2-v, sdxl): the shipped counts, else
    counted now on the meta device (a few seconds for SDXL)."""
    name = get_family(family).name
    if SIZES_FILE.is_file():
        import json

        shipped = json.loads(SIZES_FILE.read_text(encoding="utf-8")).get("sizes", {})
        if name in shipped:
            entry = shipped[name]
            return ComponentSizes(**{**entry, "text_encoders": tuple(entry["text_encoders"])})
    return count_family_sizes(name)


def count_family_sizes(family: str) -> ComponentSizes:
    """Parameter counts of `family` built from its shipped configs on the meta device."""
    unet, vae, encoders = _meta_modules(family_config_dir(family), family)
    return component_sizes(unet, vae, encoders)


class _EmptyFp32ListFilter(logging.Filter):
    """diffusers warns on every `ModelMixin.to(dtype)` that modules "should be kept in float32: []" even when the
    list is empty, as for every SD UNet; the empty case says nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


def cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`module.to(dtype)` without diffusers' empty float32-modules warning."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    quiet = _EmptyFp32ListFilter()
    logger.addFilter(quiet)
    try:
        return module.to(dtype)
    finally:
        logger.removeFilter(quiet)


class _NoTokenizer:
    """Stands in for a tokenizer in a meta bundle: the tracer feeds token ids itself."""

    model_max_length = 77


def meta_bundle(family: str, *, dtype: torch.dtype = torch.float16, source: DiffusersBundle | None = None,
                folder: Path | None = None) -> DiffusersBundle:
    """A `DiffusersBundle` whose modules live on the meta device, in `dtype` (the VAE in float32, as bundles keep it).

    Args:
        family: the model family.
        dtype: dtype of the UNet and text encoders (the weight dtype of the run).
        source: mirror this bundle's module configs (e.g. a tiny model) instead of the shipped full-size configs.
        folder: a diffusers config folder to build from (default: the shipped one of `family`).
    """
    fam = get_family(family)
    if source is not None:
        unet, vae, encoders = _mirror(source)
    else:
        unet, vae, encoders = _meta_modules(folder or family_config_dir(fam.name), fam.name)
    cast(unet, dtype)
    for te in encoders:
        cast(te, dtype)
    tokenizers = [_NoTokenizer() for _ in encoders]
    return DiffusersBundle(fam, unet, vae, encoders, tokenizers, scaled_linear_alphas_cumprod(), f"meta:{fam.name}")


def _mirror(source: DiffusersBundle) -> tuple[nn.Module, nn.Module, list[nn.Module]]:
    """Meta copies of a diffusers bundle's modules, built from their configs (no weights are copied)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(source.unet.config))
        vae = AutoencoderKL.from_config(dict(source.vae.config))
        encoders = [type(slot.module)(slot.module.config) for slot in source.text_encoders]
    for module in (unet, vae, *encoders):
        module.eval().requires_grad_(False)
    return unet, vae, encoders
