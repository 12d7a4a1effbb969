"""The tab's settings: the engine's widget schema (`trainer/widgets.py`, built from `TrainConfig`'s field metadata)
as the tab shows it, and the conversions widget values ⇄ config ⇄ YAML by the engine's one parser.

Every engine option is a field (same keys, help text, ranges and conventions as the CLI and the ComfyUI
LoRATrainConfig node), except the ones the webui decides (`HOST_OWNED`); the tab adds its extras (`EXTRA_FIELDS`).
Conventions (see trainer/widgets.py): "auto" follows the loaded model (mixed_precision: its dtype; resolution 0: the
family's native size), 0 / "" mean "not set" for optional values, and a yes/no setting the planner may choose whose
default is "auto" (gradient_checkpointing) is a dropdown auto / on / off that edits the config's `auto` list.
The functions here take and return plain values, so the HTTP API, the tests and the Gradio tab share them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from ..trainer import widgets as schema
from ..trainer.config import TrainConfig, from_mapping, load_config
from ..trainer.errors import ConfigError
from ..trainer.families import Family

HOST_OWNED: dict[str, str] = {
    "components_from": "the checkpoint loaded in the webui is the whole model",
    "base_weight_dtype": "the checkpoint's dtype as the webui loaded it",
    "base_model": "the checkpoint loaded in the webui is trained",
    "family": "detected from the loaded model",
    "prediction_type": "read from the loaded model (parameterization)",
    "blocks_to_swap": "the memory planner chooses it; the webui's models are placed by the webui (Forge: its model "
                      "management)",
}
# Options of the A1111 tab that are not training settings: what is written beside the LoRA.
EXTRA_FIELDS: dict[str, dict[str, Any]] = {
    "preferred_weight": {"default": 0.8, "help": "Weight the Lora card inserts (<lora:name:weight>); written to "
                         "<name>.json as 'preferred weight'.", "min": 0.0, "max": 2.0, "group": "output"},
    "make_preview": {"default": True, "help": "After training, sample the first sample prompt (else the first "
                     "caption) with the LoRA and save it as <name>.preview.png, the Lora card's picture.",
                     "group": "output"},
}
# How the tab shows a schema kind: a switch is a dropdown (auto / on / off), a path a textbox.
TAB_KINDS = {"switch": "choice", "path": "text"}
HINTS = {"resume_lora": "A file path, or the name of a LoRA in the webui's Lora folder."}
GROUPS = {"data": "Data options", "network": "Network", "training": "Training", "memory": "Memory planning",
          "output": "Output"}
DATASET_FIELDS = ("train_data_dir", "metadata_path", "caption_extension", "recursive", "trigger_word")


@dataclass(frozen=True)
class Field:
    """One setting of the tab: a schema widget as the tab renders it.

    Args:
        name: the config key (the widget's label, so YAML, CLI and tab use one name).
        kind: bool, int, float, choice, text, lines (one value per line) or list (comma-separated).
        default: the widget's initial value.
        tooltip: the engine's help text plus the widget convention.
        choices: for `choice`.
        minimum, maximum: numeric range of the widget (0 allowed where 0 means "not set").
        group: data, network, training, memory or output.
        optional: the config value may be None (0 / "" in the widget).
        switch: an auto / on / off setting (a schema `switch`).
    """

    name: str
    kind: str
    default: Any
    tooltip: str
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    group: str = "training"
    optional: bool = False
    switch: bool = False


def tab_schema() -> schema.Schema:
    """The engine's widget schema without the webui's keys, in TrainConfig order."""
    return schema.build_schema(HOST_OWNED)


def _field(w: schema.Widget, default: Any) -> Field:
    tooltip = " ".join(x for x in (w.help, HINTS.get(w.name, "")) if x)
    return Field(w.name, TAB_KINDS.get(w.kind, w.kind), default, tooltip, w.choices or None, w.minimum, w.maximum,
                 w.group, w.optional, w.kind == "switch")


def form_fields(work_dir: Path | None = None) -> list[Field]:
    """The tab's fields: the schema's widgets in TrainConfig order, then the A1111 extras."""
    out = []
    for w in tab_schema().widgets:
        default = str(work_dir) if w.name == "output_dir" and work_dir is not None else w.default
        out.append(_field(w, default))
    for name, meta in EXTRA_FIELDS.items():
        kind = "bool" if isinstance(meta["default"], bool) else "float"
        out.append(Field(name, kind, meta["default"], meta["help"], None, meta.get("min"), meta.get("max"),
                         meta["group"]))
    return out


def auto_bool_fields() -> tuple[str, ...]:
    """The plannable yes/no settings shown as auto / on / off (those whose host default is "auto")."""
    return tuple(w.name for w in tab_schema().widgets if w.kind == "switch")


def groups(fields: list[Field]) -> dict[str, str]:
    """group → accordion title for the groups `fields` use, known ones first (a group added to TrainConfig later
    still gets its accordion)."""
    used = list(dict.fromkeys(f.group for f in fields))
    order = [g for g in GROUPS if g in used] + [g for g in used if g not in GROUPS]
    return {g: GROUPS.get(g, g.replace("_", " ").capitalize()) for g in order}


def tooltips(work_dir: Path | None = None) -> dict[str, str]:
    """label → tooltip for every field (the tab's JavaScript adds them to the webui's hover hints)."""
    return {f.name: f.tooltip for f in form_fields(work_dir)}


def default_values(work_dir: Path | None = None) -> dict[str, Any]:
    return {f.name: f.default for f in form_fields(work_dir)}


# -- widget values → config --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TabSettings:
    """Widget (or API) values split into the engine mapping, the keys that follow the model and the A1111 extras."""

    mapping: dict[str, Any]
    auto: frozenset[str]
    preferred_weight: float
    make_preview: bool


def parse_values(values: dict[str, Any]) -> TabSettings:
    """Widget/API values → TabSettings, by the engine's parser (`trainer.widgets.parse_values`). Unknown keys raise
    with the nearest valid key when resolved (from `from_mapping`); a bad auto / on / off value raises here."""
    parsed = schema.parse_values({k: v for k, v in values.items() if k not in EXTRA_FIELDS}, tab_schema())
    weight = values.get("preferred_weight", EXTRA_FIELDS["preferred_weight"]["default"])
    preview = values.get("make_preview", EXTRA_FIELDS["make_preview"]["default"])
    return TabSettings(parsed.mapping, parsed.follow_model, float(weight or 0.0), bool(preview))


def resolve(settings: TabSettings, family: Family, prediction_type: str, model_dtype: torch.dtype,
            base_model: str | None = None) -> TrainConfig:
    """The TrainConfig of a run on the loaded model. Raises ConfigError naming the field at fault."""
    config = from_mapping(dict(settings.mapping), "the LoRA Loop tab")
    changes: dict[str, Any] = {"family": family.name, "prediction_type": prediction_type,
                               **schema.follow_model_values(settings.auto, family.resolution, model_dtype)}
    if base_model:
        changes["base_model"] = base_model
    config = replace(config, **changes)
    if config.mixed_precision == "no" and model_dtype != torch.float32:
        loaded = str(model_dtype).replace("torch.", "")
        raise ConfigError(f"mixed_precision 'no' (float32 compute) needs float32 weights, but the webui loaded the "
                          f"model in {loaded}; choose auto, fp16 or bf16 (or start the webui with --no-half)",
                          key="mixed_precision", value="no", allowed=("auto", "fp16", "bf16"))
    return config.validate()


def unresolved_config(settings: TabSettings, native_resolution: int = 512) -> TrainConfig:
    """The config as entered, without a model: 'auto' precision stays the engine default, resolution the native one."""
    config = from_mapping(dict(settings.mapping), "the LoRA Loop tab")
    if "resolution" in settings.auto:
        config = replace(config, resolution=native_resolution)
    return config.validate()


def dataset_config(values: dict[str, Any], native_resolution: int = 512) -> TrainConfig:
    """A config holding only the dataset fields of `values` (for checking and caption tools; no model needed)."""
    settings = parse_values(values)
    data_keys = {w.name for w in tab_schema().widgets if w.group == "data"}
    config = from_mapping({k: v for k, v in settings.mapping.items() if k in data_keys}, "the dataset fields")
    if "resolution" in settings.auto:
        config = replace(config, resolution=native_resolution)
    return config


# -- YAML import / export ----------------------------------------------------------------------------------------------
def config_to_values(config: TrainConfig) -> dict[str, Any]:
    """A config → widget values of every field (None → 0 / "" / auto; lists → text; switches from `auto`)."""
    return schema.widget_values(config, tab_schema())


def values_from_yaml(text: str, source: str = "pasted YAML") -> tuple[dict[str, Any], list[str]]:
    """Widget values for what a YAML config sets (read by the engine: our keys or kohya's, `key: auto`), the tab's
    extras it holds, and notes about what was not applied."""
    data = schema.read_yaml(text, source)
    extras = {k: data.pop(k) for k in list(data) if k in EXTRA_FIELDS}
    values, notes = schema.values_from_mapping(data, tab_schema(), source)
    return {**values, **extras}, notes


def values_from_file(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """Widget values from a config file: .yaml/.yml (ours) or .toml (kohya / lora-scripts), paths made absolute."""
    path = Path(path)
    if path.suffix.lower() == ".toml":
        return config_to_values(load_config(path)), ["base_model/family ignored: the loaded checkpoint is trained"]
    values, notes = values_from_yaml(path.read_text(encoding="utf-8"), str(path))
    for key in ("train_data_dir", "metadata_path", "resume_lora"):
        value = values.get(key)
        if value and not Path(value).is_absolute() and (path.parent / value).exists():
            values[key] = str(path.parent / value)
    return values, notes


def export_yaml(config: TrainConfig) -> str:
    """The config as YAML for `loraloop train --config` (base_model is the webui checkpoint's file). The tab's extras
    (preferred_weight, make_preview) are not engine keys, so the CLI would refuse them: they are left out."""
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, allow_unicode=True)


def export_unresolved(settings: TabSettings) -> str:
    """YAML of the values as entered when no model is loaded ('auto' choices left out: the CLI decides)."""
    data = {k: v for k, v in settings.mapping.items() if v is not None}
    from_mapping(data, "the LoRA Loop tab").validate()
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
