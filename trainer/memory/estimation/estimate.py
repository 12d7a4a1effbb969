"""Peak memory and step time of a run, from the architecture's traced profile and the run's settings.

Memory (bytes on the training device), per phase, the largest of which is the peak:

* resident: frozen UNet weights (2 B/param in fp16/bf16, 4 in fp32), text encoders unless their outputs are cached
  and they are moved off the device, the VAE (always float32) unless latents are cached and it is moved off. Nothing
  when the host already holds the model (`weights_resident`).
* adapter: LoRA parameters (float32) and optimizer state (AdamW 8 B/param, AdamW8bit 2, Lion 4, Prodigy 16).
* train: the traced step peak for one chunk (`StepModel.peak`): saved activations, their gradients, adapter grads,
  the recompute of one block under gradient checkpointing, at the largest bucket's latent area.
* cache: caching latents/text before training, `cache_batch_size` images at a time, encoders on the device (and the
  UNet only if `cache_with_unet_resident`).
* encode: without a latent cache, the VAE encodes a whole micro-batch before the forward (`BatchMaker`).
* sample: sample images run the denoiser on 2 × prompts (classifier-free guidance); the VAE decode and text encoding
  run wherever the encoders are (on the CPU once offloaded).
* workspace: cuBLAS/cuDNN workspaces and allocator rounding the trace cannot see (CUDA only; an allowance the probe
  replaces with a measurement).

Time: a chunk takes max(FLOPs / (TFLOPS·compute efficiency), traffic / (bandwidth·memory efficiency)) plus one launch
cost per kernel (devices.py); a step is accumulation × chunks per micro-batch of those. Gradient checkpointing's
recompute is in the traced FLOPs and traffic.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace

from ...config import TrainConfig, field_default
from ...families import Family, get_family
from ...units import GIB
from .architecture import ComponentSizes, family_sizes
from .devices import COMPUTE_EFFICIENCY, MEMORY_EFFICIENCY, DeviceSpec
from .dit import FULL_SIZE, FullSize, dit_profile, live_dit
from .profiles import ArchitectureProfile, family_profile

log = logging.getLogger(__name__)

OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "adamw8bit": 2.0, "lion": 4.0, "prodigy": 16.0}
# Peak extra bytes per parameter inside optimizer.step (foreach temporaries), relative to AdamW's traced value.
OPTIMIZER_TEMP_SCALE = {"adamw": 1.0, "adamw8bit": 0.25, "lion": 0.5, "prodigy": 1.5}
# LoHa has two low-rank pairs per layer; LoKr's Kronecker factors are about as big as LoRA's at the same rank.
NETWORK_PARAM_SCALE = {"lora": 1.0, "locon": 1.0, "loha": 2.0, "lokr": 1.0}
WORKSPACE_BYTES = 192 * 1024**2  # cuBLAS (tens of MB) + cuDNN conv workspaces seen on SD UNets
WORKSPACE_SHARE = 0.05  # allocator rounding of activations (512-byte blocks) and cuDNN's size-dependent workspaces


@dataclass(frozen=True)
class RunShape:
    """The settings a memory/time estimate depends on, fully resolved (no `auto`).

    Args:
        family: the model family (`sd1`, `sd2`, `sd2-v`, `sdxl`).
        bucket: the largest (width, height) bucket in pixels: its area sets the activation peak.
        mean_area: mean pixel area per sample over the epoch (for time); defaults to the bucket's.
        batch_size, accumulation_steps: as in the config.
        chunk_size: samples per forward (`BatchMaker.chunk_size`); None → the whole micro-batch.
        lora_rank, conv_rank, network_type, train_text_encoder: the network.
        gradient_checkpointing: recompute activations in backward.
        cache_latents: latents encoded once (else the VAE runs every step).
        cache_text: text conditioning encoded once (else the text encoders run every step).
        offload_encoders: move the encoders a cache makes idle off the device (standalone runs).
        text_on_cpu: the text encoders cache their outputs on the CPU, never entering the device (T5-XXL alone is
            9.5 GB in bf16: more than an 8 GB card holds).
        optimizer, mixed_precision: as in the config.
        attention: `flash` (PyTorch's fused kernels) or `math`.
        sample_prompts: prompts sampled during training (0: none); at `sample_resolution`.
        weights_resident: the host already holds the frozen model on the device (it is not part of the need).
        cache_with_unet_resident: latents/text are cached while the UNet is already on the device (the standalone
            runner caches first, `runner.encode_then_load_unet`: at SDXL 1024 the VAE's encode transient beside the
            UNet breaks 8 GB).
        cache_batch_size: images the VAE encodes at once while caching (`LatentCache.prepare(batch_size=…)`).
        weight_bytes: bytes per frozen denoiser weight when the host fixed them (ComfyUI's fp8 models: 1); None:
            by precision (2 in fp16/bf16, 4 in fp32).
        blocks_to_swap: transformer blocks streamed from host memory (blockswap.py): two of them are on the device
            at a time; each costs two transfers per chunk (forward and the recompute in backward).
    """

    family: str
    bucket: tuple[int, int]
    batch_size: int = 1
    accumulation_steps: int = 1
    chunk_size: int | None = None
    lora_rank: int = field_default("lora_rank")
    conv_rank: int | None = None
    network_type: str = "lora"
    train_text_encoder: bool = False
    gradient_checkpointing: bool = False
    cache_latents: bool = True
    cache_text: bool = True
    offload_encoders: bool = True
    text_on_cpu: bool = False
    optimizer: str = "adamw"
    mixed_precision: str = "bf16"
    attention: str = "flash"
    sample_prompts: int = 0
    sample_resolution: int | None = None
    weights_resident: bool = False
    mean_area: float | None = None
    cache_with_unet_resident: bool = False
    cache_batch_size: int = 1
    weight_bytes: float | None = None
    blocks_to_swap: int = 0

    @property
    def chunk(self) -> int:
        return max(1, min(self.chunk_size or self.batch_size, self.batch_size))

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.accumulation_steps

    @classmethod
    def from_config(cls, config: TrainConfig, family: str, **overrides: object) -> RunShape:
        """A shape from a config: the largest bucket is the square `resolution` unless `bucket` is given."""
        res = config.resolution
        values = {
            "family": family, "bucket": (res, res), "batch_size": config.batch_size,
            "accumulation_steps": config.accumulation_steps, "lora_rank": config.lora_rank,
            "conv_rank": (config.conv_rank or config.lora_rank) if config.network_type != "lora" else config.conv_rank,
            "network_type": config.network_type, "train_text_encoder": config.train_text_encoder,
            "gradient_checkpointing": config.gradient_checkpointing,
            "cache_latents": config.cache_latents and not config.random_crop,
            "cache_text": config.cache_text_encoder_outputs and config.can_cache_text(),
            "optimizer": config.optimizer, "mixed_precision": config.mixed_precision,
            "sample_prompts": len(config.sample_prompts) if config.sample_every_n_steps else 0,
            "sample_resolution": res, "blocks_to_swap": config.blocks_to_swap,
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak bytes and what they are made of.

    Attributes:
        parts: bytes by component at the peak phase (weights_*, adapter, optimizer, activations, workspace …).
        phases: peak bytes of each phase (train, encode, sample, optimizer).
        peak: the largest phase plus the workspace allowance.
        peak_phase: which phase it is.
    """

    parts: dict[str, int]
    phases: dict[str, int]
    peak: int
    peak_phase: str

    def gb(self) -> float:
        return self.peak / GIB


@dataclass(frozen=True)
class TimeEstimate:
    """Predicted seconds per optimizer step; `basis` says where the speed came from."""

    seconds_per_step: float
    basis: str
    calibration: float = 1.0

    def total(self, steps: int) -> float:
        return self.seconds_per_step * steps


@dataclass
class ModelInfo:
    """A family's parameter counts and traced profile (full size, or one bundle's own architecture)."""

    family: Family
    sizes: ComponentSizes
    profile: ArchitectureProfile
    _cache: dict = field(default_factory=dict, repr=False)
    swap_blocks: int = 0  # transformer blocks block swap can stream (0: none, the SD UNets)
    swap_block_params: int = 0  # their parameters together

    @classmethod
    def for_dit(cls, family: Family, full: FullSize) -> ModelInfo:
        return cls(family, full.sizes, dit_profile(family.name, full.shape), swap_blocks=full.shape.units,
                   swap_block_params=full.shape.block_params if full.shape.units else 0)

    @classmethod
    def for_family(cls, family: str) -> ModelInfo:
        fam = get_family(family)
        if fam.is_flow:  # DiTs: closed-form step model of the released architecture (dit.py)
            return cls.for_dit(fam, FULL_SIZE[fam.name])
        return cls(fam, family_sizes(fam.name), family_profile(fam.name))

    def swap_bytes_per_block(self, weight_bytes: float) -> float:
        return self.swap_block_params * weight_bytes / self.swap_blocks if self.swap_blocks else 0.0

    @classmethod
    def for_bundle(cls, bundle: object, family: str | None = None) -> ModelInfo:
        """A bundle's own architecture when it is a diffusers bundle of non-standard size (tiny models), else the
        full-size family's (hosts hold the standard architectures)."""
        from ...bundles.diffusers_bundle import DiffusersBundle
        from .architecture import component_sizes
        from .profiles import live_profile

        fam = get_family(family or bundle.family.name)  # type: ignore[attr-defined]
        if fam.is_flow:  # a host's DiT, counted from its own modules (any size)
            live = live_dit(fam.name, bundle.unet, list(bundle.unet_targets(False)))  # type: ignore[attr-defined]
            return cls.for_dit(fam, live)
        if not isinstance(bundle, DiffusersBundle):
            return cls.for_family(fam.name)
        sizes = component_sizes(bundle.unet, bundle.vae, [s.module for s in bundle.text_encoders])
        if sizes.unet == family_sizes(fam.name).unet:
            return cls.for_family(fam.name)
        return cls(fam, sizes, live_profile(bundle, bundle.name, bundle.device.type))


def compute_precision(shape: RunShape, device: DeviceSpec) -> str:
    # The loop loads fp16/bf16 weights and autocasts only on CUDA (runner.load_bundle); on CPU weights stay fp32.
    return "half" if shape.mixed_precision in ("fp16", "bf16") and device.kind == "cuda" else "fp32"


def adapter_params(info: ModelInfo, shape: RunShape) -> int:
    conv = shape.conv_rank if shape.network_type != "lora" or shape.conv_rank else None
    base = info.sizes.adapter_params(shape.lora_rank, conv_rank=conv, text_encoder=shape.train_text_encoder)
    return int(base * NETWORK_PARAM_SCALE.get(shape.network_type, 1.0))


def estimate_memory(info: ModelInfo, shape: RunShape, device: DeviceSpec) -> MemoryEstimate:
    """Peak device bytes of a run with `shape` on `device` (see the module docstring for the model)."""
    precision = compute_precision(shape, device)
    weight_bytes = 2 if precision == "half" else 4
    sizes = info.sizes
    te_weights = sum(sizes.text_encoders) * weight_bytes
    vae_weights = sizes.vae * 4
    te_off = shape.cache_text and shape.offload_encoders and not shape.train_text_encoder
    vae_off = shape.cache_latents and shape.offload_encoders
    unet_bytes = sizes.unet * (shape.weight_bytes or weight_bytes)
    swapped = min(shape.blocks_to_swap, info.swap_blocks)
    if swapped:  # all but the two in flight stay in host memory
        unet_bytes -= (swapped - min(swapped, 2)) * info.swap_bytes_per_block(shape.weight_bytes or weight_bytes)
    resident = {"weights_unet": int(unet_bytes),
                "weights_text_encoders": 0 if te_off else te_weights,
                "weights_vae": 0 if vae_off else vae_weights}
    if shape.weights_resident:
        resident = dict.fromkeys(resident, 0)
    params = adapter_params(info, shape)
    w, h = shape.bucket
    figures = info.profile.figures(precision, shape.gradient_checkpointing, shape.attention, shape.chunk,
                                   (h // 8, w // 8), shape.lora_rank)
    state = int(params * OPTIMIZER_STATE_BYTES[shape.optimizer])
    # A shipped profile was traced at rank 16; its peak holds rank-16 adapter gradients. Swapping in this rank's at
    # 4 B/param slightly overstates high ranks (measured: +2% at rank 128), never understates.
    grads_delta = (params - info.sizes.adapter_params(figures.rank)) * 4
    activations = int(figures.peak + grads_delta)
    if shape.train_text_encoder:
        activations += int(shape.chunk * _te_train_bytes(info, precision))
    base = sum(resident.values()) + params * 4 + state
    # Inside optimizer.step: gradients (4 B/param) + state + foreach temporaries (traced for AdamW, scaled for others).
    temp = max(0.0, figures.optimizer_peak_per_param - 4 - figures.optimizer_state_per_param)
    phases = {"train": base + activations,
              "optimizer": base + int(params * (4 + temp * OPTIMIZER_TEMP_SCALE[shape.optimizer]))}
    encode, decode = info.profile.vae_models()
    if shape.cache_latents or shape.cache_text:
        # Caching runs before training, `cache_batch_size` images at a time, with the encoders on the device and the
        # UNet too unless the runner caches before moving it there.
        unet = sizes.unet * weight_bytes if shape.cache_with_unet_resident else 0
        encoders = (vae_weights if shape.cache_latents else 0) + \
            (te_weights if shape.cache_text and not shape.text_on_cpu else 0)
        transient = encode.peak(shape.cache_batch_size, w * h) if shape.cache_latents else 0
        phases["cache"] = (0 if shape.weights_resident else unet + encoders) + int(transient)
    if not shape.cache_latents:
        phases["encode"] = base + int(encode.peak(shape.batch_size, w * h))
    if shape.sample_prompts:
        # Offloaded encoders run on the CPU (DiffusersBundle moves ids/latents to them): only the denoiser samples
        # on the device; otherwise the VAE decode is a device phase too.
        side = shape.sample_resolution or max(w, h)
        latent = (side // 8) ** 2
        sample = info.profile.inference_model(precision).peak(2 * shape.sample_prompts, latent)
        weights = sum(resident.values())
        if not shape.offload_encoders:
            sample = max(sample, decode.peak(shape.sample_prompts, latent))
        phases["sample"] = weights + params * 4 + state + int(sample)
    peak_phase = max(phases, key=lambda k: phases[k])
    workspace = 0
    if device.kind == "cuda":
        workspace = int(WORKSPACE_BYTES + WORKSPACE_SHARE * (phases[peak_phase] - sum(resident.values())))
    parts = {**resident, "adapter": params * 4, "optimizer": state, "activations": activations,
             "workspace": workspace}
    return MemoryEstimate(parts, phases, phases[peak_phase] + workspace, peak_phase)


def _te_train_bytes(info: ModelInfo, precision: str) -> float:
    """Saved activations per sample of LoRA-trained text encoders: 77 tokens × width × ~30 values per layer (traced
    with fp16 autocast: SD1 34 MiB, SDXL 220 MiB per sample; this gives 41 and 221)."""
    per_layer_values = 77 * 30
    widths = {"sd1": [(768, 12)], "sd2": [(1024, 23)], "sd2-v": [(1024, 23)], "sdxl": [(768, 12), (1280, 32)]}
    layers = widths.get(info.family.name, [(768, 12)])
    return sum(width * n * per_layer_values for width, n in layers) * (2 if precision == "half" else 4)


def estimate_time(info: ModelInfo, shape: RunShape, device: DeviceSpec, *, calibration: float = 1.0,
                  basis: str | None = None) -> TimeEstimate:
    """Seconds per optimizer step (see the module docstring); `calibration` scales it (measured / predicted)."""
    precision = compute_precision(shape, device)
    w, h = shape.bucket
    chunk = shape.chunk
    figures = info.profile.figures(precision, shape.gradient_checkpointing, shape.attention, chunk, (h // 8, w // 8),
                                   shape.lora_rank)
    # FLOPs and traffic are linear in the area (attention aside) and exactly linear in the batch: rescale from the
    # largest bucket to the mean sample.
    area_ratio = (shape.mean_area or w * h) / (w * h)
    flops, traffic = figures.flops / chunk * area_ratio, figures.traffic / chunk * area_ratio

    transfer = swap_seconds(info, shape, device, precision)

    def chunk_seconds(n: int) -> float:
        compute = n * flops / (device.tflops(precision == "half") * 1e12 * COMPUTE_EFFICIENCY)
        memory = n * traffic / (device.bandwidth_gbs * 1e9 * MEMORY_EFFICIENCY)
        # Swapped blocks arrive on a side stream while the previous block computes: the slower of the two wins.
        return max(compute, memory, transfer) + figures.ops * device.launch_seconds

    full, rest = divmod(shape.batch_size, chunk)
    micro = full * chunk_seconds(chunk) + (chunk_seconds(rest) if rest else 0.0)
    seconds = shape.accumulation_steps * micro
    if not shape.cache_latents:
        # VAE encoding costs about a third of a training forward per image at the same size (measured ratio of
        # traced FLOPs: SD VAE encoder ≈ 0.5 TFLOP at 512², SD1.5 forward+backward ≈ 1.8 TFLOP).
        seconds *= 1.3
    name = basis or f"throughput model for {device.name}"
    return TimeEstimate(seconds * calibration, name, calibration)


def swap_seconds(info: ModelInfo, shape: RunShape, device: DeviceSpec, precision: str) -> float:
    """Host→device transfer time of one chunk's swapped blocks: each is loaded for the forward and again for its
    recompute in backward (the last one stays between them)."""
    swapped = min(shape.blocks_to_swap, info.swap_blocks)
    if not swapped or device.kind != "cuda":
        return 0.0
    per_block = info.swap_bytes_per_block(shape.weight_bytes or (2 if precision == "half" else 4))
    return (2 * swapped - 1) * per_block / (device.host_link_gbs * 1e9)


def with_shape(shape: RunShape, **changes: object) -> RunShape:
    return replace(shape, **changes)  # type: ignore[arg-type]


def bucket_latent_area(bucket: tuple[int, int]) -> int:
    return math.prod(side // 8 for side in bucket)
