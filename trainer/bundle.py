"""The one seam between the engine and a host: a `ModelBundle` hands the engine modules that are already loaded.

Every host (ComfyUI, A1111, Forge, the standalone loader, the tiny test model) implements this protocol. The engine
adapts `unet` and `text_encoders` in place through peft and removes the adapters afterwards, so the host gets its
modules back bit-identical. DDPM families (`prediction_type` epsilon / v_prediction) work in the variance-preserving
formulation: `predict` takes integer timesteps and returns the native prediction (ε or v); a host whose model works in
sigma/x0 space converts inside `predict`. Flow families (`prediction_type` "flow") take σ ∈ (0, 1) as floats, return
the velocity ε − x0, and map a drawn u to σ with `shift_sigmas` (the model's own time shift; the host's where it has
one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .families import Family


@dataclass
class Conditioning:
    """Text conditioning for a batch.

    Args:
        context: cross-attention states, [B, T, D].
        pooled: pooled text embedding (SDXL: the bigG projection, [B, 1280]; Flux: CLIP-L, SD3: CLIP-L‖G); None when
            the family has none.
        lengths: valid tokens per row when rows of different lengths were zero-padded to one tensor (DiT text
            encoders do not pad to a fixed length); a flow bundle runs each length on its own. None: every row is whole.
    """

    context: torch.Tensor
    pooled: torch.Tensor | None = None
    lengths: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype or t.dtype)

        return Conditioning(move(self.context), move(self.pooled), self.lengths)  # type: ignore[arg-type]

    def detach(self) -> Conditioning:
        """A copy that autograd will not track (and that is a normal tensor even if made under inference mode)."""
        pooled = None if self.pooled is None else self.pooled.detach().clone()
        lengths = None if self.lengths is None else self.lengths.clone()
        return Conditioning(self.context.detach().clone(), pooled, lengths)

    def __getitem__(self, index: slice | torch.Tensor | list[int]) -> Conditioning:
        return Conditioning(self.context[index], None if self.pooled is None else self.pooled[index],
                            None if self.lengths is None else self.lengths[index])

    def rows(self) -> list[tuple[int, list[int]]]:
        """(token count, row indices) groups of rows sharing one length (one group when `lengths` is None)."""
        if self.lengths is None:
            return [(self.context.shape[1], list(range(self.context.shape[0])))]
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(self.lengths.tolist()):
            groups.setdefault(int(n), []).append(i)
        return sorted(groups.items())

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        """Batch conditionings. CLIP contexts of different lengths (long captions: 77·k tokens) are repeated to their
        least common multiple, which is what cross-attention sees as the same sequence (ComfyUI does the same); DiT
        contexts (`lengths` set) are zero-padded to the longest and keep their lengths."""
        pooled = None if items[0].pooled is None else torch.cat([c.pooled for c in items])  # type: ignore[misc]
        if any(c.lengths is not None for c in items):
            width = max(c.context.shape[1] for c in items)
            contexts = [torch.nn.functional.pad(c.context, (0, 0, 0, width - c.context.shape[1])) for c in items]
            lengths = [c.lengths if c.lengths is not None else
                       torch.full((c.context.shape[0],), c.context.shape[1]) for c in items]
            return Conditioning(torch.cat(contexts), pooled, torch.cat(lengths))
        lengths_set = {c.context.shape[1] for c in items}
        target = math.lcm(*lengths_set)
        contexts = [c.context.repeat(1, target // c.context.shape[1], 1) for c in items]
        return Conditioning(torch.cat(contexts), pooled)


@dataclass
class SizeInfo:
    """SDXL micro-conditioning of one sample, in pixels: original size, crop top-left, target size."""

    original: tuple[int, int]
    crop_top_left: tuple[int, int] = (0, 0)
    target: tuple[int, int] | None = None

    def as_list(self) -> list[int]:
        target = self.target or self.original
        return [*self.original, *self.crop_top_left, *target]


@dataclass
class TextEncoderSlot:
    """One text encoder a bundle exposes for LoRA training.

    Args:
        module: the module peft adapts.
        prefix: kohya key prefix (`lora_te`, `lora_te1`, `lora_te2`).
        layer_pattern: regex whose group 1 is the layer index and group 2 the sub-path (`self_attn.q_proj`, `mlp.fc1`)
            inside `module`'s names; used to write kohya's `text_model_encoder_layers_{i}_{sub}` names.
    """

    module: nn.Module
    prefix: str
    layer_pattern: str = r"(?:.*\.)?layers\.(\d+)\.((?:self_attn\.(?:q|k|v|out)_proj)|(?:mlp\.fc[12]))"
    targets: list[str] = field(default_factory=list)


@runtime_checkable
class ModelBundle(Protocol):
    """What a host gives the engine. Attributes are read-only for the engine, except for adapter injection."""

    family: Family
    unet: nn.Module
    text_encoders: list[TextEncoderSlot]
    alphas_cumprod: torch.Tensor  # [num_train_timesteps], float32
    device: torch.device
    dtype: torch.dtype  # the dtype the frozen weights are stored in
    name: str  # shown in logs and written as ss_sd_model_name

    @property
    def prediction_type(self) -> str: ...

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [-1, 1] → scaled latents [B,C,H/8,W/8] (float32, on `device`)."""
        ...

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images [B,3,H,W] in [-1, 1]. Used only for sample images."""
        ...

    def encode_text(self, captions: list[str]) -> Conditioning:
        """Captions → conditioning; gradients flow when a text encoder carries a trainable adapter."""
        ...

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                sizes: list[SizeInfo] | None = None) -> torch.Tensor:
        """The denoiser's native prediction (epsilon or v) for integer `timesteps` [B]."""
        ...

    # Flow bundles also have: shift_sigmas(u: Tensor) -> Tensor, u ∈ (0, 1) → σ with the model's time shift.

    def unet_lora_name(self, module_path: str) -> str:
        """kohya key stem (`lora_unet_...`) for a module path of `unet`."""
        ...

    def unet_targets(self, conv: bool) -> dict[str, str]:
        """The UNet module paths kohya trains by default: {path: "linear"|"conv3x3"}.

        3×3 ResNet convs only with `conv`.
        """
        ...
