"""What a run needs on the common card sizes: one plan per VRAM tier, for each way the host may hold the weights.

`loraloop plan` prints it (and `--json` returns it) so that a user sees at once which card a LoRA of this family,
resolution and rank needs, and what the planner changes to get there. The weight forms are the ones hosts offer:
bf16/fp16 weights, and fp8 weights (ComfyUI's fp8_e4m3fn / fp8_scaled models, computed in bf16 on the fly).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...config import PLANNABLE, TrainConfig
from ...units import GIB
from ..estimation.devices import CUDA_CONTEXT_BYTES, DeviceSpec, with_memory
from ..estimation.estimate import ModelInfo
from .autoplan import plan_for_config

TIERS_GB = (6, 8, 12, 16, 24, 48, 80)
WEIGHT_FORMS = {"bf16": 2.0, "fp8": 1.0}  # bytes per frozen denoiser weight


@dataclass(frozen=True)
class TierRow:
    """The plan on a card of `vram_gb` for weights held as `weights`."""

    vram_gb: int
    weights: str
    fits: bool
    peak_gb: float
    seconds_per_step: float
    levers: tuple[str, ...]  # what the plan changed or relies on (gradient checkpointing, 8-bit AdamW …)
    swapped: int = 0  # transformer blocks streamed from host memory


def tier_table(config: TrainConfig, info: ModelInfo, device: DeviceSpec, tiers: tuple[int, ...] = TIERS_GB,
               forms: tuple[str, ...] = ("bf16", "fp8")) -> list[TierRow]:
    """One row per (tier, weight form); resolution and rank stay the config's (every other lever is allowed)."""
    auto = frozenset(set(PLANNABLE) - {"resolution", "lora_rank"})
    rows = []
    for form in forms:
        for gb in tiers:
            spec = with_memory(device, gb)
            plan = plan_for_config(config, device=spec, free=max(0, int(gb * GIB) - CUDA_CONTEXT_BYTES), auto=auto,
                                   weights_resident=False, info=info, weight_bytes=WEIGHT_FORMS[form])
            s = plan.shape
            levers = [name for name, on in (("checkpointing", s.gradient_checkpointing),
                                            (f"{s.optimizer}", s.optimizer != "adamw"),
                                            (f"chunks of {s.chunk}", s.chunk < s.batch_size),
                                            (f"{s.blocks_to_swap} of {info.swap_blocks} blocks swapped",
                                             s.blocks_to_swap > 0),
                                            ("text encoded on the CPU", s.text_on_cpu)) if on]
            rows.append(TierRow(gb, form, plan.fits, round(plan.memory.peak / GIB, 2),
                                round(plan.time.seconds_per_step, 2), tuple(levers), s.blocks_to_swap))
    return rows


def format_tiers(rows: list[TierRow]) -> list[str]:
    lines = ["VRAM tiers (same resolution and rank; weights as the host holds them):",
             f"  {'card':>6}  {'weights':7}  {'peak':>8}  {'s/step':>7}  result"]
    for r in rows:
        result = ("fits" + (f" with {', '.join(r.levers)}" if r.levers else "")) if r.fits else "does not fit"
        lines.append(f"  {r.vram_gb:>4} GB  {r.weights:7}  {r.peak_gb:>5.2f} GB  {r.seconds_per_step:>7.2f}  {result}")
    return lines


def tier_lines_for(config: TrainConfig, bundle: object) -> list[str]:
    """The table for the model a host holds (its family at the config's resolution and rank), on this GPU's speed
    entry or a generic one; empty when the model has no estimate."""
    from ..estimation.devices import GENERIC_GPU, current_device

    try:
        info = ModelInfo.for_bundle(bundle)
    except (KeyError, ValueError, ImportError):
        return []
    here = current_device(getattr(bundle, "device", None))
    return format_tiers(tier_table(config, info, here if here.kind == "cuda" else GENERIC_GPU))
