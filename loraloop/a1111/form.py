"""The tab's settings, built from `TrainConfig`'s field metadata, and the conversions widget values ⇄ config ⇄ YAML.

Every engine option is a field (same keys, help text and ranges as the CLI and the ComfyUI LoRATrainConfig node), except
the ones the webui decides (`HOST_OWNED`). Widget conventions, shared with the ComfyUI node: "auto" follows the loaded
model (mixed_precision: its dtype; resolution 0: the family's native size) and 0 / "" mean "not set" for optional
values. A yes/no setting the memory planner may choose and whose default is "auto" (gradient_checkpointing) is a
dropdown auto / on / off: "auto" puts its key into the config's `auto` list, on / off set it and take the key out.
The functions here take and return plain values, so the HTTP API, the tests and the Gradio tab share them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from ..trainer.config import (
    AUTO,
    HOST_DEFAULTS,
    SWITCH_CHOICES,
    SWITCH_VALUES,
    TrainConfig,
    field_help,
    from_mapping,
    load_config,
)
from ..trainer.errors import ConfigError
from ..trainer.families import Family

HOST_OWNED: dict[str, str] = {
    "base_model": "the checkpoint loaded in the webui is trained",
    "family": "detected from the loaded model",
    "prediction_type": "read from the loaded model (parameterization)",
}
NOT_SET = "0 / empty = not set (default)."
TAB_DEFAULTS = HOST_DEFAULTS  # tab defaults that differ from the engine's (shared with the ComfyUI node)
# Options of the A1111 tab that are not training settings: what is written beside the LoRA.
EXTRA_FIELDS: dict[str, dict[str, Any]] = {
    "preferred_weight": {"default": 0.8, "help": "Weight the Lora card inserts (<lora:name:weight>); written to "
                         "<name>.json as 'preferred weight'.", "min": 0.0, "max": 2.0, "group": "output"},
    "make_preview": {"default": True, "help": "After training, sample the first sample prompt (else the first "
                     "caption) with the LoRA and save it as <name>.preview.png, the Lora card's picture.",
                     "group": "output"},
}
# A plannable bool whose default is "auto": the dropdown's values and what on / off mean.
AUTO_BOOL_CHOICES = SWITCH_CHOICES
_ON_OFF = {**SWITCH_VALUES, "true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}  # API too
AUTO_BOOL_HINT = ("auto: the memory planner decides (the key joins `auto`); on / off: your choice (the key leaves "
                  "`auto`).")
GROUPS = {"data": "Data options", "network": "Network", "training": "Training", "memory": "Memory planning",
          "output": "Output"}
DATASET_FIELDS = ("train_data_dir", "metadata_path", "caption_extension", "recursive", "trigger_word")


@dataclass(frozen=True)
class Field:
    """One setting of the tab.

    Args:
        name: the config key (the widget's label, so YAML, CLI and tab use one name).
        kind: bool, int, float, choice, text, lines (one value per line) or list (comma-separated).
        default: the widget's initial value.
        tooltip: the engine's help text plus the widget convention.
        choices: for `choice`.
        minimum, maximum: numeric range of the widget (0 allowed where 0 means "not set").
        group: data, network, training or output.
        optional: the config value may be None (0 / "" in the widget).
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


def _types() -> dict[str, str]:
    return {f.name: str(f.type) for f in fields(TrainConfig)}


def _base(type_name: str) -> tuple[str, bool]:
    return type_name.replace(" | None", "").strip(), "None" in type_name


def form_fields(work_dir: Path | None = None) -> list[Field]:
    """The tab's fields in TrainConfig order, then the A1111 extras."""
    types = _types()
    out = []
    for name, meta in field_help().items():
        if name in HOST_OWNED:
            continue
        base, optional = _base(types[name])
        default = TAB_DEFAULTS.get(name, meta["default"])
        if name == "output_dir" and work_dir is not None:
            default = str(work_dir)
        choices = meta.get("choices")
        hint = ""
        if choices is not None:
            options = tuple(AUTO if c is None else c for c in choices)
            if name == "mixed_precision":
                options = (AUTO, *options)
                hint = "auto: follow the loaded model's dtype."
            out.append(Field(name, "choice", AUTO if default is None else default, _tip(meta, hint), options,
                             group=meta["group"], optional=optional))
        elif base == "bool" and _is_auto(default) and name in plannable():
            out.append(Field(name, "choice", AUTO, _tip(meta, AUTO_BOOL_HINT), AUTO_BOOL_CHOICES, group=meta["group"]))
        elif base == "bool":
            out.append(Field(name, "bool", bool(default), _tip(meta), group=meta["group"]))
        elif base in ("int", "float"):
            lo = 0 if (optional or name in TAB_DEFAULTS) else meta["min"]
            if name == "resolution":
                hint = "0 = the model family's native resolution."
            elif name == "max_train_steps":
                hint = "0 = train `epochs` instead."
            elif optional:
                hint = NOT_SET
            value = 0 if default is None else default
            out.append(Field(name, base, int(value) if base == "int" else float(value), _tip(meta, hint), None, lo,
                             meta["max"], meta["group"], optional))
        elif base == "list[str]":
            kind = "lines" if name == "sample_prompts" else "list"
            hint = "One per line." if kind == "lines" else "Comma-separated; empty = default."
            if name == "auto":
                hint = "Comma-separated; empty = the planner changes nothing."
            value = ("\n" if kind == "lines" else ", ").join(default or [])  # e.g. `auto`: the engine's list
            out.append(Field(name, kind, value, _tip(meta, hint), group=meta["group"], optional=True))
        else:
            if name == "resume_lora":
                hint = "A file path, or the name of a LoRA in the webui's Lora folder."
            out.append(Field(name, "text", "" if default is None else str(default), _tip(meta, hint),
                             group=meta["group"], optional=optional))
    for name, meta in EXTRA_FIELDS.items():
        kind = "bool" if isinstance(meta["default"], bool) else "float"
        out.append(Field(name, kind, meta["default"], meta["help"], None, meta.get("min"), meta.get("max"),
                         meta["group"]))
    return out


def plannable() -> tuple[str, ...]:
    """Config keys the memory planner may choose (`auto` may list them)."""
    from ..trainer.memory.planner import PLANNABLE

    return tuple(PLANNABLE)


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == AUTO


def auto_bool_fields() -> tuple[str, ...]:
    """The plannable yes/no settings shown as auto / on / off (those whose tab default is "auto")."""
    return tuple(f.name for f in form_fields() if f.choices == AUTO_BOOL_CHOICES)


def _tip(meta: dict, extra: str = "") -> str:
    return " ".join(x for x in (meta["help"], extra) if x)


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
    """Widget (or API) values split into the engine mapping, the 'auto' choices and the A1111 extras."""

    mapping: dict[str, Any]
    auto: frozenset[str]
    preferred_weight: float
    make_preview: bool


def parse_values(values: dict[str, Any]) -> TabSettings:
    """Widget/API values → TabSettings. Unknown keys raise with the nearest valid key (from `from_mapping`).

    An auto / on / off setting becomes "auto" (the key joins `auto`) or True / False (the key leaves `auto`); when
    the values also hold the `auto` list (the tab always sends it), the dropdowns are applied to that list, since an
    explicit `auto` list would otherwise override them in `from_mapping`."""
    types = _types()
    tristate = set(auto_bool_fields())
    mapping: dict[str, Any] = {}
    auto: set[str] = set()
    planned: dict[str, bool] = {}  # auto / on / off setting → True when "auto"
    for name, value in values.items():
        if name in EXTRA_FIELDS or name in HOST_OWNED:
            continue
        if name not in types:
            mapping[name] = value  # from_mapping names the unknown key and suggests the nearest one
            continue
        base, optional = _base(types[name])
        if name in tristate or (base == "bool" and _is_auto(value)):
            value = _auto_bool(name, value)
            planned[name] = value == AUTO
            mapping[name] = value
            continue
        if isinstance(value, str) and value.strip().lower() == AUTO and name in ("mixed_precision", "resolution"):
            auto.add(name)
            continue
        if name == "resolution" and value in (0, 0.0, "0", None, ""):
            auto.add(name)
            continue
        if base == "list[str]":
            if isinstance(value, str):
                sep = "\n" if name == "sample_prompts" else ","
                value = [v.strip() for v in value.split(sep) if v.strip()]
            value = list(value or [])
            if optional and not value:
                value = None
        elif base == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)  # gr.Number hands back floats
        if optional and value in (0, 0.0, "", None):
            value = None
        mapping[name] = value
    if planned and isinstance(mapping.get("auto"), list):
        keys = [k for k in mapping["auto"] if planned.get(k, True)]
        mapping["auto"] = keys + [k for k, is_auto in planned.items() if is_auto and k not in keys]
    weight = values.get("preferred_weight", EXTRA_FIELDS["preferred_weight"]["default"])
    preview = values.get("make_preview", EXTRA_FIELDS["make_preview"]["default"])
    return TabSettings(mapping, frozenset(auto), float(weight or 0.0), bool(preview))


