"""Memory and time models of the flow-matching DiTs (Flux.1, Chroma, SD3.5, Z-Image, Lumina 2, Qwen-Image).

The SD UNets are traced on the meta device (profiles.py). A DiT is simpler: a stack of L identical-width transformer
blocks over N = latent tokens + text tokens, so its step is modelled in closed form from (width D, blocks L, block
parameters P, text tokens T), with the constants below. Per sample, per block, backward keeps about
ACTIVATION_WIDTHS·D values per token (norm outputs, q/k/v, attention output, the 4·D MLP hidden before and after its
activation, modulated residuals, the adapters' rank-r intermediates); the math attention kernel also keeps the
heads·N² probabilities. Gradient checkpointing keeps only each block's input and recomputes one block at a time.
FLOPs: forward 2·P·N + 4·N²·D per block; backward without weight gradients costs the same again, checkpointing adds a
forward. These are estimates from the architecture, not traces; bench/vram_plan_gpu.py measures them on a GPU.

Full-size shapes (`FULL_SIZE`) come from the checkpoints' configs as ComfyUI detects them (docs/families.md §2):
Flux.1 3072 wide, 19 double + 38 single blocks (a double block is two streams, counted as two); Chroma the same
without modulation; SD3.5 Large 38 joint blocks × 2432 (two streams each); Z-Image 30 × 3840; Lumina 2 26 × 2304;
Qwen-Image 60 × 3072 (two streams each).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

from torch import nn

from ...blockswap import swappable_blocks
from .architecture import ComponentSizes
from .profiles import ArchitectureProfile, Quadratic, SideModel, StepModel

ACTIVATION_WIDTHS = 18.0  # saved values per token per block, in units of the width D (see the module docstring)
PATCH = 2  # every supported DiT patchifies 2×2 latent pixels into one token
LATENT_FACTOR = 8  # pixels per latent pixel (all these VAEs downsample 8×)
KERNELS_PER_BLOCK = 60  # forward + backward kernel launches per block (norms, matmuls, attention, adapters)
ADAMW_STATE, ADAMW_PEAK = 8.0, 16.0  # bytes per adapter parameter: AdamW state, and its peak inside step()
VAE_ENCODE_BYTES_PER_PIXEL = 2572.0  # the SD VAE's traced encode transient (profiles.json sd1 vae_encode), same design
VAE_DECODE_BYTES_PER_LATENT = 196656.0


@dataclass(frozen=True)
class DiTShape:
    """What the DiT step model needs.

    Args:
        width: hidden size D.
        blocks: block streams L (a double/joint block with separate image and text weights counts twice).
        block_params: parameters of all blocks together (the matmul FLOPs are 2 per parameter per token).
        text_tokens: tokens of the text context (Flux/Chroma T5: 512; SD3: 77 CLIP + 256 T5; others typical).
        heads: attention heads (the math kernel's N² probabilities).
        units: the blocks as modules (a double block is one): what block swap streams (`blocks_to_swap` counts these).
    """

    width: int
    blocks: int
    block_params: int
    text_tokens: int
    heads: int
    units: int = 0

    def tokens(self, latent_area: float) -> float:
        return latent_area / (PATCH * PATCH) + self.text_tokens


@dataclass(frozen=True)
class FullSize:
    shape: DiTShape
    sizes: ComponentSizes


def _sizes(transformer: float, vae: float, encoders: tuple[float, ...], per_rank: float) -> ComponentSizes:
    return ComponentSizes(int(transformer), int(vae), tuple(int(e) for e in encoders), int(per_rank), 0, 0)


# Parameter counts of the released checkpoints; per-rank = Σ(in+out) of the default targets (families.py `blocks`).
_T5XXL, _CLIP_L, _CLIP_G, _FLUX_VAE = 4.76e9, 1.23e8, 6.95e8, 8.4e7
_FLUX_PER_RANK = 19 * 2 * 23 * 3072 + 38 * 18 * 3072  # double: qkv 4D, proj 2D, mlp 5D+5D, mod 7D per stream
FULL_SIZE: dict[str, FullSize] = {
    "flux1": FullSize(DiTShape(3072, 76, int(11.8e9), 512, 24, 57), _sizes(11.9e9, _FLUX_VAE, (_CLIP_L, _T5XXL),
                                                                        _FLUX_PER_RANK)),
    "chroma": FullSize(DiTShape(3072, 76, int(8.8e9), 512, 24, 57), _sizes(8.9e9, _FLUX_VAE, (_T5XXL,),
                                                                       19 * 2 * 16 * 3072 + 38 * 14 * 3072)),
    "sd3": FullSize(DiTShape(2432, 76, int(8.0e9), 333, 38, 38), _sizes(8.1e9, _FLUX_VAE, (_CLIP_L, _CLIP_G, _T5XXL),
                                                                    38 * 2 * 29 * 2432)),
    "zimage": FullSize(DiTShape(3840, 30, int(5.9e9), 128, 30, 30), _sizes(6.15e9, _FLUX_VAE, (4.0e9,),
                                                                       30 * 15 * 3840)),
    "lumina2": FullSize(DiTShape(2304, 26, int(2.5e9), 256, 24, 26), _sizes(2.6e9, _FLUX_VAE, (2.6e9,),
                                                                        26 * 15 * 2304)),
    "qwen-image": FullSize(DiTShape(3072, 120, int(20.2e9), 256, 24, 60), _sizes(20.4e9, 1.27e8, (8.3e9,),
                                                                            60 * 2 * 17 * 3072)),
}
FULL_SIZE["flux1-schnell"] = FULL_SIZE["flux1"]


def dit_profile(name: str, shape: DiTShape) -> ArchitectureProfile:
    """An `ArchitectureProfile` with every mode's step model in closed form (see the module docstring)."""
    profile = ArchitectureProfile(name)
    for precision in ("fp32", "half"):
        for checkpointing in (False, True):
            for attention in ("flash", "math"):
                key = ArchitectureProfile.key(precision, checkpointing, attention)
                profile.steps[key] = _step_model(shape, 2 if precision == "half" else 4, checkpointing, attention)
        profile.inference[precision] = _inference_model(shape, 2 if precision == "half" else 4)
    profile.vae_encode = SideModel(Quadratic(0.0, VAE_ENCODE_BYTES_PER_PIXEL, 0.0))
    profile.vae_decode = SideModel(Quadratic(0.0, VAE_DECODE_BYTES_PER_LATENT, 0.0))
    return profile


def _step_model(shape: DiTShape, bytes_per_value: int, checkpointing: bool, attention: str) -> StepModel:
    d, blocks, t = shape.width, shape.blocks, shape.text_tokens
    k = 1.0 / (PATCH * PATCH)  # image tokens per latent pixel: N(A) = k·A + T
    block_values = ACTIVATION_WIDTHS * d  # per token, one block
    if checkpointing:
        per_token = (blocks * d + block_values) * bytes_per_value
    else:
        per_token = blocks * block_values * bytes_per_value
    # N² terms: attention probabilities (math kernel) of every kept block, heads·N² values.
    kept = 1 if checkpointing else blocks
    n2 = kept * shape.heads * 2 * bytes_per_value if attention == "math" else 0.0
    per_sample = Quadratic(per_token * t + n2 * t * t, per_token * k + n2 * 2 * k * t, n2 * k * k)
    passes = 3.0 if checkpointing else 2.0  # forward, input-gradient backward, recompute
    matmul = 2.0 * shape.block_params
    attn = 4.0 * d * blocks / 2  # q·kᵀ and p·v per token pair, halved: image and text streams share one attention
    flops = Quadratic(passes * (matmul * t + attn * t * t), passes * (matmul * k + attn * 2 * k * t),
                      passes * attn * k * k)
    weights = passes * shape.block_params * bytes_per_value
    traffic = Quadratic(weights + 3 * per_token * t, 3 * per_token * k, 0.0)
    return StepModel(fixed=0.0, per_sample=per_sample, flops=flops, traffic=traffic,
                     ops=int(KERNELS_PER_BLOCK * blocks * (1.5 if checkpointing else 1.0)),
                     optimizer_state_per_param=ADAMW_STATE, optimizer_peak_per_param=ADAMW_PEAK)


def _inference_model(shape: DiTShape, bytes_per_value: int) -> SideModel:
    """No-grad: one block's activations live at a time."""
    k = 1.0 / (PATCH * PATCH)
    per_token = ACTIVATION_WIDTHS * shape.width * bytes_per_value
    return SideModel(Quadratic(per_token * shape.text_tokens, per_token * k, 0.0))


def live_dit(name: str, transformer: nn.Module, targets: list[str]) -> FullSize:
    """Sizes and shape of a host's own DiT (any size: the tiny test models too), counted from its modules. A module
    as big as the released checkpoint (±5 %) uses the released shape; else the block streams are estimated as
    block parameters / 12·D² (attention 4·D² + MLP 8·D² per stream)."""
    modules = dict(transformer.named_modules())
    linears = [modules[p] for p in targets]
    widths = Counter(int(m.in_features) for m in linears)  # type: ignore[arg-type]
    width = widths.most_common(1)[0][0] if widths else 64
    total = sum(p.numel() for p in transformer.parameters())
    per_rank = sum(int(m.in_features) + int(m.out_features) for m in linears)  # type: ignore[arg-type]
    full = FULL_SIZE.get(name)
    if full is not None and abs(total - full.sizes.unet) < 0.05 * full.sizes.unet:
        return FullSize(full.shape, replace(full.sizes, unet=total, unet_linear_per_rank=per_rank))

    block_params = sum(m.weight.numel() for m in linears)  # type: ignore[union-attr]
    text_tokens = full.shape.text_tokens if full is not None else 256
    units = len(swappable_blocks(transformer))
    shape = DiTShape(width, max(1, round(block_params / (12 * width * width))), block_params, text_tokens,
                     max(1, width // 128), units)
    return FullSize(shape, ComponentSizes(total, 0, (), per_rank, 0, 0))
