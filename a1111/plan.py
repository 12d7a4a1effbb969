"""The tab's "Plan" section: what a run with the current settings will do, and the engine's memory plan for it.

The run plan (steps, caching, offloading) comes from the dataset and the settings. The memory plan is the engine's
(`loraloop.trainer.memory.plan_for_config`) for the loaded model on the webui's device: estimated peak,
seconds per step, and the settings listed in `auto` that it would change so the run fits the free memory (or
`vram_budget_gb`). Training applies the same plan (`job.plan_run`).
"""

from __future__ import annotations

import logging

from ..trainer.batches import caches_text, dataset_options
from ..trainer.config import TrainConfig
from ..trainer.data import TrainDataset
from ..trainer.errors import LoraLoopError
from ..trainer.loop import make_schedule

log = logging.getLogger(__name__)

NO_MODEL = "Memory plan: load a Stable Diffusion checkpoint to see it (the plan is made for the loaded model)."


def run_plan_lines(config: TrainConfig, *, text_encoder_trainable: bool, lowvram: bool, xattention: bool = False,
                   dataset: TrainDataset | None = None) -> list[str]:
    """Steps, batches and what is cached/offloaded, from the dataset and the settings."""
    dataset = dataset or TrainDataset.from_options(dataset_options(config), seed=config.seed)
    batches = len(dataset.epoch_batches(0, config.batch_size))
    schedule = make_schedule(config, batches)
    epochs = -(-schedule.total_steps // schedule.steps_per_epoch)
    cache_text = caches_text(config, dataset)
    parts = ["UNet", "text encoder"] if config.train_text_encoder and text_encoder_trainable else ["UNet"]
    lines = [
        f"{len(dataset.records)} images, {len(dataset)} samples per epoch, {batches} batches of up to "
        f"{config.batch_size} → {schedule.steps_per_epoch} optimizer steps per epoch (accumulation "
        f"{config.accumulation_steps}).",
        f"{schedule.total_steps} steps ≈ {epochs} epoch(s) at {config.resolution}px; adapters on the "
        f"{' and '.join(parts)} ({config.network_type}, rank {config.lora_rank}, alpha {config.alpha:g}).",
        f"Compute: mixed_precision {config.mixed_precision}, gradient checkpointing "
        f"{_planned(config, 'gradient_checkpointing')}, the webui's cross-attention optimisation "
        + ("kept" if xattention else "off while training (Settings → Training: \"Use cross attention optimizations "
                                     "while training\")") + ".",
    ]
    moved = []
    if config.cache_latents:
        moved.append("VAE")
    if cache_text:
        moved.append("text encoder")
    if lowvram:
        lines.append("--medvram: the webui moves model parts between CPU and GPU itself.")
    elif moved:
        lines.append(f"Latents/captions are encoded once; then the {' and '.join(moved)} leave(s) the GPU.")
    return lines


def _planned(config: TrainConfig, key: str) -> str:
    """on / off, or that the memory plan chooses it (the key is in `auto`)."""
    value = "on" if getattr(config, key) else "off"
    return f"auto (the memory plan decides; {value} without a plan)" if key in config.auto else value


def memory_plan_text(config: TrainConfig, bundle: object | None, dataset: TrainDataset | None) -> str:
    """The engine's memory plan as text, or why there is none."""
    if bundle is None:
        return NO_MODEL
    try:
        from ..trainer.memory import GIB, plan_for_config

        free = int(config.vram_budget_gb * GIB) if config.vram_budget_gb else None
        plan = plan_for_config(config, bundle=bundle, dataset=dataset, free=free, auto=set(config.auto),
                               margin=config.memory_margin)
    except (LoraLoopError, ImportError, ValueError) as err:
        return f"Memory plan unavailable: {err}"
    from ..trainer.memory.planning.tiers import tier_lines_for

    return "Memory plan:\n" + "\n".join([*plan.lines(), *tier_lines_for(config, bundle)])
