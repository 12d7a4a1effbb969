"""Every example workflow loads with no missing node and matches the node definitions (inputs, types, widgets)."""

import json
from pathlib import Path

import pytest
from comfy_stub.harness import setup_host  # puts the stub first (sorted before loraloop)

from loraloop.nodes import definitions as nodes
from loraloop.nodes.paths import is_plain_relative

WORKFLOWS = sorted((Path(__file__).resolve().parent.parent / "example_workflows").glob("*.json"))
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# The core nodes the examples use (ComfyUI 0.12.3 nodes.py): link inputs, widget count, output types.
CORE = {"CheckpointLoaderSimple": ({}, 1, ["MODEL", "CLIP", "VAE"]),
        "CLIPTextEncode": ({"clip": "CLIP"}, 1, ["CONDITIONING"]),
        "EmptyLatentImage": ({}, 3, ["LATENT"]),
        "KSampler": ({"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING",
                      "latent_image": "LATENT"}, 7, ["LATENT"]),  # seed + control_after_generate + 5
        "VAEDecode": ({"samples": "LATENT", "vae": "VAE"}, 0, ["IMAGE"]),
        "SaveImage": ({"images": "IMAGE"}, 1, []), "PreviewImage": ({"images": "IMAGE"}, 0, []),
        "PrimitiveStringMultiline": ({}, 1, ["STRING"])}  # comfy_extras/nodes_primitive.py: one `value` widget


def frontend_widgets(inputs):
    """Widgets in the order the 0.12.3 front-end (1.38.13) creates them, which is the order of `widgets_values`:
    required inputs first, then optional ones (`getOrderedInputSpecs`), NOT the schema's order; an INT named seed or
    noise_seed without an explicit control_after_generate gets a second (control) widget, i.e. one more value."""
    ordered = [i for i in inputs if not i.optional] + [i for i in inputs if i.optional]
    out = []
    for i in ordered:
        out.append(i)
        control = getattr(i, "control_after_generate", None)
        if i.get_io_type() == "INT" and (control if control is not None else i.id in ("seed", "noise_seed")):
            out.append(None)  # the control widget's value ("fixed", "randomize", …)
    return out


def definitions():
    out = dict(CORE)
    for node in nodes.NODES:
        s = node.GET_SCHEMA()
        links = {i.id: i.get_io_type() for i in s.inputs
                 if i.get_io_type() not in WIDGETS or getattr(i, "force_input", None)}
        widgets = frontend_widgets([i for i in s.inputs if i.id not in links])
        out[s.node_id] = (links, widgets, [o.io_type for o in s.outputs])
    return out


def test_no_seed_control_on_our_nodes(tmp_path):
    """A "control after generate" widget would randomize the training seed, so change CONFIG and re-train on every
    Queue; our nodes declare control_after_generate=False for such inputs."""
    setup_host(tmp_path, None)
    for node in nodes.NODES:
        assert None not in frontend_widgets(node.GET_SCHEMA().inputs), node.__name__
    seed = next(i for i in nodes.LoRATrainConfig.GET_SCHEMA().inputs if i.id == "seed")
    assert seed.as_dict()["control_after_generate"] is False


def test_the_examples_exist():
    assert {w.stem for w in WORKFLOWS} >= {"train_style_lora_and_sample", "caption_a_folder",
                                           "continue_training_a_lora", "caption_with_a_captioner_node"}


def test_the_captioner_example_is_wired_through_loaddatasets_images():
    """LoadDataset's IMAGE output (appended as output 2) feeds the captioner slot and the stand-in's strings come
    back into Caption's `captions` input with source "strings"."""
    wf = json.loads((WORKFLOWS[0].parent / "caption_with_a_captioner_node.json").read_text())
    by_id = {n["id"]: n for n in wf["nodes"]}
    links = {link[0]: link for link in wf["links"]}
    load = next(n for n in wf["nodes"] if n["type"] == "LoRALoop_LoadDataset")
    caption = next(n for n in wf["nodes"] if n["type"] == "LoRALoop_Caption")
    (image_link,) = load["outputs"][2]["links"]
    assert load["outputs"][2]["type"] == "IMAGE" and links[image_link][1:3] == [load["id"], 2]
    strings = next(i for i in caption["inputs"] if i["name"] == "captions")
    source = by_id[links[strings["link"]][1]]
    assert source["type"] == "PrimitiveStringMultiline" and "stand-in" in source["title"]
    assert caption["widgets_values"][0] == "strings"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_matches_node_definitions(tmp_path, path):
    setup_host(tmp_path, None)
    defs = definitions()
    wf = json.loads(path.read_text())
    by_id = {n["id"]: n for n in wf["nodes"]}
    for node in wf["nodes"]:
        assert node["type"] in defs, f"missing node type {node['type']}"
        links, widgets, outputs = defs[node["type"]]
        assert [o["type"] for o in node["outputs"]] == outputs
        assert {i["name"]: i["type"] for i in node["inputs"]}.items() <= {**links}.items() | set()
        values = node["widgets_values"]
        if isinstance(widgets, int):
            assert len(values) == widgets
            continue
        assert len(values) == len(widgets), node["type"]
        for widget, value in zip(widgets, values, strict=True):
            if widget is None:
                continue
            kind = widget.get_io_type()
            if kind == "COMBO" and widget.id != "resume_lora":
                assert value in widget.options, (widget.id, value)
            elif kind in ("INT", "FLOAT"):
                assert widget.min <= value <= widget.max, (widget.id, value)
            elif kind == "STRING" and widget.id in ("folder", "subfolder", "import_yaml"):
                assert not value or is_plain_relative(value), f"machine path in {widget.id}: {value!r}"
        required = [i.id for i in nodes_schema(node["type"]).inputs if not i.optional and i.id in links] \
            if node["type"].startswith("LoRALoop_") else list(links)
        connected = {i["name"] for i in node["inputs"] if i["link"] is not None}
        assert set(required) <= connected, f"{node['type']}: unconnected {set(required) - connected}"
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        assert by_id[src]["outputs"][src_slot]["type"] == kind
        assert by_id[dst]["inputs"][dst_slot]["type"] == kind and by_id[dst]["inputs"][dst_slot]["link"] == link_id
    text = path.read_text()
    assert "/home/" not in text and "/tmp/" not in text and ":\\\\" not in text


def nodes_schema(node_id):
    return next(n.GET_SCHEMA() for n in nodes.NODES if n.GET_SCHEMA().node_id == node_id)


def test_widget_order_is_frozen_and_lists_every_option(tmp_path):
    """Saved workflows hold widget values by position: LoRATrainConfig's widgets follow WIDGET_ORDER, which must list
    every engine option that is not host-owned (append new ones at its end, never insert); options added after
    workflows were shared (LATE_WIDGETS) are optional and come after every other input."""
    from loraloop.nodes.widgets import HOST_OWNED, LATE_WIDGETS, WIDGET_ORDER
    from loraloop.trainer.config import field_help

    setup_host(tmp_path, None)
    assert len(set(WIDGET_ORDER)) == len(WIDGET_ORDER)
    assert set(WIDGET_ORDER) == set(field_help()) - set(HOST_OWNED), "append new options to WIDGET_ORDER"
    ids = [i.id for i in nodes.LoRATrainConfig.GET_SCHEMA().inputs]
    early = [name for name in WIDGET_ORDER if name not in LATE_WIDGETS]
    assert ids == [*early, "import_yaml", "export_yaml", *LATE_WIDGETS]
    assert all(i.optional for i in nodes.LoRATrainConfig.GET_SCHEMA().inputs if i.id in LATE_WIDGETS)
