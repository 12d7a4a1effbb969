"""Choose the fastest settings that fit the memory actually free, keeping the user's effective batch.

Keys the user left `auto` may change; every other key is kept. The search enumerates the speed knobs (batch and
accumulation with the same product, the chunk a micro-batch is split into, gradient checkpointing, caches, optimizer,
mixed precision), estimates each combination's peak and step time, and keeps the fastest that fits in
`free × (1 − margin)`. Only when nothing fits does it lower quality: the resolution first (64 px at a time, to half),
then the rank (halving, to 4) with the resolution searched again from the top, as the OOM ladder orders them. Every
change carries its reason, computed by undoing that one change and estimating again.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from itertools import product

from ...config import PLANNABLE, TrainConfig, bucket_defaults
from ...network import MIN_RANK
from ...units import GIB, fmt_duration
from ..estimation.devices import DeviceSpec
from ..estimation.estimate import (
    MemoryEstimate,
    ModelInfo,
    RunShape,
    TimeEstimate,
    compute_precision,
    estimate_memory,
    estimate_time,
    swap_seconds,
)

log = logging.getLogger(__name__)

DEFAULT_MARGIN = 0.10  # allocator fragmentation (reserved − allocated) is typically 3-8% on these workloads
RESOLUTION_STEP = 64
# A plan that needs a change of the user's settings should win only when it is really faster.
CHANGE_PENALTY = 0.01

# RunShape field → config key (`chunk_size` and `offload_encoders` are run-time levers without a config key).
SHAPE_KEYS = {"batch_size": "batch_size", "accumulation_steps": "accumulation_steps", "chunk_size": "chunk_size",
              "gradient_checkpointing": "gradient_checkpointing", "cache_latents": "cache_latents",
              "cache_text": "cache_text_encoder_outputs", "optimizer": "optimizer",
              "mixed_precision": "mixed_precision", "lora_rank": "lora_rank", "offload_encoders": "offload_encoders",
              "blocks_to_swap": "blocks_to_swap"}
SWAP_STEPS = 16  # block-swap candidates the search tries (0, then up to every block in this many steps)


@dataclass(frozen=True)
class DatasetFacts:
    """What the planner needs to know about the data.

    Args:
        max_bucket: the largest-area (width, height) bucket the dataset uses at the configured resolution.
        mean_area: mean pixel area per sample (for time).
        samples_per_epoch: images × repeats (for the step count).
        captions_static: no caption dropout/shuffle, so text outputs can be cached.
    """

    max_bucket: tuple[int, int] | None = None
    mean_area: float | None = None
    samples_per_epoch: int | None = None
    captions_static: bool = True

    @classmethod
    def from_dataset(cls, dataset: object) -> DatasetFacts:
        """Facts of a `TrainDataset`."""
        counts = dataset.bucket_counts()  # type: ignore[attr-defined]
        biggest = max(counts, key=lambda b: (b[0] * b[1], b))
        total = sum(counts.values())
        mean = sum(w * h * n for (w, h), n in counts.items()) / max(1, total)
        return cls(biggest, mean, len(dataset), dataset.captions_are_static)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Change:
    """One setting the plan changed: config key, the user's value, the plan's value, and why."""

    key: str
    old: object
    new: object
    reason: str

    def __str__(self) -> str:
        return f"{self.key}: {self.old} → {self.new} ({self.reason})"


@dataclass(frozen=True)
class Plan:
    """The resolved settings of a run and what they cost.

    Attributes:
        shape: every resolved setting the estimate used.
        resolution: the training resolution (the plan may lower it).
        memory, time: the estimates of `shape`.
        free_bytes: memory free for the run; budget_bytes: the part the plan may use (free minus the margin).
        fits: memory.peak ≤ budget_bytes.
        total_steps: optimizer steps of the run, when known (for the ETA).
        changes: settings that differ from the user's, with reasons.
        device: the device planned for.
        advice: when nothing fits, what would (else empty).
    """

    shape: RunShape
    resolution: int
    memory: MemoryEstimate
    time: TimeEstimate
    free_bytes: int
    budget_bytes: int
    fits: bool
    total_steps: int | None
    changes: tuple[Change, ...]
    device: str
    advice: str = ""

    @property
    def chunk_size(self) -> int | None:
        """`BatchMaker.chunk_size` for the run (None: whole micro-batches)."""
        return None if self.shape.chunk >= self.shape.batch_size else self.shape.chunk

    @property
    def eta_seconds(self) -> float | None:
        return None if self.total_steps is None else self.time.total(self.total_steps)

    def apply(self, config: TrainConfig) -> TrainConfig:
        """`config` with the plan's values (the chunk size, cache batch and encoder offloading are given to the runner
        apart). `cache_text_encoder_outputs` changes only when the plan changed it: where captions rule caching out,
        the user's switch is kept for the next run rather than written as false."""
        s = self.shape
        changed = {c.key for c in self.changes}
        cache_text = s.cache_text if "cache_text_encoder_outputs" in changed else config.cache_text_encoder_outputs
        return replace(config, batch_size=s.batch_size, accumulation_steps=s.accumulation_steps,
                       lora_rank=s.lora_rank, resolution=self.resolution, **self._bucket_limits(config),
                       gradient_checkpointing=s.gradient_checkpointing, cache_latents=s.cache_latents,
                       cache_text_encoder_outputs=cache_text, optimizer=s.optimizer,
                       mixed_precision=s.mixed_precision, blocks_to_swap=s.blocks_to_swap).validate()

    def _bucket_limits(self, config: TrainConfig) -> dict[str, int | None]:
        """Bucket limits for the plan's resolution. Unset ones are derived from it anyway; the user's are kept unless
        the lower resolution contradicts them (the largest side then shrinks with it, as the estimate assumed)."""
        if self.resolution == config.resolution:
            return {}
        derived = bucket_defaults(self.resolution, config.bucket_reso_steps)
        out: dict[str, int | None] = {}
        if config.max_bucket_reso is not None:
            out["max_bucket_reso"] = min(config.max_bucket_reso, derived["max_bucket_reso"])
        if config.min_bucket_reso is not None and config.min_bucket_reso > self.resolution:
            out["min_bucket_reso"] = None
        return out

    def lines(self) -> list[str]:
        """Human-readable summary, one fact per line (the CLI prints these)."""
        m = self.memory
        out = [f"device:            {self.device}",
               f"memory free:       {self.free_bytes / GIB:.2f} GB (plan may use {self.budget_bytes / GIB:.2f} GB)",
               f"estimated peak:    {m.peak / GIB:.2f} GB ({m.peak_phase}) — {'fits' if self.fits else 'DOES NOT FIT'}",
               "  " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in m.parts.items() if v),
               f"seconds per step:  {self.time.seconds_per_step:.2f} ({self.time.basis})"]
        if self.eta_seconds is not None:
            out.append(f"total:             {self.total_steps} steps ≈ {fmt_duration(self.eta_seconds)}")
        s = self.shape
        out.append(f"settings:          batch {s.batch_size} × accumulation {s.accumulation_steps}"
                   f"{f' (chunks of {self.chunk_size})' if self.chunk_size else ''}, rank {s.lora_rank}, "
                   f"resolution {self.resolution}, gradient_checkpointing {s.gradient_checkpointing}, "
                   f"cache_latents {s.cache_latents}, cache_text_encoder_outputs {s.cache_text}, "
                   f"optimizer {s.optimizer}, mixed_precision {s.mixed_precision}"
                   f"{f', blocks_to_swap {s.blocks_to_swap}' if s.blocks_to_swap else ''}"
                   f"{', text encoders cache on the CPU' if s.text_on_cpu else ''}")
        out += [f"changed:           {c}" for c in self.changes] or ["changed:           nothing"]
        if self.advice:
            out.append(f"advice:            {self.advice}")
        return out

    def to_dict(self) -> dict:
        s = self.shape
        return {"device": self.device, "fits": self.fits, "free_gb": round(self.free_bytes / GIB, 3),
                "budget_gb": round(self.budget_bytes / GIB, 3), "peak_gb": round(self.memory.peak / GIB, 3),
                "peak_phase": self.memory.peak_phase,
                "parts_gb": {k: round(v / GIB, 3) for k, v in self.memory.parts.items()},
                "seconds_per_step": round(self.time.seconds_per_step, 4), "total_steps": self.total_steps,
                "eta_seconds": None if self.eta_seconds is None else round(self.eta_seconds, 1),
                "settings": {"batch_size": s.batch_size, "accumulation_steps": s.accumulation_steps,
                             "chunk_size": self.chunk_size, "lora_rank": s.lora_rank, "resolution": self.resolution,
                             "gradient_checkpointing": s.gradient_checkpointing, "cache_latents": s.cache_latents,
                             "cache_text_encoder_outputs": s.cache_text, "offload_encoders": s.offload_encoders,
                             "text_on_cpu": s.text_on_cpu,
                             "cache_batch_size": s.cache_batch_size,
                             "optimizer": s.optimizer, "mixed_precision": s.mixed_precision,
                             "blocks_to_swap": s.blocks_to_swap},
                "changes": [{"key": c.key, "old": c.old, "new": c.new, "reason": c.reason} for c in self.changes],
                "advice": self.advice}


