"""Which ComfyUI node API is available, and the classic (V1) node classes generated from our V3 node list.

ComfyUI loads a pack as V1 when its module defines `NODE_CLASS_MAPPINGS`, else as V3 through `comfy_entrypoint`
(hosts.md §1.1). Nodes are declared once, V3-style; on a ComfyUI without `comfy_api.latest` (before the V3 API) the
same declarations are turned into V1 classes here, never written by hand.
"""

from __future__ import annotations

from typing import Any

try:  # ComfyUI with the V3 node API (0.3.4x and later; tested with 0.12.3)
    from comfy_api.latest import ComfyExtension, io, ui

    HAS_V3 = True
except ImportError:  # an older ComfyUI, or no ComfyUI at all (imports, tests)
    from ._v3shim import ComfyExtension, io, ui  # type: ignore[assignment]

    HAS_V3 = False

# `io.LoraModel` appeared with the built-in trainer; the wire type is the same string either way.
LoraModelType = getattr(io, "LoraModel", None) or io.Custom("LORA_MODEL")

__all__ = ["HAS_V3", "ComfyExtension", "LoraModelType", "io", "ui", "v1_node_class"]


def _v1_input(inp: Any) -> tuple:
    options = {k: v for k, v in inp.as_dict().items() if k != "optional"}
    kind = inp.get_io_type()
    if kind == "COMBO":  # V1 spells a combo as the list of its options
        return (list(inp.options), options)
    return (kind, options)


def v1_node_class(node: type) -> type:
    """A classic node class (INPUT_TYPES, RETURN_TYPES, FUNCTION …) that runs `node.execute`."""
    schema = node.define_schema()
    hidden = {h.name: h.value for h in schema.hidden}
    if schema.is_output_node:
        hidden.update({"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"})

    def input_types(cls: type) -> dict:
        fresh = node.define_schema()  # combos such as the LoRA list must be current on every call
        out: dict[str, dict] = {"required": {}}
        for inp in fresh.inputs:
            out.setdefault("optional" if inp.optional else "required", {})[inp.id] = _v1_input(inp)
        if hidden:
            out["hidden"] = {name: value for name, value in hidden.items()}
        return out

    def run(self: object, **kwargs: Any) -> dict:
        from ._v3shim import _HiddenValues

        values = {name: kwargs.pop(name, None) for name in hidden}
        bound = type(node.__name__, (node,), {"hidden": _HiddenValues(values)})  # per call, like V3's class clone
        result = bound.execute(**kwargs)
        out: dict[str, Any] = {"result": tuple(result.args)}
        if result.ui is not None:
            out["ui"] = result.ui if isinstance(result.ui, dict) else result.ui.as_dict()
        return out

    attrs = {
        "INPUT_TYPES": classmethod(input_types),
        "RETURN_TYPES": tuple(o.io_type for o in schema.outputs),
        "RETURN_NAMES": tuple(o.display_name or o.io_type for o in schema.outputs),
        "OUTPUT_TOOLTIPS": tuple(o.tooltip for o in schema.outputs),
        "OUTPUT_IS_LIST": tuple(o.is_output_list for o in schema.outputs),
        "FUNCTION": "run",
        "CATEGORY": schema.category,
        "DESCRIPTION": schema.description,
        "OUTPUT_NODE": schema.is_output_node,
        "INPUT_IS_LIST": schema.is_input_list,
        "NOT_IDEMPOTENT": schema.not_idempotent,
        "run": run,
    }
    if "fingerprint_inputs" in node.__dict__:
        attrs["IS_CHANGED"] = classmethod(lambda cls, **kw: node.fingerprint_inputs(**kw))
    return type(node.__name__ + "V1", (), attrs)
