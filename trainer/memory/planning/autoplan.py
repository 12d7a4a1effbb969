"""One call from a config (and, when there is one, the loaded bundle and dataset) to a `Plan`, plus the probe that
calibrates it with two real steps.

This is what a runner or host calls before training:

    plan = plan_for_config(config, bundle=bundle, dataset=dataset)            # estimate only, instant
    plan = calibrate(plan, config, bundle, batches)                            # optional: 2 real steps, re-plan
    config = plan.apply(config); batches.chunk_size = plan.chunk_size
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from ...config import PLANNABLE, TrainConfig
from ...units import GIB
from ..estimation.devices import DeviceSpec, current_device
from ..estimation.devices import free_bytes as device_free_bytes
from ..estimation.estimate import ModelInfo, estimate_memory, estimate_time
from ..estimation.probe import Measurement, measure
from .planner import DEFAULT_MARGIN, DatasetFacts, Plan, PlanRequest, make_plan, steps_for

log = logging.getLogger(__name__)

PROBE_STEPS = 2


def model_info(config: TrainConfig, bundle: object | None = None) -> ModelInfo:
    """Sizes and profile for the run: the bundle's own architecture, else the family named by the config/model."""
    if bundle is not None:
        return ModelInfo.for_bundle(bundle, config.family)
    family = config.family or family_of(config.base_model)
    if config.base_model.startswith("builtin:"):
        from ...bundles.tiny import build_tiny_bundle

        return ModelInfo.for_bundle(build_tiny_bundle(config.base_model.removeprefix("builtin:")), family)
    return ModelInfo.for_family(family)


def family_of(base_model: str) -> str:
    """The family of a base model from its header only (no weights are read)."""
    from pathlib import Path

    from ...errors import ConfigError

    if base_model.startswith("builtin:"):
        return "sdxl" if "sdxl" in base_model else "sd1"
    path = Path(base_model).expanduser()
    if path.is_file():
        from ...bundles.checkpoint import SingleFile, detect_family

        return detect_family(SingleFile(path).shapes, source=str(path))
    unet_config = path / "unet" / "config.json"
    if unet_config.is_file():
        import json

        width = json.loads(unet_config.read_text(encoding="utf-8")).get("cross_attention_dim")
        return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(width, "sd1")
    msg = f"cannot tell the model family of {base_model!r} without loading it; set `family` (sd1, sd2, sd2-v, sdxl)"
    raise ConfigError(msg, key="family", value=None)


def plan_for_config(config: TrainConfig, *, bundle: object | None = None, dataset: object | None = None,
                    device: DeviceSpec | None = None, free: int | None = None,
                    auto: frozenset[str] | set[str] = frozenset(PLANNABLE), weights_resident: bool | None = None,
                    info: ModelInfo | None = None, calibration: float = 1.0, memory_scale: float = 1.0,
                    margin: float = DEFAULT_MARGIN, weight_bytes: float | None = None) -> Plan:
    """The plan for `config` on this machine (or on `device` with `free` bytes).

    Args:
        bundle: the loaded model (its architecture, device and whether its weights already sit on the device).
        dataset: the `TrainDataset` (largest bucket, sample count, caption staticness); None: square buckets.
        device, free: plan for another device / budget (default: the current one, its free memory).
        auto: config keys the plan may change.
        weights_resident: the frozen model already occupies device memory (default: a bundle on a CUDA device).
        weight_bytes: bytes per frozen denoiser weight when a host holds them in its own dtype (fp8: 1).
    """
    info = info or model_info(config, bundle)
    torch_device = getattr(bundle, "device", None)
    device = device or current_device(torch_device)
    if free is None:
        free = device_free_bytes(torch_device)
    if weights_resident is None:
        weights_resident = torch_device is not None and torch_device.type == device.kind == "cuda"
    facts = DatasetFacts.from_dataset(dataset) if dataset is not None else DatasetFacts()
    request = PlanRequest(info, device, free, frozenset(auto), facts, margin=margin, weights_resident=weights_resident,
                          calibration=calibration, memory_scale=memory_scale, weight_bytes=weight_bytes)
    plan = make_plan(config, request)
    steps = steps_for(config, facts.samples_per_epoch, plan.shape.batch_size, plan.shape.accumulation_steps)
    return replace(plan, total_steps=steps)