def divisors(n: int) -> list[int]:
    """Divisors of n, largest first."""
    return sorted((d for d in range(1, n + 1) if n % d == 0), reverse=True)


@dataclass(frozen=True)
class PlanRequest:
    """Everything a plan depends on besides the config.

    Args:
        info: the model's sizes and profile.
        device: the device's speed and kind.
        free_bytes: memory free for this run (after the host's resident models).
        auto: config keys the planner may change (see PLANNABLE).
        dataset: facts of the dataset (default: square buckets at the resolution).
        margin: share of `free_bytes` kept free for fragmentation.
        weights_resident: the host already holds the frozen model on the device.
        optimizers: optimizers that can be used here (default: all installed).
        calibration: measured / predicted seconds from a probe (1.0: none).
        memory_scale: measured / predicted activation bytes from a probe (1.0: none).
        weight_bytes: bytes per frozen denoiser weight as the host holds them (fp8: 1); None: by precision.
    """

    info: ModelInfo
    device: DeviceSpec
    free_bytes: int
    auto: frozenset[str] = frozenset(PLANNABLE)
    dataset: DatasetFacts = field(default_factory=DatasetFacts)
    margin: float = DEFAULT_MARGIN
    weights_resident: bool = False
    optimizers: tuple[str, ...] | None = None
    calibration: float = 1.0
    memory_scale: float = 1.0
    weight_bytes: float | None = None