def _auto_bool(name: str, value: Any) -> Any:
    """An auto / on / off value (or a plain bool from the API) → "auto", True or False."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    text = str(value).strip().lower()
    if text == AUTO:
        return AUTO
    if text in _ON_OFF:
        return _ON_OFF[text]
    raise ConfigError(f"`{name}` must be auto, on or off (got {value!r})", key=name, value=value,
                      allowed=AUTO_BOOL_CHOICES)


def resolve(settings: TabSettings, family: Family, prediction_type: str, model_dtype: torch.dtype,
            base_model: str | None = None) -> TrainConfig:
    """The TrainConfig of a run on the loaded model. Raises ConfigError naming the field at fault."""
    keep = set(plannable())  # `key: auto` hands a plannable key to the planner (from_mapping)
    bools = {f.name for f in fields(TrainConfig) if str(f.type) == "bool"}
    # A non-plannable "auto" means "the default" (an unset optional), except for a switch: from_mapping then says
    # which keys may be auto.
    mapping = {k: (None if _is_auto(v) and k not in keep and k not in bools else v)
               for k, v in settings.mapping.items()}
    config = from_mapping(mapping, "the LoRA Loop tab")
    changes: dict[str, Any] = {"family": family.name, "prediction_type": prediction_type}
    if base_model:
        changes["base_model"] = base_model
    if "resolution" in settings.auto:
        changes["resolution"] = family.resolution
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(model_dtype, "no")
    if "mixed_precision" in settings.auto:
        changes["mixed_precision"] = precision
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
    data_keys = {k for k, meta in field_help().items() if meta["group"] == "data"}
    config = from_mapping({k: v for k, v in settings.mapping.items() if k in data_keys}, "the dataset fields")
    if "resolution" in settings.auto:
        config = replace(config, resolution=native_resolution)
    return config


# -- YAML import / export ----------------------------------------------------------------------------------------------
def config_to_values(config: TrainConfig) -> dict[str, Any]:
    """A config → widget values (None → 0 / ""; lists → text)."""
    out: dict[str, Any] = {}
    for f in form_fields():
        if f.name in EXTRA_FIELDS:
            continue
        value = getattr(config, f.name)
        if f.choices == AUTO_BOOL_CHOICES:
            value = AUTO if f.name in config.auto else ("on" if value else "off")
        elif f.kind == "lines":
            value = "\n".join(value or [])
        elif f.kind == "list":
            value = ", ".join(value or [])
        elif value is None:
            value = AUTO if f.kind == "choice" else (0 if f.kind in ("int", "float") else "")
        out[f.name] = value
    return out


def values_from_yaml(text: str, source: str = "pasted YAML") -> tuple[dict[str, Any], list[str]]:
    """Widget values from a YAML config (our keys or kohya's aliases) and notes about what was not applied."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {err}", key="config") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold key: value pairs (got {type(data).__name__})", key="config")
    notes = [f"`{k}` ignored: {HOST_OWNED[k]}" for k in data if k in HOST_OWNED]
    extras = {k: data.pop(k) for k in list(data) if k in EXTRA_FIELDS}
    data = {k: v for k, v in data.items() if k not in HOST_OWNED}
    config = from_mapping(data, source).validate()
    tristate = set(auto_bool_fields()) if "auto" in data else set()
    values = {k: v for k, v in config_to_values(config).items()
              if k in data or _alias_target(k, data) or k in tristate}
    values.update(extras)
    return values, notes


def _alias_target(key: str, data: dict) -> bool:
    from ..trainer.config import ALIASES

    return any(ALIASES.get(k.strip().replace("-", "_")) == key for k in data)


def values_from_file(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """Widget values from a config file: .yaml/.yml (ours) or .toml (kohya / lora-scripts), paths made absolute."""
    path = Path(path)
    if path.suffix.lower() == ".toml":
        config = load_config(path)
        return {k: v for k, v in config_to_values(config).items()}, ["base_model/family ignored: the loaded "
                                                                     "checkpoint is trained"]
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
