"""`builtin:demo-base`: a small SD1-style model that really draws: one shape on a background, in the colours asked for.

The tiny models of `tiny.py` have random weights, so what they sample is noise before and after training. This one
keeps the SD1 interfaces (a diffusers `UNet2DConditionModel` with cross-attention, 4 latent channels at 1/8 of the
image, a CLIP text encoder with the real CLIP tokenizer), so the engine, the samplers and the kohya export treat it
like an SD1 checkpoint with v prediction. `cli/demo/build_base.py` trained its weights; they ship in
`cli/demo/base/`.

- text encoder: the tiny CLIP config of `tiny.py` (width 32, 3 layers, the real CLIP vocabulary), trained together
  with the UNet from seeded random weights: a frozen random one tells "red" from "green" too faintly for a short
  training to learn.
- VAE: `ThumbnailVAE`, an autoencoder of our own. Its latent is the image's 8×8-pixel block means (three colour
  channels) plus one learned detail channel, and a small convolutional decoder draws the 64 px image back from them.
  A learned `AutoencoderKL` of this size still got the colours wrong after 500 CPU steps. Block means are right from
  the first step, and every colour has a latent, also the ones the UNet never saw and a LoRA teaches it.
- UNet: trained on captioned scenes on SD's scaled-linear schedule with v prediction (as SD 2.x-v models): an
  epsilon model this small, trained this briefly, gets the high-noise steps wrong and samples colourful noise.

The configs and the VAE live here, the one place the build script and the loader both read them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..errors import LoraLoopError
from ..families import get_family
from ..schedule import scaled_linear_alphas_cumprod
from ..tokenizer import load_clip_tokenizer
from .diffusers_bundle import DiffusersBundle

NAME = "demo-base"
# Shipped beside the demo that uses it (the package root is the repository root: trainer/bundles/ → cli/demo/base/).
WEIGHTS = Path(__file__).resolve().parents[2] / "cli" / "demo" / "base" / "demo-base.safetensors"
RESOLUTION = 64
METADATA_KEY = "loraloop.demo_base"  # JSON: unet_config, vae_config, scaling_factor, recipe (what build_base ran)
PREDICTION = "v_prediction"

UNET_CONFIG: dict[str, Any] = {
    "sample_size": RESOLUTION // 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [48, 96],
    "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32,
    "attention_head_dim": 8, "norm_num_groups": 16,
}
VAE_CONFIG: dict[str, Any] = {"latent_channels": 4, "widths": [64, 48, 32, 16], "detail_width": 32}


class _Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # starts as the identity: a deep stack trains from the first step
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class ThumbnailVAE(ModelMixin, ConfigMixin):
    """An SD-shaped autoencoder (RGB in [-1, 1] ↔ 4 latent channels at 1/8 of the size) with a fixed encoder.

    Latent channels 0-2 are the means of 8×8 pixel blocks; channel 3 is learned from each block's pixels (bounded
    by tanh), so the decoder knows a little about where inside a block an edge runs. The decoder upsamples three
    times (no normalisation layers: they would remove the absolute colour) and adds its output to the bilinearly
    enlarged block means, so an untrained decoder already returns a blurred image. The encoder is deterministic:
    `latent_dist` has zero variance.
    """

    @register_to_config
    def __init__(self, latent_channels: int = 4, widths: tuple[int, ...] = (64, 48, 32, 16), detail_width: int = 32,
                 scaling_factor: float = 1.0) -> None:
        super().__init__()
        factor = 2 ** (len(widths) - 1)
        self.factor = factor
        self.detail = nn.Sequential(nn.Conv2d(3 * factor * factor, detail_width, 1), nn.SiLU(),
                                    nn.Conv2d(detail_width, latent_channels - 3, 1))
        self.conv_in = nn.Conv2d(latent_channels, widths[0], 3, padding=1)
        self.levels = nn.ModuleList()
        for i, width in enumerate(widths):
            layers: list[nn.Module] = [] if i == 0 else [nn.Upsample(scale_factor=2, mode="nearest"),
                                                         nn.Conv2d(widths[i - 1], width, 3, padding=1)]
            layers += [_Residual(width), _Residual(width)] if i == 0 else [_Residual(width)]
            self.levels.append(nn.Sequential(*layers))
        self.conv_out = nn.Conv2d(widths[-1], 3, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput:
        means = F.avg_pool2d(x, self.factor)
        detail = torch.tanh(self.detail(F.pixel_unshuffle(x, self.factor)))
        mean = torch.cat([means, detail], dim=1)
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(torch.cat([mean, torch.zeros_like(mean)],
                                                                                      dim=1), deterministic=True))

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput:
        h = self.conv_in(z)
        for level in self.levels:
            h = level(h)
        blurred = F.interpolate(z[:, :3], scale_factor=self.factor, mode="bilinear", align_corners=False)
        return DecoderOutput(sample=blurred + self.conv_out(F.silu(h)))


def make_modules(scaling_factor: float = 1.0) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """UNet, VAE and text encoder with fresh weights (the build script trains them; the loader fills them)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from .tiny import _text_config

    unet = UNet2DConditionModel(**UNET_CONFIG)
    vae = ThumbnailVAE(**VAE_CONFIG, scaling_factor=scaling_factor)
    return unet, vae, CLIPTextModel(_text_config(False))


def build_demo_bundle(weights: Path = WEIGHTS) -> DiffusersBundle:
    """The demo base model, float32 on the CPU, frozen."""
    from safetensors import safe_open

    if not weights.is_file():
        msg = (f"the demo base model {weights} is missing; rebuild it with `python -m loraloop.cli.demo.build_base` "
               "(about 20 minutes on 2 CPU cores)")
        raise LoraLoopError(msg)
    with safe_open(str(weights), "pt") as fh:
        header = json.loads((fh.metadata() or {}).get(METADATA_KEY, "{}"))
        state = {k: fh.get_tensor(k).float() for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    if header.get("unet_config") != UNET_CONFIG or header.get("vae_config") != VAE_CONFIG:
        msg = f"{weights} was built for other model configs than trainer/bundles/demo.py's; rebuild it"
        raise LoraLoopError(msg)
    unet, vae, te = make_modules(float(header["scaling_factor"]))
    for prefix, module in (("unet.", unet), ("vae.", vae), ("text_encoder.", te)):
        part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(part, strict=True)
    for module in (unet, vae, te):
        module.eval().requires_grad_(False)
    return DiffusersBundle(get_family("sd1"), unet, vae, [te], [load_clip_tokenizer("clip-l")],
                           scaled_linear_alphas_cumprod(), f"builtin:{NAME}", PREDICTION)
