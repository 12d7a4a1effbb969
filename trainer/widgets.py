"""The one widget schema of the training options, derived from `TrainConfig`'s field metadata, and the one parser of
widget values. Host-agnostic: the ComfyUI node renders the schema as `io.*` inputs, the A1111 tab as Gradio
components, and both hand the values back to `parse_values`, whose mapping goes through the engine's `from_mapping`
(aliases, `key: auto`).

Widget conventions, the same on every host:
- `switch`: a yes/no setting the memory planner may choose whose host default is "auto" (auto / on / off).
- An optional number (`optional`): 0 or empty means "not set" (the config value None); text and lists: empty.
- Following the loaded model (`FOLLOW_MODEL`): resolution 0 is the family's native size, mixed_precision "auto" the
  model's dtype. The host resolves them with `follow_model_values` once the model is known.
- `list`: comma-separated; `lines`: one value per line (prompts hold commas).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import yaml

from .config import (
    ALIASES,
    AUTO,
    HOST_DEFAULTS,
    PLANNABLE,
    SWITCH_CHOICES,
    SWITCH_VALUES,
    TrainConfig,
    field_help,
    from_mapping,
)
from .errors import ConfigError

KINDS = ("int", "float", "bool", "switch", "choice", "text", "path", "list", "lines")
# Keys holding a file or folder: a host may offer a picker (ComfyUI lists models/loras for resume_lora).
PATH_KEYS = ("base_model", "train_data_dir", "metadata_path", "resume_lora", "output_dir", "logging_dir")
LINE_KEYS = ("sample_prompts",)  # lists entered one per line: a prompt holds commas
# The widget value that means "follow the loaded model" (a host holds the model; the CLI has no such value).
FOLLOW_MODEL: dict[str, Any] = {"resolution": 0, "mixed_precision": AUTO}
SMALL_FLOAT = 0.01  # floats with a smaller default (or a learning rate) get a fine step: the UI must not round them
ON_OFF = {**SWITCH_VALUES, "true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}  # API too

SWITCH_HINT = ("auto: the memory planner decides (off when the free memory allows: faster); on / off: your "
               "choice.")
HINTS = {
    "resolution": "0 = the model family's native resolution.",
    "mixed_precision": "auto: follow the loaded model's dtype.",
    "max_train_steps": "0 = train `epochs` instead.",
    "auto": "Comma-separated; empty = the planner changes nothing.",
}
NOT_SET = "0 / empty = not set (the default)."


@dataclass(frozen=True)
class Widget:
    """How one config key is shown and entered.

    Args:
        name: the config key (the widget's label everywhere, so YAML, CLI and hosts share one name).
        kind: one of KINDS.
        default: the widget's initial value, in widget form (0 / "" for unset, "auto" for a switch, text for lists).
        help: the engine's help text plus the widget convention (the tooltip).
        group: the metadata group (data, network, training, output, memory).
        choices: options of a `choice` / `switch` ("auto" stands for None, or for following the model).
        minimum, maximum, step: numeric bounds (0 allowed where 0 means unset) and the entry step.
        optional: the config value may be None (0 / "" / "auto" in the widget).
    """

    name: str
    kind: str
    default: Any
    help: str
    group: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    optional: bool = False


@dataclass(frozen=True)
class Schema:
    """The widgets a host shows, in order, and the keys it sets itself (with the reason)."""

    widgets: tuple[Widget, ...]
    host_owned: Mapping[str, str]

    def __getitem__(self, name: str) -> Widget:
        return self.by_name()[name]

    def by_name(self) -> dict[str, Widget]:
        return {w.name: w for w in self.widgets}

    @property
    def names(self) -> list[str]:
        return [w.name for w in self.widgets]

    def defaults(self) -> dict[str, Any]:
        return {w.name: w.default for w in self.widgets}


def build_schema(host_owned: Mapping[str, str], order: Iterable[str] = ()) -> Schema:
    """A widget for every TrainConfig key not in `host_owned`: those in `order` first (a host that stores values by
    position keeps its order), then the others in TrainConfig order. Built on each call from the field metadata and
    `HOST_DEFAULTS`, so a change there shows at once."""
    meta = field_help()
    order = list(order)
    wrong = [n for n in order if n not in meta or n in host_owned]
    if wrong:
        raise ValueError(f"widget order names keys that are not shown: {wrong}")
    names = order + [n for n in meta if n not in order and n not in host_owned]
    types = {f.name: str(f.type) for f in fields(TrainConfig)}
    return Schema(tuple(_widget(n, types[n], meta[n]) for n in names), dict(host_owned))


def _widget(name: str, type_name: str, meta: dict[str, Any]) -> Widget:
    base = type_name.replace(" | None", "").strip()
    optional = "None" in type_name
    default = HOST_DEFAULTS.get(name, meta["default"])
    group = meta["group"]
    choices = meta.get("choices")

    def tip(hint: str = "") -> str:
        return " ".join(x for x in (meta["help"], hint) if x)

    if base == "bool" and default == AUTO and name in PLANNABLE:
        return Widget(name, "switch", AUTO, tip(SWITCH_HINT), group, SWITCH_CHOICES)
    if choices is not None:
        options = tuple(AUTO if c is None else c for c in choices)
        if default == AUTO and AUTO not in options:  # the host default follows the model
            options = (AUTO, *options)
        return Widget(name, "choice", AUTO if default is None else default, tip(HINTS.get(name, "")), group, options,
                      optional=optional)
    if base == "bool":
        return Widget(name, "bool", bool(default), tip(), group)
    if base in ("int", "float"):
        unset_is_zero = optional or name in HOST_DEFAULTS  # 0 = not set / the host's meaning of 0
        lo = 0 if unset_is_zero else meta["min"]
        value = 0 if default is None else default
        hint = HINTS.get(name, NOT_SET if optional else "")
        if base == "int":
            return Widget(name, "int", int(value), tip(hint), group, minimum=int(lo), maximum=int(meta["max"]), step=1,
                          optional=optional)
        fine = 0 < abs(value) < SMALL_FLOAT or name.endswith("_lr")  # learning rates: 1e-4 must not round to 0
        return Widget(name, "float", float(value), tip(hint), group, minimum=float(lo), maximum=float(meta["max"]),
                      step=1e-6 if fine else 0.01, optional=optional)
    if base == "list[str]":
        kind = "lines" if name in LINE_KEYS else "list"
        hint = HINTS.get(name, "One per line." if kind == "lines" else "Comma-separated; empty = the default.")
        text = ("\n" if kind == "lines" else ", ").join(default or [])  # e.g. `auto`: the engine's list
        return Widget(name, kind, text, tip(hint), group, optional=optional)
    kind = "path" if name in PATH_KEYS else "text"
    return Widget(name, kind, "" if default is None else str(default), tip(NOT_SET if optional else ""), group,
                  optional=optional)


# -- widget values → config mapping ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParsedValues:
    """Widget values as the engine reads them.

    Args:
        mapping: for `from_mapping`: config keys → values (None = unset; "auto" hands a plannable key to the planner).
        follow_model: keys left to the loaded model (see FOLLOW_MODEL); `follow_model_values` resolves them.
    """

    mapping: dict[str, Any]
    follow_model: frozenset[str]


def is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == AUTO


def canonical_key(raw: Any) -> str:
    """Our name for a key: dashes as underscores, a kohya alias as the key it stands for (unused ones unchanged)."""
    key = str(raw).strip().replace("-", "_")
    known = {f.name for f in fields(TrainConfig)}
    return key if key in known else (ALIASES.get(key) or key)


def parse_values(values: Mapping[str, Any], schema: Schema) -> ParsedValues:
    """Widget (or API) values → the mapping `from_mapping` reads, following the widget conventions.

    Host-owned keys are dropped; unknown keys are kept so that `from_mapping` names them with the nearest valid key.
    When the values hold the `auto` list (a host that shows it always sends it), every key set to "auto" joins it and
    a switch set on / off leaves it: the list is applied last by `from_mapping` and would otherwise override them.
    """
    widgets = schema.by_name()
    mapping: dict[str, Any] = {}
    follow: set[str] = set()
    for raw, value in values.items():
        name = canonical_key(raw)
        if name in schema.host_owned:
            continue
        widget = widgets.get(name)
        if widget is None:
            mapping[raw] = value
        elif _follows_model(name, value):
            follow.add(name)
        else:
            mapping[name] = _parse(widget, value)
    if isinstance(mapping.get("auto"), list):
        joins = [k for k, v in mapping.items() if k != "auto" and is_auto(v)]
        leaves = {k for k, v in mapping.items() if k in widgets and widgets[k].kind == "switch" and not is_auto(v)}
        listed = [k for k in mapping["auto"] if k not in leaves]
        mapping["auto"] = listed + [k for k in joins if k not in listed]
    return ParsedValues(mapping, frozenset(follow))


def _follows_model(name: str, value: Any) -> bool:
    if name not in FOLLOW_MODEL:
        return False
    return is_auto(value) or value is None or value == FOLLOW_MODEL[name] or str(value).strip() in ("", "0")


def _parse(widget: Widget, value: Any) -> Any:
    kind = widget.kind
    if kind in ("bool", "switch"):
        return _on_off(widget.name, value)
    if is_auto(value):  # a choice whose "auto" stands for None; else the planner's (from_mapping says which may)
        return None if widget.optional and kind == "choice" else AUTO
    if kind in ("list", "lines"):
        if isinstance(value, str) or value is None:
            value = (value or "").split("\n" if kind == "lines" else ",")
        items = [str(v).strip() for v in value if str(v).strip()]
        return None if widget.optional and not items else items
    if widget.optional and (value is None or (isinstance(value, str) and value.strip() in ("", "0"))
                            or (isinstance(value, (int, float)) and value == 0)):
        return None
    if kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)  # gr.Number hands back floats
    return value


def _on_off(name: str, value: Any) -> Any:
    """A switch or checkbox value (or an API bool / on / yes / 1) → True, False or "auto"."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    text = str(value).strip().lower()
    if text == AUTO:
        return AUTO
    if text in ON_OFF:
        return ON_OFF[text]
    raise ConfigError(f"`{name}` must be auto, on or off (got {value!r})", key=name, value=value,
                      allowed=SWITCH_CHOICES)


def follow_model_values(keys: Iterable[str], native_resolution: int, model_dtype: Any) -> dict[str, Any]:
    """The values of the FOLLOW_MODEL `keys` for a model of that native resolution whose weights are `model_dtype`."""
    precision = {"torch.float16": "fp16", "torch.bfloat16": "bf16"}.get(str(model_dtype), "no")
    found = {"resolution": native_resolution, "mixed_precision": precision}
    return {k: found[k] for k in keys}


# -- config → widget values (YAML / TOML import) -----------------------------------------------------------------------
def widget_value(widget: Widget, value: Any, planned: bool = False) -> Any:
    """A config value in widget form (`planned`: the key is in the config's `auto` list)."""
    if widget.kind == "switch":
        return AUTO if planned else ("on" if value else "off")
    if widget.kind in ("list", "lines"):
        return ("\n" if widget.kind == "lines" else ", ").join(value or [])
    if value is None:
        return AUTO if widget.kind == "choice" else (0 if widget.kind in ("int", "float") else "")
    return value


def widget_values(config: TrainConfig, schema: Schema, keys: Iterable[str] | None = None) -> dict[str, Any]:
    """Widget values of `config` for the schema's widgets (or only `keys`)."""
    wanted = None if keys is None else set(keys)
    return {w.name: widget_value(w, getattr(config, w.name), w.name in config.auto) for w in schema.widgets
            if wanted is None or w.name in wanted}


def values_from_mapping(data: Mapping[str, Any], schema: Schema, source: str) -> tuple[dict[str, Any], list[str]]:
    """Widget values for what a config mapping (a YAML/TOML file: our keys or kohya's, `key: auto`) sets, read by the
    engine's `from_mapping`, plus notes about the host-owned keys it ignored. Ranges are checked when the values are
    resolved (a file's bucket limits may suit a resolution that follows the model, unknown here).

    `key: auto` becomes: for a switch "auto"; for a key that follows the model its FOLLOW_MODEL value; for any other
    key the host's `auto` widget (the config's list) or, where the host shows none, the widget value "auto". A file's
    `auto` list sets every switch (listed: auto, else on / off) and comes back as `auto` (text) even from a host that
    does not show it: that host applies the list itself (it overrides the values, as in `from_mapping`).
    """
    notes: list[str] = []
    kept: dict[str, Any] = {}
    for raw, value in data.items():
        key = canonical_key(raw)
        if key in schema.host_owned and key != "auto":
            notes.append(f"`{raw}` ignored: {schema.host_owned[key]}")
        else:
            kept[raw] = value
    sources: dict[str, str] = {}
    config = from_mapping(kept, source, sources=sources)
    widgets = schema.by_name()
    values = widget_values(config, schema, [k for k in sources if k in widgets])
    listed = ", ".join(config.auto)
    for key, origin in sources.items():
        if key not in widgets or not origin.endswith("(auto)"):
            continue
        if key in FOLLOW_MODEL:
            values[key] = FOLLOW_MODEL[key]
        elif widgets[key].kind == "switch":
            values[key] = AUTO
        elif "auto" in widgets:
            values["auto"] = listed
        else:
            values[key] = AUTO
    if "auto" in sources:
        values["auto"] = listed
        values.update({w.name: widget_value(w, getattr(config, w.name), w.name in config.auto)
                       for w in schema.widgets if w.kind == "switch"})
    return values, notes


def read_yaml(text: str, source: str) -> dict[str, Any]:
    """A YAML config's key: value pairs; a ConfigError naming `source` when it is not valid YAML or not a mapping."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {err}", key="config") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold key: value pairs (got {type(data).__name__})", key="config")
    return data
