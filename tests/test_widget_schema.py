"""One widget schema (trainer/widgets.py) from TrainConfig's metadata, rendered by both hosts, and one parser of widget
values: the ComfyUI node and the A1111 tab show the same widgets and read the same values the same way."""

import dataclasses

from comfy_stub.harness import run_node, setup_host  # puts the stub first

# isort: split
import pytest
import torch
import yaml

from loraloop.a1111 import widgets as tab
from loraloop.nodes import definitions as nodes
from loraloop.nodes import widgets as node
from loraloop.trainer import config as engine_config
from loraloop.trainer import widgets as schema
from loraloop.trainer.config import PLANNABLE, SWITCH_CHOICES, TrainConfig, field_help, load_config
from loraloop.trainer.errors import ConfigError
from loraloop.trainer.families import get_family

SD1_FP16 = (get_family("sd1"), "epsilon", torch.float16)
KEYS = {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.fixture
def host(tmp_path):
    return setup_host(tmp_path, None)


@pytest.mark.parametrize("owned", [node.HOST_OWNED, tab.HOST_OWNED], ids=["comfyui", "a1111"])
def test_every_key_is_a_widget_or_host_owned_with_its_metadata(owned):
    built = schema.build_schema(owned)
    assert set(built.names) | set(built.host_owned) == KEYS and not set(built.names) & set(built.host_owned)
    assert all(built.host_owned[k] for k in built.host_owned), "every host-owned key says why"
    meta = field_help()
    for w in built.widgets:
        assert w.kind in schema.KINDS and w.help.startswith(meta[w.name]["help"]) and w.group == meta[w.name]["group"]
        if w.kind in ("int", "float"):
            assert w.minimum <= w.default <= w.maximum and w.maximum == meta[w.name]["max"] and w.step
        if meta[w.name]["choices"]:
            assert {c for c in meta[w.name]["choices"] if c is not None} <= set(w.choices) and w.default in w.choices


def test_widget_kinds_defaults_and_bounds():
    w = schema.build_schema(tab.HOST_OWNED).by_name()
    assert (w["gradient_checkpointing"].kind, w["gradient_checkpointing"].choices) == ("switch", SWITCH_CHOICES)
    assert w["gradient_checkpointing"].default == "auto" and "memory planner" in w["gradient_checkpointing"].help
    assert w["flip_aug"].kind == "bool" and w["cache_latents"].kind == "bool"  # plannable, but its default is a value
    assert (w["mixed_precision"].kind, w["mixed_precision"].choices, w["mixed_precision"].default) == (
        "choice", ("auto", "no", "fp16", "bf16"), "auto")  # auto = follow the loaded model
    assert w["network_type"].choices == ("lora", "locon", "loha", "lokr") and not w["network_type"].optional
    rank = w["lora_rank"]
    assert (rank.kind, rank.default, rank.minimum, rank.maximum, rank.optional) == ("int", 8, 1, 1024, False)
    alpha = w["lora_alpha"]
    assert (alpha.kind, alpha.default, alpha.minimum, alpha.optional) == ("float", 0.0, 0.0, True)
    assert "not set" in alpha.help  # an optional number: 0 means unset
    steps = w["max_train_steps"]
    assert (steps.default, steps.minimum, steps.optional) == (500, 0, True) and "epochs" in steps.help
    assert (w["resolution"].default, w["resolution"].minimum) == (0, 0) and "native" in w["resolution"].help
    assert w["learning_rate"].step == w["text_encoder_lr"].step == 1e-6  # learning rates are not rounded to 0.01
    assert w["weight_decay"].step == 0.01 and w["lora_rank"].step == 1
    assert (w["sample_prompts"].kind, w["target_modules"].kind, w["target_modules"].optional) == ("lines", "list", True)
    assert w["auto"].kind == "list" and w["auto"].default == ", ".join(TrainConfig().auto)
    assert (w["resume_lora"].kind, w["resume_lora"].optional) == ("path", True) and w["output_dir"].kind == "path"
    assert w["trigger_word"].kind == "text" and w["seed"].maximum == 2**32 - 1


def test_order_puts_the_listed_keys_first_and_refuses_unknown_ones():
    built = schema.build_schema(node.HOST_OWNED, ["seed", "lora_rank"])
    assert built.names[:2] == ["seed", "lora_rank"] and len(built.names) == len(KEYS) - len(node.HOST_OWNED)
    with pytest.raises(ValueError, match="not shown"):
        schema.build_schema(node.HOST_OWNED, ["output_dir"])
    assert node.node_schema().names == list(node.WIDGET_ORDER)  # ComfyUI's frozen positional order


def _io_spec(i):
    """What a ComfyUI io input shows, in schema terms."""
    kind = i.get_io_type()
    spec = {"default": i.default}
    if kind == "COMBO":
        spec["choices"] = tuple(i.options)
    if kind in ("INT", "FLOAT"):
        spec.update(minimum=i.min, maximum=i.max)
    return kind, spec


def test_both_hosts_render_the_one_schema(host):
    """Each ComfyUI input and each A1111 field is the schema widget of that key, and the keys both hosts show look
    alike: a rule changed on one side only (a default, a bound, a choice) fails here."""
    widgets = node.node_schema().by_name()
    inputs = {i.id: i for i in nodes.LoRATrainConfig.GET_SCHEMA().inputs if i.id in widgets}
    assert list(inputs) == list(node.WIDGET_ORDER)
    io_kind = {"int": "INT", "float": "FLOAT", "bool": "BOOLEAN", "switch": "COMBO", "choice": "COMBO",
               "text": "STRING", "list": "STRING", "lines": "STRING"}
    for name, i in inputs.items():
        w = widgets[name]
        kind, spec = _io_spec(i)
        if name == "resume_lora":  # a path shown as the LoRAs ComfyUI lists
            assert kind == "COMBO" and i.options[0] == node.NO_LORA == i.default and i.optional
            continue
        assert kind == io_kind[w.kind] and i.tooltip == w.help, name
        assert spec == {"default": w.default, **({"choices": w.choices} if w.choices else {}),
                        **({"minimum": w.minimum, "maximum": w.maximum} if w.kind in ("int", "float") else {})}, name
        if w.kind == "float":
            assert i.step == w.step and i.round is (False if w.step < schema.SMALL_FLOAT else None), name
        if w.kind in ("list", "lines"):
            assert i.multiline is (w.kind == "lines") and i.optional, name
    fields = {f.name: f for f in tab.form_fields()}
    for w in tab.tab_schema().widgets:
        f = fields[w.name]
        assert (f.kind, f.default, f.choices or (), f.minimum, f.maximum, f.group, f.optional, f.switch) == (
            tab.TAB_KINDS.get(w.kind, w.kind), w.default, w.choices, w.minimum, w.maximum, w.group, w.optional,
            w.kind == "switch"), w.name
        assert f.tooltip.startswith(w.help)
        if w.name in inputs and w.name != "resume_lora":
            assert _io_spec(inputs[w.name])[1]["default"] == f.default, w.name


def test_host_defaults_change_both_hosts_at_once(host, monkeypatch):
    monkeypatch.setitem(engine_config.HOST_DEFAULTS, "gradient_checkpointing", True)
    gc = next(i for i in nodes.LoRATrainConfig.GET_SCHEMA().inputs if i.id == "gradient_checkpointing")
    assert gc.get_io_type() == "BOOLEAN" and gc.default is True
    field = {f.name: f for f in tab.form_fields()}["gradient_checkpointing"]
    assert (field.kind, field.default) == ("bool", True)


def test_the_parser_follows_the_widget_conventions():
    built = schema.build_schema(tab.HOST_OWNED)
    parsed = schema.parse_values({
        "lora_alpha": 0, "conv_rank": 0.0, "max_train_steps": "", "lora_rank": 16.0, "resume_lora": "",
        "target_modules": " to_q, to_v ,", "sample_prompts": "a cat, sitting\n\na dog", "gradient_checkpointing": "on",
        "flip_aug": "yes", "cache_latents": "auto", "resolution": 0, "mixed_precision": "auto", "optimizer": "auto",
        "family": "auto", "base_model": "x.ckpt", "network-dim": 4, "lr": 0.5, "xformers": True}, built)
    m = parsed.mapping
    assert parsed.follow_model == {"resolution", "mixed_precision"}
    assert (m["lora_alpha"], m["conv_rank"], m["max_train_steps"], m["resume_lora"]) == (None,) * 4
    assert m["lora_rank"] == 4 and isinstance(m["lora_rank"], int)  # the kohya alias, read after lora_rank
    assert m["learning_rate"] == 0.5 and m["xformers"] is True  # an unused kohya key is left to from_mapping
    assert m["target_modules"] == ["to_q", "to_v"] and m["sample_prompts"] == ["a cat, sitting", "a dog"]
    assert (m["gradient_checkpointing"], m["flip_aug"], m["cache_latents"], m["optimizer"]) == (True, True, "auto",
                                                                                               "auto")
    assert "family" not in m and "base_model" not in m  # host-owned here
    with pytest.raises(ConfigError) as err:
        schema.parse_values({"gradient_checkpointing": "sometimes"}, built)
    assert err.value.key == "gradient_checkpointing" and err.value.allowed == SWITCH_CHOICES
    # with an `auto` list, "auto" values join it and a switch set on / off leaves it
    m = schema.parse_values({"auto": "batch_size, gradient_checkpointing", "gradient_checkpointing": "off",
                             "lora_rank": "auto"}, built).mapping
    assert m["auto"] == ["batch_size", "lora_rank"]
    config = engine_config.from_mapping(m)
    assert config.auto == ["batch_size", "lora_rank"] and config.gradient_checkpointing is False
    assert set(PLANNABLE) >= set(config.auto)


def test_follow_model_values():
    assert schema.follow_model_values({"resolution", "mixed_precision"}, 1024, torch.bfloat16) == {
        "resolution": 1024, "mixed_precision": "bf16"}
    assert schema.follow_model_values(["mixed_precision"], 512, torch.float32) == {"mixed_precision": "no"}


def _both(values, *model):
    """The same widget values resolved by the ComfyUI node and by the A1111 tab."""
    comfy = node.node_config(values).resolve(*model)
    webui = tab.resolve(tab.parse_values(values), *model)
    return comfy, webui


def _same(a, b, skip=("auto",)):
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    return {k: (da[k], db[k]) for k in da if k not in skip and da[k] != db[k]}


def test_one_parser_both_hosts_read_widget_values_alike(host):
    values = {**node.node_schema().defaults(), "lora_alpha": 0, "conv_rank": 0.0, "max_train_steps": 0,
              "epochs": 3.0, "lora_rank": 16.0, "target_modules": "to_q, to_v", "sample_prompts": "a, b\nc",
              "gradient_checkpointing": "on", "max_grad_norm": 0, "text_encoder_lr": 0.0002, "resume_lora": ""}
    comfy, webui = _both(values, get_family("sd2-v"), "v_prediction", torch.bfloat16)
    assert not _same(comfy, webui)
    assert (comfy.resolution, comfy.mixed_precision, comfy.lora_alpha, comfy.max_train_steps) == (768, "bf16", None,
                                                                                                   None)
    assert comfy.sample_prompts == ["a, b", "c"] and comfy.target_modules == ["to_q", "to_v"]
    assert "gradient_checkpointing" not in comfy.auto and "gradient_checkpointing" not in webui.auto
    comfy, webui = _both({**values, "gradient_checkpointing": "auto"}, *SD1_FP16)
    assert "gradient_checkpointing" in comfy.auto and "gradient_checkpointing" in webui.auto


YAML_WITH_AUTO_AND_KOHYA = """\
network_dim: 6
network_alpha: 3
train_batch_size: 2
gradient_checkpointing: auto
resolution: auto
mixed_precision: auto
lr: 0.0005
output_dir: /somewhere
"""


def _tab_config(text, *model):
    imported, notes = tab.values_from_yaml(text)
    return tab.resolve(tab.parse_values({**tab.default_values(), **imported}), *model), notes


def _node_config(host, text, *model):
    (host / "input" / "in.yaml").write_text(text)
    defaults = {i.id: i.default for i in nodes.LoRATrainConfig.GET_SCHEMA().inputs if i.default is not None}
    return run_node(nodes.LoRATrainConfig, **{**defaults, "import_yaml": "in.yaml"}).args[0].resolve(*model)


def test_a_yaml_with_auto_and_kohya_keys_imports_alike_on_both_hosts(host):
    comfy = _node_config(host, YAML_WITH_AUTO_AND_KOHYA, *SD1_FP16)
    webui, notes = _tab_config(YAML_WITH_AUTO_AND_KOHYA, *SD1_FP16)
    for config in (comfy, webui):
        assert (config.lora_rank, config.lora_alpha, config.batch_size, config.learning_rate) == (6, 3, 2, 0.0005)
        assert (config.resolution, config.mixed_precision) == (512, "fp16")  # follow the model
        assert "gradient_checkpointing" in config.auto
    assert comfy.output_dir == TrainConfig().output_dir  # host-owned in ComfyUI: ignored
    assert webui.output_dir == "/somewhere" and not notes
    assert not _same(comfy, webui, skip=("auto", "output_dir"))


def test_exports_of_one_host_import_alike_on_the_other(host):
    """The node's exported YAML (`key: auto`) read by the tab, and the tab's export (an `auto` list) read by the
    node, give the run the exporting host would make."""
    defaults = {i.id: i.default for i in nodes.LoRATrainConfig.GET_SCHEMA().inputs if i.default is not None}
    config, text = run_node(nodes.LoRATrainConfig, **{**defaults, "lora_rank": 12, "sample_prompts": "a, b\nc",
                                                      "max_grad_norm": 0.0}).args
    exported = config.resolve(*SD1_FP16)
    assert "resolution: auto" in text and "gradient_checkpointing: auto" in text
    webui, _ = _tab_config(text, *SD1_FP16)
    assert not _same(exported, webui) and "gradient_checkpointing" in webui.auto
    tab_values = {**tab.default_values(), "lora_rank": 20, "gradient_checkpointing": "off", "train_data_dir": "/d",
                  "auto": "batch_size, cache_latents"}
    text = tab.export_unresolved(tab.parse_values(tab_values))
    assert yaml.safe_load(text)["auto"] == ["batch_size", "cache_latents"]
    webui = tab.resolve(tab.parse_values(tab_values), *SD1_FP16)
    comfy = _node_config(host, text, *SD1_FP16)
    assert not _same(comfy, webui, skip=("auto", "train_data_dir"))
    assert comfy.gradient_checkpointing is False and "gradient_checkpointing" not in comfy.auto
    assert "cache_latents" in comfy.auto  # the list's key, a checkbox in ComfyUI: imported as auto


def test_aliases_are_the_engines_table(host, monkeypatch):
    """Both hosts read kohya names through the engine's ALIASES (one table, as the CLI): a new alias works at once."""
    monkeypatch.setitem(engine_config.ALIASES, "unet_rank_test", "lora_rank")
    text = "unet_rank_test: 5\n"
    assert _node_config(host, text, *SD1_FP16).lora_rank == 5
    assert _tab_config(text, *SD1_FP16)[0].lora_rank == 5
    path = host / "cli.yaml"
    path.write_text(text)
    assert load_config(path).lora_rank == 5


def test_an_imported_file_is_checked_by_the_engine(host):
    with pytest.raises(ConfigError, match="did you mean"):
        _node_config(host, "lerning_rate: 0.001\n", *SD1_FP16)
    with pytest.raises(ConfigError, match="not valid YAML"):
        _node_config(host, "a: [1,\n", *SD1_FP16)
    with pytest.raises(ConfigError, match="key: value pairs"):
        _node_config(host, "- a\n- b\n", *SD1_FP16)
