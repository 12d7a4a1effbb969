"""LoRATrainConfig's widgets, built from `TrainConfig`'s field metadata (help, default, min/max, choices).

So the node, the CLI `--help` and the A1111 UI cannot drift apart. Fields the ComfyUI host provides itself are listed in
`HOST_OWNED` with the reason; every other engine option becomes a widget. The CONFIG value is a `NodeConfig`: the
widget values plus the "auto" choices that are resolved once the MODEL is known.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..trainer.config import AUTO, HOST_DEFAULTS, SWITCH_CHOICES, SWITCH_VALUES, TrainConfig, field_help, from_mapping
from ..trainer.families import Family
from ..trainer.memory.planner import PLANNABLE

HOST_OWNED: dict[str, str] = {
    "base_model": "the MODEL/CLIP/VAE inputs of TrainLoRA are the base model",
    "family": "detected from the MODEL",
    "prediction_type": "read from the MODEL's model_sampling (ModelSamplingDiscrete nodes apply)",
    "train_data_dir": "the DATASET input (LoadDataset)",
    "metadata_path": "LoadDataset's metadata_file",
    "recursive": "LoadDataset's recursive",
    "caption_extension": "LoadDataset's caption_extension",
    "trigger_word": "LoadDataset / Caption",
    "output_dir": "LoRAs are saved into ComfyUI's models/loras (SaveLoRA)",
    "output_name": "TrainLoRA's name",
    "overwrite": "files are never overwritten: saved names are made unique",
    "logging_dir": "an absolute folder would make the workflow machine-specific",
    "cache_latents_to_disk": "latents are cached in memory inside ComfyUI",
    "auto": "set a widget to 'auto' to let the memory planner choose it; as in the CLI's default, the planner may "
            "also trade batch_size for accumulation_steps (same effective batch) and split micro-batches into chunks",
}
# As the engine's default `auto`: the planner may trade batch_size for accumulation_steps, keeping their product.
ALWAYS_PLANNED = frozenset({"batch_size", "accumulation_steps"})
# Resolved by the node itself from the MODEL ("auto" = the family size / the model dtype), never lowered by the plan.
NODE_RESOLVED = frozenset({"resolution", "mixed_precision"})
# LoRATrainConfig's widget order. A saved workflow stores widget values by position (`widgets_values`), so this order
# never changes: a new engine option is APPENDED here (a test fails until it is listed), wherever it sits in
# TrainConfig.
WIDGET_ORDER = (
    "resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "random_crop", "flip_aug",
    "shuffle_caption", "keep_tokens", "caption_dropout_rate", "caption_tag_dropout_rate", "cache_latents",
    "cache_text_encoder_outputs", "network_type", "lora_rank", "lora_alpha", "lora_dropout", "conv_rank", "conv_alpha",
    "target_modules", "train_text_encoder", "text_encoder_lr", "resume_lora", "batch_size", "accumulation_steps",
    "epochs", "max_train_steps", "learning_rate", "lr_scheduler", "lr_warmup_steps", "lr_num_cycles", "optimizer",
    "weight_decay", "max_grad_norm", "mixed_precision", "gradient_checkpointing", "min_snr_gamma", "noise_offset",
    "seed", "save_precision", "save_every_n_steps", "save_every_n_epochs", "save_last_n", "sample_prompts",
    "sample_every_n_steps", "sample_steps", "sample_cfg", "vram_budget_gb", "memory_margin",
)
NONE_AS_ZERO = "0 = off / use the default"
NODE_DEFAULTS = HOST_DEFAULTS  # node defaults that differ from the engine's (shared with the A1111 tab)
SMALL_FLOAT = 0.01  # floats with smaller defaults get a fine step and no rounding (learning rates)
FRONTEND_SEED_NAMES = ("seed", "noise_seed")  # INT inputs the front-end adds a seed control to by name


def _base_type(field_type: str) -> tuple[str, bool]:
    optional = "None" in field_type
    return field_type.replace(" | None", "").strip(), optional


def _tooltip(meta: dict, extra: str = "") -> str:
    return " ".join(x for x in (meta["help"], extra) if x)


def widget_inputs(io: Any, lora_names: list[str]) -> list:
    """One io input per engine option that is not host-owned, in `WIDGET_ORDER` (then any option not listed yet)."""
    inputs = []
    types = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    helps = field_help()
    names = [*WIDGET_ORDER, *(n for n in helps if n not in WIDGET_ORDER and n not in HOST_OWNED)]
    for name in names:
        meta = helps[name]
        base, optional = _base_type(types[name])
        default = NODE_DEFAULTS.get(name, meta["default"])
        choices = meta.get("choices")
        if base == "bool" and default == AUTO:
            inputs.append(io.Combo.Input(name, options=list(SWITCH_CHOICES), default=AUTO,
                                         tooltip=_tooltip(meta, "auto: the memory planner decides (off when the free "
                                                                "memory allows: faster).")))
        elif name == "resume_lora":
            inputs.append(io.Combo.Input(name, options=["[none]", *lora_names], default="[none]", optional=True,
                                         tooltip=_tooltip(meta, "Pick a LoRA from models/loras.")))
        elif choices is not None:
            options = [AUTO if c is None else c for c in choices]
            if name == "mixed_precision":
                options = [AUTO, *options]
            inputs.append(io.Combo.Input(name, options=options, default=AUTO if default is None else default,
                                         tooltip=_tooltip(meta, "auto: follow the loaded model." if AUTO in options else "")))
        elif base == "bool":
            inputs.append(io.Boolean.Input(name, default=bool(default), tooltip=_tooltip(meta)))
        elif base == "int":
            lo = 0 if (optional or name in NODE_DEFAULTS) else meta["min"]
            hint = "0 = the model family's native resolution." if name == "resolution" else (NONE_AS_ZERO if optional else "")
            # The front-end gives an INT named `seed` a "control after generate" widget (default: randomize) unless
            # the spec says otherwise: that would change CONFIG, and so re-train, on every Queue, and add a
            # widgets_values entry. A training seed stays fixed.
            extra = {"control_after_generate": False} if name in FRONTEND_SEED_NAMES else {}
            inputs.append(io.Int.Input(name, default=int(default or 0), min=int(lo), max=int(meta["max"]),
                                       tooltip=_tooltip(meta, hint), **extra))
        elif base == "float":
            lo = 0.0 if optional else meta["min"]
            fine = default is not None and 0 < abs(default) < SMALL_FLOAT
            inputs.append(io.Float.Input(name, default=float(default or 0.0), min=float(lo), max=float(meta["max"]),
                                         step=1e-6 if fine else 0.01, round=False if fine else None,
                                         tooltip=_tooltip(meta, NONE_AS_ZERO if optional else "")))
        elif base == "list[str]":
            multiline = name == "sample_prompts"
            hint = "One per line." if multiline else "Comma-separated."
            inputs.append(io.String.Input(name, default="", multiline=multiline, optional=True,
                                          tooltip=_tooltip(meta, hint)))
        else:
            inputs.append(io.String.Input(name, default=str(default or ""), tooltip=_tooltip(meta)))
    return inputs


@dataclass(frozen=True)
class NodeConfig:
    """The CONFIG value: engine options plus the choices left to 'auto'."""

    values: dict[str, Any]
    auto: frozenset[str] = frozenset()

    def resolve(self, family: Family, prediction_type: str, model_dtype: torch.dtype) -> TrainConfig:
        """The TrainConfig for a run on a model of `family` whose weights are `model_dtype`."""
        values = dict(self.values)
        if "resolution" in self.auto:
            values["resolution"] = family.resolution
        if "mixed_precision" in self.auto:
            values["mixed_precision"] = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(model_dtype, "no")
        config = from_mapping(values, "LoRATrainConfig")
        planned = (self.auto | ALWAYS_PLANNED) - NODE_RESOLVED
        return replace(config, family=family.name, prediction_type=prediction_type,
                       auto=[k for k in PLANNABLE if k in planned]).validate()


def node_config(widgets: dict[str, Any], base: dict[str, Any] | None = None) -> NodeConfig:
    """Widget values (+ values imported from YAML, which win) → NodeConfig; 0/''/'auto'/'[none]' mean unset."""
    types = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {}
    auto: set[str] = set()
    for name, value in widgets.items():
        if name not in types or name in HOST_OWNED:
            continue
        base_type, optional = _base_type(types[name])
        if value == AUTO or (name == "resolution" and value == 0):
            auto.add(name)
            continue
        if name == "resume_lora":
            value = None if value in (None, "", "[none]") else value
        elif base_type == "bool" and value in SWITCH_VALUES:
            value = SWITCH_VALUES[value]
        elif base_type == "list[str]":
            sep = "\n" if name == "sample_prompts" else ","
            value = [v.strip() for v in (value or "").split(sep) if v.strip()]
        elif optional and value in (0, 0.0, ""):
            value = None
        values[name] = value
    for name, value in (base or {}).items():
        if value == AUTO:  # an imported `key: auto` hands the key to the planner / the node, as a widget set to auto
            values.pop(name, None)
            auto.add(name)
            continue
        values[name] = value
        auto.discard(name)
    return NodeConfig(values, frozenset(auto))


def default_node_config() -> NodeConfig:
    """What TrainLoRA uses when no CONFIG is connected: the node defaults."""
    widgets = {name: NODE_DEFAULTS.get(name, meta["default"]) for name, meta in field_help().items()}
    widgets = {k: (AUTO if v is None and field_help()[k].get("choices") else v) for k, v in widgets.items()}
    for name in ("sample_prompts", "target_modules"):
        widgets[name] = ""
    return node_config(widgets)
