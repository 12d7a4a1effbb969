"""`loraloop plan`: what will fit and how long it takes, before training.

    loraloop plan --config my.yaml [--vram-gb 8] [--json]
    loraloop plan --family sdxl --resolution 1024 [--vram-gb 8] [--device "RTX 3060"] [--json]

With a config, keys whose value is `auto` may change (all plannable keys with `--auto-all`); with `--family`, every
plannable key except the resolution is auto. The lead's `cli/__init__.py` registers it with `add_plan_parser(sub)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from ..trainer.config import field_default

log = logging.getLogger(__name__)


def add_plan_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `loraloop plan` on the CLI's sub-parsers."""
    p = subparsers.add_parser("plan", help="show what fits in memory and how long training takes, before training")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="YAML config; keys set to `auto` may be changed by the plan")
    src.add_argument("--family", help="plan without a config: sd1, sd2, sd2-v, sdxl, flux1, flux1-schnell, "
                     "chroma, sd3, zimage, lumina2 or qwen-image")
    p.add_argument("--resolution", type=int, help="training resolution (with --family; default: the family's)")
    p.add_argument("--batch-size", type=int, default=1, help="effective batch to keep (with --family)")
    p.add_argument("--rank", type=int, default=field_default("lora_rank"), help="LoRA rank (with --family)")
    p.add_argument("--steps", type=int, help="optimizer steps, for the total time (with --family)")
    p.add_argument("--vram-gb", type=float, help="plan for a GPU with this much memory instead of the one here")
    p.add_argument("--device", help='speed table entry, e.g. "RTX 3060" (default: this GPU, or a generic one)')
    p.add_argument("--margin", type=float, default=None, help="share of free memory kept spare (default 0.10)")
    p.add_argument("--auto-all", action="store_true", help="with --config: let the plan change every plannable key")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--no-tiers", action="store_true", help="leave out the table of plans per card size")
    p.set_defaults(func=cmd_plan)
    return p


def _config_and_auto(args: argparse.Namespace):  # noqa: ANN202
    from ..trainer.config import PLANNABLE, TrainConfig, load_config
    from ..trainer.families import get_family

    if args.config:
        config = load_config(Path(args.config))  # `key: auto` lands in config.auto
        return config, frozenset(PLANNABLE if args.auto_all else config.auto), args.config
    family = get_family(args.family)
    resolution = args.resolution or family.resolution
    config = TrainConfig(family=family.name, resolution=resolution, batch_size=args.batch_size,
                         lora_rank=args.rank, max_train_steps=args.steps, cache_latents=True).validate()
    return config, frozenset(set(PLANNABLE) - {"resolution", "lora_rank"}), None


def _device(args: argparse.Namespace):  # noqa: ANN202
    import torch

    from ..trainer.memory import (
        CUDA_CONTEXT_BYTES,
        GENERIC_GPU,
        GIB,
        current_device,
        find_device,
        free_bytes,
        with_memory,
    )

    if args.vram_gb is not None:
        spec = find_device(args.device) if args.device else GENERIC_GPU
        # A card of N GB: the CUDA context takes its share before torch sees any of it.
        return with_memory(spec, args.vram_gb), max(0, int(args.vram_gb * GIB) - CUDA_CONTEXT_BYTES), False
    if args.device:
        spec = find_device(args.device)
        return spec, max(0, int(spec.memory_gb * GIB) - CUDA_CONTEXT_BYTES), False
    here = current_device()
    if here.kind == "cpu":
        log.warning("no CUDA GPU here: planning for the CPU; pass --vram-gb N to plan for a GPU")
    return here, free_bytes("cuda" if torch.cuda.is_available() else "cpu"), False


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the plan (text or JSON); exit 1 when nothing fits."""
    from ..trainer.memory import DEFAULT_MARGIN, ModelInfo, model_info, plan_for_config
    from ..trainer.memory.planning.tiers import format_tiers, tier_table

    config, auto, source = _config_and_auto(args)
    device, free, resident = _device(args)
    dataset = _dataset(config)
    info = model_info(config) if args.config else ModelInfo.for_family(config.family)
    plan = plan_for_config(config, dataset=dataset, device=device, free=free, auto=auto, weights_resident=resident,
                           info=info, margin=DEFAULT_MARGIN if args.margin is None else args.margin)
    recommendations = _recommendations(config, dataset, plan, info.family.name)
    tiers = [] if args.no_tiers else tier_table(config, info, device)
    if args.json:
        out = plan.to_dict()
        out["config"] = source
        out["family"] = info.family.name
        out["recommendations"] = [{"key": r.key, "value": r.value, "reason": r.reason} for r in recommendations]
        out["tiers"] = [dataclasses.asdict(row) for row in tiers]
        print(json.dumps(out, indent=2, default=str))
    else:
        print(f"plan for {source or info.family.name} ({info.family.name}, auto: {', '.join(sorted(auto)) or 'none'})")
        for line in plan.lines():
            print(line)
        for rec in recommendations:
            print(f"recommend:         {rec}")
        if tiers:
            print("\n".join(format_tiers(tiers)))
    return 0 if plan.fits else 1


def _dataset(config):  # noqa: ANN001, ANN202
    if not config.train_data_dir:
        return None
    from ..trainer.batches import dataset_options
    from ..trainer.data import TrainDataset
    from ..trainer.errors import DatasetError

    try:
        return TrainDataset.from_options(dataset_options(config), seed=config.seed)
    except DatasetError as err:
        print(f"warning: dataset not used for the plan: {err}", file=sys.stderr)
        return None


def _recommendations(config, dataset, plan, family: str):  # noqa: ANN001, ANN202
    if dataset is None:
        return []
    from ..trainer.data.recommend import DatasetStats, recommend

    return recommend(DatasetStats.from_records(dataset.records), family,
                     effective_batch=plan.shape.effective_batch, optimizer=plan.shape.optimizer,
                     lora_alpha=config.lora_alpha)
