"""The engine's memory plan for a run inside ComfyUI: what is free once ComfyUI evicts the other models, what the run
will take, and which settings the plan changed.

TrainLoRA applies the plan before anything is encoded (so a run that cannot fit stops with advice, never a CUDA OOM);
the MemoryPlan node shows the same plan without training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..trainer.config import TrainConfig
from ..trainer.errors import ConfigError, OutOfMemory
from ..trainer.memory import GIB, Plan, plan_for_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostMemory:
    """Bytes a training run may use on the MODEL's device, and whether the frozen UNet is already counted as used."""

    free: int
    weights_resident: bool


def host_memory(bundle: object) -> HostMemory:
    """Free memory on the MODEL's device as TrainLoRA will find it after `load_models_gpu(memory_required=1e20)`.

    On an accelerator every loaded model is unloaded first, the trained UNet included, so what they hold counts as
    free and the planner adds the UNet's weights itself. On the CPU nothing is given back by unloading (models stay in
    RAM), so the free RAM is what is left with the UNet resident.
    """
    import comfy.model_management as mm

    device = bundle.device  # type: ignore[attr-defined]
    free = int(mm.get_free_memory(device))
    if device.type == "cpu":
        return HostMemory(free, True)
    held = 0
    for loaded in list(getattr(mm, "current_loaded_models", [])):
        if getattr(loaded, "device", None) == device and hasattr(loaded, "model_loaded_memory"):
            held += int(loaded.model_loaded_memory())
    return HostMemory(free + held, False)


def plan_run(bundle: object, config: TrainConfig, dataset: object) -> Plan | None:
    """The plan for `config` on `bundle`'s device; None when the model has no memory profile (never for SD1/2/XL)."""
    memory = HostMemory(int(config.vram_budget_gb * GIB), False) if config.vram_budget_gb else host_memory(bundle)
    try:
        # The weights stay in the dtype ComfyUI loaded them in (fp8 too): that is what the UNet takes on the device.
        return plan_for_config(config, bundle=bundle, dataset=dataset, free=memory.free, auto=set(config.auto),
                               weights_resident=memory.weights_resident, margin=config.memory_margin,
                               weight_bytes=bundle.dtype.itemsize)  # type: ignore[attr-defined]
    except ConfigError as err:
        log.warning("LoRA Loop: no memory plan (%s); training with the settings as given", err)
        return None


def plan_text(plan: Plan | None) -> str:
    if plan is None:
        return "memory plan: none (no profile for this model); training with the settings as given"
    return "memory plan:\n" + "\n".join(plan.lines())


def require_fit(plan: Plan | None) -> None:
    """Stop before encoding or loading anything when nothing fits, saying what would."""
    if plan is not None and not plan.fits:
        msg = (f"this run does not fit in the {plan.free_bytes / GIB:.2f} GB ComfyUI can free on {plan.device}. "
               f"{plan.advice.rstrip('.')}. The planner may change only the LoRATrainConfig widgets set to 'auto'.")
        raise OutOfMemory(msg)


def describe_plan(model: object, dataset: object, node_config: object) -> str:
    """The plan TrainLoRA would make for this MODEL, DATASET and CONFIG, as text (nothing is loaded or encoded)."""
    from .bundle import ComfyBundle

    bundle = ComfyBundle(model, None, None)
    config = node_config.resolve(bundle.family, bundle.prediction_type, bundle.compute_dtype)  # type: ignore[attr-defined]
    config = dataset.config_for(config)  # type: ignore[attr-defined]
    train_dataset = dataset.build(config)  # type: ignore[attr-defined]
    plan = plan_run(bundle, config, train_dataset)
    head = (f"{bundle.family.name} ({bundle.prediction_type}) on {bundle.device}; {len(train_dataset.records)} images, "
            f"{len(train_dataset)} samples per epoch at {config.resolution}px")
    from ..trainer.memory.planning.tiers import tier_lines_for

    return "\n".join([head, plan_text(plan), *tier_lines_for(config, bundle)])
