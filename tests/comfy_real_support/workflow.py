"""UI-format workflow (what the ComfyUI front-end saves, what `example_workflows/` ship) → API-format prompt.

The mapping of `widgets_values` to inputs follows the front-end that ComfyUI 0.12.3 pins (comfyui-frontend-package
1.38.13), read from its bundle:
* widgets are created in `getOrderedInputSpecs` order: the `required` names in `input_order`, then the `optional`
  ones (NOT the order in which a V3 schema lists them);
* an input is a widget when its type is INT, FLOAT, STRING, BOOLEAN or a combo, unless it has `forceInput`;
* an INT widget gets a second, linked "control_after_generate" widget (one more entry in `widgets_values`) when its
  spec has `control_after_generate`, or when that option is absent and the input is named `seed` or `noise_seed`
  (`t.control_after_generate ?? ["seed","noise_seed"].includes(t.name)`); a COMBO only when the option is set;
* a widget input that is linked in the UI (`inputs[i].widget`) keeps its value slot but takes the link.
A count mismatch is an error: the front-end would then put values into the wrong widgets.
"""

from __future__ import annotations

from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
AUTO_CONTROL_NAMES = ("seed", "noise_seed")


class WorkflowError(ValueError):
    pass


def _kind(spec: list) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def _has_control(name: str, spec: list) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    kind = _kind(spec)
    control = opts.get("control_after_generate")
    if kind == "INT":
        return bool(name in AUTO_CONTROL_NAMES if control is None else control)
    return kind == "COMBO" and bool(control)


def widget_layout(info: dict) -> list[tuple[str, int]]:
    """[(input name, number of widgets_values entries it takes)] in the front-end's order for one node type."""
    order = info.get("input_order") or {k: list(v) for k, v in info.get("input", {}).items()}
    specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    layout = []
    for name in [*order.get("required", []), *order.get("optional", [])]:
        spec = specs[name]
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if _kind(spec) not in WIDGET_TYPES or opts.get("forceInput"):
            continue
        if _kind(spec) == "COMBO" and opts.get("image_upload"):
            raise WorkflowError(f"upload widgets ({name}) are not supported by this converter")
        layout.append((name, 2 if _has_control(name, spec) else 1))
    return layout


def widget_values(node: dict, info: dict) -> dict[str, Any]:
    """name → value for the widgets of one UI node; raises WorkflowError when the count does not match."""
    layout = widget_layout(info)
    values = node.get("widgets_values") or []
    if isinstance(values, dict):  # some nodes save a dict keyed by widget name
        return {name: values[name] for name, _ in layout if name in values}
    expected = sum(n for _, n in layout)
    if len(values) != expected:
        names = ", ".join(f"{n}{'(+control)' if k == 2 else ''}" for n, k in layout)
        raise WorkflowError(f"node {node['id']} ({node['type']}): {len(values)} widgets_values but the front-end makes "
                            f"{expected} widgets: {names}")
    out, i = {}, 0
    for name, count in layout:
        out[name] = values[i]
        i += count
    return out


def unknown_nodes(workflow: dict, object_info: dict) -> list[str]:
    return sorted({n["type"] for n in workflow["nodes"] if n["type"] not in object_info})


def to_api(workflow: dict, object_info: dict) -> dict[str, dict]:
    """The API prompt (`{id: {"class_type", "inputs"}}`) for a UI workflow of active nodes only."""
    missing = unknown_nodes(workflow, object_info)
    if missing:
        raise WorkflowError(f"unknown node types: {missing}")
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) != 0:
            raise WorkflowError(f"node {node['id']} ({node['type']}) is muted/bypassed; not supported")
        info = object_info[node["type"]]
        inputs: dict[str, Any] = widget_values(node, info)
        for inp in node.get("inputs", []):
            if inp.get("link") is None:
                continue
            _, src, src_slot, _dst, _dst_slot, _kind = links[inp["link"]]
            inputs[inp["name"]] = [str(src), src_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
