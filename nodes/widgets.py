"""LoRATrainConfig's widgets: the engine's widget schema (`trainer/widgets.py`, built from `TrainConfig`'s field
metadata) rendered as ComfyUI `io` inputs, and the CONFIG value made from their values by the engine's one parser.

Fields the ComfyUI host provides itself are listed in `HOST_OWNED` with the reason; every other engine option is a
widget. The CONFIG value is a `NodeConfig`: the config values plus the keys left to "auto", resolved once the MODEL is
known.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..trainer.config import PLANNABLE, TrainConfig, from_mapping
from ..trainer.families import Family
from ..trainer.widgets import SMALL_FLOAT, Schema, Widget, build_schema, follow_model_values, is_auto, parse_values

HOST_OWNED: dict[str, str] = {
    "components_from": "the MODEL/CLIP/VAE inputs are the whole model",
    "base_weight_dtype": "the MODEL's dtype as ComfyUI loaded it (UNETLoader weight_dtype fp8_e4m3fn trains on fp8)",
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
    "blocks_to_swap": "the memory planner chooses it (0 when the model fits); ComfyUI's own partial loading keeps "
                      "the rest of the weights in RAM and streams them per layer",
    "auto": "set a widget to 'auto' to let the memory planner choose it; as in the CLI's default, the planner may "
            "also trade batch_size for accumulation_steps (same effective batch) and split micro-batches into chunks",
}
# As the engine's default `auto`: the planner may trade batch_size for accumulation_steps, keeping their product.
ALWAYS_PLANNED = frozenset({"batch_size", "accumulation_steps", "blocks_to_swap"})
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
    "sample_every_n_steps", "sample_steps", "sample_cfg", "vram_budget_gb", "memory_margin", "dynamic_rank",
    "timestep_sampling", "target_preset",
)
# Widgets added after workflows were shared: declared optional and after every other input, so a saved workflow's
# positional widgets_values still line up (the front-end puts optional inputs last, in declaration order).
LATE_WIDGETS = ("timestep_sampling", "target_preset")
FRONTEND_SEED_NAMES = ("seed", "noise_seed")  # INT inputs the front-end adds a seed control to by name
NO_LORA = "[none]"  # resume_lora's first option: start a new LoRA


def node_schema() -> Schema:
    """The engine's widget schema as this node shows it: host-owned keys left out, in `WIDGET_ORDER`."""
    return build_schema(HOST_OWNED, WIDGET_ORDER)


def widget_inputs(io: Any, lora_names: list[str], late: bool = False) -> list:
    """One io input per widget of `node_schema()`, in its order: the original ones, or (`late`) `LATE_WIDGETS`."""
    return [_input(io, w, lora_names) for w in node_schema().widgets if (w.name in LATE_WIDGETS) == late]


def _input(io: Any, w: Widget, lora_names: list[str]) -> Any:
    if w.kind in ("switch", "choice"):
        return io.Combo.Input(w.name, options=list(w.choices), default=w.default, tooltip=w.help,
                              optional=w.name in LATE_WIDGETS)
    if w.name == "resume_lora":  # the one path shown here: a LoRA that LoraLoader lists too
        return io.Combo.Input(w.name, options=[NO_LORA, *lora_names], default=NO_LORA, optional=True,
                              tooltip=f"{w.help} Pick a LoRA from models/loras.")
    if w.kind == "bool":
        return io.Boolean.Input(w.name, default=w.default, tooltip=w.help)
    if w.kind == "int":
        # The front-end gives an INT named `seed` a "control after generate" widget (default: randomize) unless the
        # spec says otherwise: that would change CONFIG, and so re-train, on every Queue, and add a widgets_values
        # entry. A training seed stays fixed. No `step`: the front-end scales an INT's step (10 = 1).
        extra = {"control_after_generate": False} if w.name in FRONTEND_SEED_NAMES else {}
        return io.Int.Input(w.name, default=w.default, min=w.minimum, max=w.maximum, tooltip=w.help, **extra)
    if w.kind == "float":
        fine = w.step is not None and w.step < SMALL_FLOAT  # no rounding to the step: 1e-4 must stay 1e-4
        return io.Float.Input(w.name, default=w.default, min=w.minimum, max=w.maximum, step=w.step,
                              round=False if fine else None, tooltip=w.help)
    if w.kind in ("list", "lines"):
        return io.String.Input(w.name, default=w.default, multiline=w.kind == "lines", optional=True, tooltip=w.help)
    return io.String.Input(w.name, default=w.default, tooltip=w.help)


@dataclass(frozen=True)
class NodeConfig:
    """The CONFIG value: engine options plus the keys left to 'auto' (the planner's, or the MODEL's)."""

    values: dict[str, Any]
    auto: frozenset[str] = frozenset()

    def resolve(self, family: Family, prediction_type: str, model_dtype: Any) -> TrainConfig:
        """The TrainConfig for a run on a model of `family` whose weights are `model_dtype`."""
        follow = self.auto & NODE_RESOLVED
        values = {**self.values, **follow_model_values(follow, family.resolution, model_dtype)}
        config = from_mapping(values, "LoRATrainConfig")
        planned = (self.auto | ALWAYS_PLANNED) - NODE_RESOLVED
        return replace(config, family=family.name, prediction_type=prediction_type,
                       auto=[k for k in PLANNABLE if k in planned]).validate()


def node_config(widgets: dict[str, Any], imported: dict[str, Any] | None = None) -> NodeConfig:
    """Widget values (and widget values imported from YAML, which win) → NodeConfig, by the engine's parser.

    An imported file's `auto` list (no widget here) hands its keys to the planner, keeping their values as the start.
    """
    imported = dict(imported or {})
    listed = {k.strip() for k in str(imported.pop("auto", "") or "").split(",") if k.strip()}
    values = {**widgets, **imported}
    if values.get("resume_lora") == NO_LORA:
        values["resume_lora"] = ""
    parsed = parse_values(values, node_schema())
    auto = {k for k, v in parsed.mapping.items() if is_auto(v)} | parsed.follow_model | listed
    return NodeConfig({k: v for k, v in parsed.mapping.items() if not is_auto(v)}, frozenset(auto))


def default_node_config() -> NodeConfig:
    """What TrainLoRA uses when no CONFIG is connected: the node defaults."""
    return node_config(node_schema().defaults())