@dataclass(frozen=True)
class ProbeResult:
    """A probe's measurement and how it compares with the estimate of the same settings."""

    measured: Measurement
    predicted_bytes: int
    predicted_seconds: float
    memory_scale: float
    time_scale: float


def probe(config: TrainConfig, plan: Plan, bundle: object, batches: object, info: ModelInfo | None = None
          ) -> ProbeResult:
    """Run `PROBE_STEPS` real steps with the plan's settings at one chunk per micro-batch and compare.

    The measured peak (above what was allocated before) is compared with the estimate's non-resident part (adapter,
    optimizer state, activations); the last step's time with the predicted step time at the same settings.
    """
    from ...loop import train

    info = info or model_info(config, bundle)
    probe_config = replace(plan.apply(config), max_train_steps=PROBE_STEPS, accumulation_steps=1,
                           sample_every_n_steps=None, save_every_n_steps=None, save_every_n_epochs=None)
    old_chunk = batches.chunk_size  # type: ignore[attr-defined]
    batches.chunk_size = plan.chunk_size  # type: ignore[attr-defined]
    times: list[float] = []
    import time as _time

    last = [_time.perf_counter()]

    def tick(step: int, network: object) -> None:
        now = _time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    try:
        device = getattr(bundle, "device", torch.device("cpu"))
        _, measured = measure(lambda: train(bundle, batches, probe_config, on_step_end=tick), device)  # type: ignore[arg-type]
    finally:
        batches.chunk_size = old_chunk  # type: ignore[attr-defined]
    shape = replace(plan.shape, accumulation_steps=1, weights_resident=True, sample_prompts=0)
    dev = current_device(getattr(bundle, "device", None))
    memory = estimate_memory(info, shape, dev)
    predicted = memory.phases["train"] + memory.parts["workspace"]
    seconds = estimate_time(info, shape, dev).seconds_per_step
    activations = max(1, memory.parts["activations"])
    # The ratio is applied to activations only: adapter and optimizer bytes are exact counts.
    memory_scale = max(0.1, (measured.peak_bytes - (predicted - activations)) / activations)
    time_scale = (times[-1] / seconds) if times else 1.0
    log.info("probe: measured %.3f GB vs %.3f GB predicted (×%.3f); %.3f s/step vs %.3f (×%.2f)",
             measured.peak_bytes / GIB, predicted / GIB, memory_scale, times[-1] if times else 0, seconds,
             time_scale)
    return ProbeResult(measured, predicted, seconds, memory_scale, time_scale)


def calibrate(plan: Plan, config: TrainConfig, bundle: object, batches: object, dataset: object | None = None,
              **kwargs: object) -> Plan:
    """Probe the plan, then plan again with the measured memory and speed ratios."""
    result = probe(config, plan, bundle, batches)
    return plan_for_config(config, bundle=bundle, dataset=dataset, calibration=result.time_scale,
                           memory_scale=max(1.0, result.memory_scale), **kwargs)  # type: ignore[arg-type]


def fit_advice(config: TrainConfig, *, bundle: object | None = None, dataset: object | None = None,
               free: int | None = None) -> str:
    """One line saying what would fit now (every plannable key auto), for `OomRecovery(advise=…)`."""
    plan = plan_for_config(config, bundle=bundle, dataset=dataset, free=free)
    s = plan.shape
    settings = (f"resolution {plan.resolution}, rank {s.lora_rank}, batch {s.batch_size} × accumulation "
                f"{s.accumulation_steps}{f' in chunks of {plan.chunk_size}' if plan.chunk_size else ''}, "
                f"gradient_checkpointing {s.gradient_checkpointing}, mixed_precision {s.mixed_precision}")
    if plan.fits:
        return f"{settings} (estimated {plan.memory.peak / GIB:.2f} GB of {plan.free_bytes / GIB:.2f} GB free)"
    return plan.advice