def _bucket(config: TrainConfig, resolution: int, facts: DatasetFacts) -> tuple[int, int]:
    if facts.max_bucket is None:
        return (resolution, resolution)
    w, h = facts.max_bucket
    if resolution == config.resolution:
        return (w, h)
    scale = resolution / config.resolution  # buckets shrink with the area budget, 64-px steps
    return (max(64, int(w * scale) // 64 * 64), max(64, int(h * scale) // 64 * 64))


def _text_cacheable(config: TrainConfig, facts: DatasetFacts) -> bool:
    """Captions never change and no text encoder is trained: caching text outputs is possible (`caches_text`)."""
    return config.can_cache_text(facts.captions_static)


def _base_shape(config: TrainConfig, request: PlanRequest) -> RunShape:
    """The user's own settings as a shape: the reference every change is measured against."""
    facts = request.dataset
    return RunShape.from_config(config, request.info.family.name, bucket=_bucket(config, config.resolution, facts),
                                mean_area=facts.mean_area, weights_resident=request.weights_resident,
                                weight_bytes=request.weight_bytes,
                                cache_text=config.cache_text_encoder_outputs and _text_cacheable(config, facts))


def _speed_options(config: TrainConfig, request: PlanRequest) -> dict[str, list]:
    auto, device = request.auto, request.device
    effective = config.batch_size * config.accumulation_steps
    batches = divisors(effective) if {"batch_size", "accumulation_steps"} & auto else [config.batch_size]
    half = "bf16" if device.bf16 else "fp16"
    precisions = ([half] if device.kind == "cuda" else ["no"]) if "mixed_precision" in auto else \
        [config.mixed_precision]
    optimizers = [config.optimizer]
    if "optimizer" in auto:
        from ...optim import available

        usable = request.optimizers or tuple(k for k, ok in available().items() if ok)
        optimizers = [o for o in ("adamw", "adamw8bit") if o in usable] or [config.optimizer]
    can_cache_latents = not config.random_crop
    can_cache_text = _text_cacheable(config, request.dataset)
    swaps = [config.blocks_to_swap]
    units = request.info.swap_blocks
    if "blocks_to_swap" in auto and units:
        step = max(1, math.ceil(units / SWAP_STEPS))
        swaps = sorted({0, *range(step, units, step), units})
    return {
        "batch_size": batches,
        "gradient_checkpointing": [False, True] if "gradient_checkpointing" in auto else
        [config.gradient_checkpointing],
        "cache_latents": [can_cache_latents] if "cache_latents" in auto else [config.cache_latents],
        # Caching is never slower and always smaller, so `auto` caches whenever the captions allow it.
        "cache_text": [can_cache_text] if "cache_text_encoder_outputs" in auto else
        [config.cache_text_encoder_outputs and can_cache_text],
        "optimizer": optimizers,
        "mixed_precision": precisions,
        "blocks_to_swap": swaps,
        # A run-time lever without a config key: where caching is possible, the text encoders may cache on the CPU.
        "text_on_cpu": [False, True] if can_cache_text and device.kind == "cuda" else [False],
    }


def _quality_levels(config: TrainConfig, auto: frozenset[str], family_resolution: int) -> list[tuple[int, int]]:
    """(resolution, rank) pairs to try, best first: the user's; then lower resolutions at the user's rank; only when
    even the lowest resolution does not fit, a lower rank, again from the highest resolution down (rank↓ last)."""
    res, rank = config.resolution, config.lora_rank
    resolutions = [res]
    if "resolution" in auto:
        floor = max(256, min(res, family_resolution) // 2)
        resolutions += list(range(res - RESOLUTION_STEP, floor - 1, -RESOLUTION_STEP))
    ranks = [rank]
    if "lora_rank" in auto:
        while ranks[-1] // 2 >= MIN_RANK:
            ranks.append(ranks[-1] // 2)
    return [(r, k) for k in ranks for r in resolutions]


@dataclass(frozen=True)
class _Scored:
    shape: RunShape
    resolution: int
    memory: MemoryEstimate
    time: TimeEstimate
    fits: bool
    score: float


def _evaluate(shape: RunShape, resolution: int, request: PlanRequest, budget: int, user: RunShape) -> _Scored:
    memory = estimate_memory(request.info, shape, request.device)
    if request.memory_scale != 1.0:
        memory = _scaled(memory, request.memory_scale)
    time = estimate_time(request.info, shape, request.device, calibration=request.calibration,
                         basis="probe-calibrated" if request.calibration != 1.0 else None)
    changed = sum(getattr(shape, k) != getattr(user, k) for k in SHAPE_KEYS if k != "offload_encoders")
    return _Scored(shape, resolution, memory, time, memory.peak <= budget,
                   time.seconds_per_step * (1 + CHANGE_PENALTY * changed))


def _scaled(memory: MemoryEstimate, scale: float) -> MemoryEstimate:
    """The estimate with activations scaled by a probe's measured/predicted ratio."""
    extra = int(memory.parts["activations"] * (scale - 1))
    parts = {**memory.parts, "activations": memory.parts["activations"] + extra}
    phases = {**memory.phases, "train": memory.phases["train"] + extra}
    phase = max(phases, key=lambda k: phases[k])
    return MemoryEstimate(parts, phases, phases[phase] + parts["workspace"], phase)


def _shapes(base: RunShape, options: dict[str, list], effective: int) -> list[RunShape]:
    shapes = []
    keys = list(options)
    for values in product(*(options[k] for k in keys)):
        chosen = dict(zip(keys, values, strict=True))
        if chosen["text_on_cpu"] and not chosen["cache_text"]:
            continue
        if chosen["blocks_to_swap"] and not chosen["gradient_checkpointing"]:
            continue  # swapping saves nothing without checkpointing (blockswap.py)
        batch = chosen["batch_size"]
        for chunk in divisors(batch):
            shapes.append(replace(base, **chosen, accumulation_steps=max(1, effective // batch),  # type: ignore[arg-type]
                                  chunk_size=None if chunk == batch else chunk))
    return shapes


def make_plan(config: TrainConfig, request: PlanRequest, *, total_steps: int | None = None) -> Plan:
    """The fastest plan for `config` that fits `request.free_bytes`, or the leanest one with advice if none does."""
    budget = int(request.free_bytes * (1 - request.margin))
    user = _base_shape(config, request)
    options = _speed_options(config, request)
    effective = config.batch_size * config.accumulation_steps
    best: _Scored | None = None
    leanest: _Scored | None = None
    for resolution, rank in _quality_levels(config, request.auto, request.info.family.resolution):
        base = replace(user, lora_rank=rank, bucket=_bucket(config, resolution, request.dataset),
                       sample_resolution=resolution,
                       mean_area=None if request.dataset.mean_area is None else
                       request.dataset.mean_area * (resolution / config.resolution) ** 2)
        scored = [_evaluate(s, resolution, request, budget, user) for s in _shapes(base, options, effective)]
        fitting = [s for s in scored if s.fits]
        if fitting:
            best = min(fitting, key=lambda s: s.score)
            break
        lean = min(scored, key=lambda s: s.memory.peak)
        if leanest is None or lean.memory.peak < leanest.memory.peak:
            leanest = lean
    chosen = best or leanest
    assert chosen is not None
    changes = _changes(config, user, chosen, request, budget)
    advice = "" if best is not None else _advice(chosen, budget, request)
    return Plan(chosen.shape, chosen.resolution, chosen.memory, chosen.time, request.free_bytes, budget,
                chosen.fits, total_steps, tuple(changes), request.device.name, advice)


def _changes(config: TrainConfig, user: RunShape, chosen: _Scored, request: PlanRequest, budget: int) -> list[Change]:
    """A `Change` per differing setting; its reason comes from estimating the plan with that one setting undone."""
    out = []
    pairs = [(k, getattr(user, k), getattr(chosen.shape, k)) for k in SHAPE_KEYS if k != "offload_encoders"]
    pairs = [(k, old, new) for k, old, new in pairs if old != new and not (k == "chunk_size" and new is None)]
    if chosen.resolution != config.resolution:
        pairs.append(("resolution", config.resolution, chosen.resolution))
    for key, old, new in pairs:
        if key == "resolution":
            undone = replace(chosen.shape, bucket=user.bucket, sample_resolution=config.resolution)
        elif key in ("batch_size", "accumulation_steps"):
            undone = replace(chosen.shape, batch_size=user.batch_size, accumulation_steps=user.accumulation_steps,
                             chunk_size=None)
        else:
            undone = replace(chosen.shape, **{key: old})
        reason = _reason(key, old, new, _evaluate(undone, config.resolution, request, budget, user), chosen, budget)
        if key == "blocks_to_swap" and new:
            shape = chosen.shape
            transfer = swap_seconds(request.info, shape, request.device, compute_precision(shape, request.device))
            chunks = shape.accumulation_steps * math.ceil(shape.batch_size / shape.chunk)
            reason += f"; {transfer * chunks:.2f} s of transfers per step, overlapped with the compute"
        out.append(Change(SHAPE_KEYS.get(key, key), old, new, reason))
    return out


def _reason(key: str, old: object, new: object, undone: _Scored, chosen: _Scored, budget: int) -> str:
    what = {
        "batch_size": f"keeps the effective batch {chosen.shape.effective_batch}",
        "accumulation_steps": f"keeps the effective batch {chosen.shape.effective_batch}",
        "chunk_size": "each micro-batch runs in chunks; same maths and data order",
        "gradient_checkpointing": "recomputes activations in backward",
        "cache_latents": "encodes every image once; the VAE leaves the device",
        "cache_text": "encodes every caption once; the text encoders leave the device",
        "optimizer": "8-bit optimizer state",
        "mixed_precision": "half-precision weights and tensor cores",
        "lora_rank": "smaller adapter",
        "blocks_to_swap": f"{new} transformer blocks stream from host memory beside the compute",
        "resolution": "smaller images",
    }.get(key, "")
    peak_old = undone.memory.peak / GIB
    if not undone.fits:
        return f"{what}; with {key}={old} the peak would be {peak_old:.2f} GB > {budget / GIB:.2f} GB usable"
    slower = undone.time.seconds_per_step / max(chosen.time.seconds_per_step, 1e-9)
    if slower > 1.005:
        return f"{what}; {slower:.2f}× faster than with {key}={old}"
    return f"{what}; {peak_old - chosen.memory.peak / GIB:+.2f} GB less at the same speed"


def _advice(lean: _Scored, budget: int, request: PlanRequest) -> str:
    need = lean.memory.peak / GIB
    locked = sorted(set(PLANNABLE) - request.auto)
    hint = f"; allow auto for {', '.join(locked)}" if locked else ""
    return (f"nothing fits: the leanest plan needs {need:.2f} GB but {budget / GIB:.2f} GB are usable "
            f"({request.free_bytes / GIB:.2f} GB free); free {need - budget / GIB:.2f} GB more (close other "
            f"models/apps) or use a smaller resolution or rank{hint}")


def steps_for(config: TrainConfig, samples_per_epoch: int | None, batch_size: int,
              accumulation_steps: int) -> int | None:
    """Optimizer steps of a run (max_train_steps, else epochs × steps per epoch when the dataset size is known)."""
    if config.max_train_steps:
        return config.max_train_steps
    if samples_per_epoch is None:
        return None
    return config.epochs * math.ceil(math.ceil(samples_per_epoch / batch_size) / accumulation_steps)
