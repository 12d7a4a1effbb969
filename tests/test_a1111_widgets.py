"""The tab's settings come from TrainConfig's metadata; widget values ⇄ config ⇄ YAML; caption tools; plan."""

import dataclasses

import pytest
import torch
import yaml
from a1111_stub.fixtures import webui_fixture  # noqa: F401 - the `webui` fixture
from PIL import Image

from loraloop.trainer.config import TrainConfig, field_help, load_config
from loraloop.trainer.errors import ConfigError
from loraloop.trainer.families import get_family


def test_every_engine_option_is_a_field_with_its_help():
    from loraloop.a1111 import widgets as form

    fields = {f.name: f for f in form.form_fields()}
    keys = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(fields) == (keys - set(form.HOST_OWNED)) | set(form.EXTRA_FIELDS)
    tips = form.tooltips()
    for name, meta in field_help().items():
        if name in form.HOST_OWNED:
            continue
        assert tips[name].startswith(meta["help"]), name  # hover help = the CLI/node help text
    assert fields["mixed_precision"].choices == ("auto", "no", "fp16", "bf16")
    assert fields["network_type"].choices == ("lora", "locon", "loha", "lokr")
    assert fields["lora_alpha"].kind == "float" and fields["lora_alpha"].optional and fields["lora_alpha"].minimum == 0
    assert fields["sample_prompts"].kind == "lines" and fields["target_modules"].kind == "list"
    assert fields["resolution"].default == 0 and "native" in fields["resolution"].tooltip
    assert [f.name for f in form.form_fields()][:3] == ["train_data_dir", "metadata_path", "recursive"]


def test_widget_values_to_config():
    from loraloop.a1111 import widgets as form

    values = form.default_values()
    values.update(lora_alpha=0, conv_rank=0.0, text_encoder_lr=0, max_train_steps=0, epochs=3.0, lora_rank=16.0,
                  target_modules="to_q, to_v", sample_prompts="a cat, sitting\na dog\n", max_grad_norm=0,
                  resume_lora="", train_data_dir="/data")
    settings = form.parse_values(values)
    assert settings.auto == {"resolution", "mixed_precision"}
    config = form.resolve(settings, get_family("sd2-v"), "v_prediction", torch.float32, base_model="/m/x.ckpt")
    assert (config.lora_alpha, config.conv_rank, config.text_encoder_lr, config.max_train_steps) == (None,) * 4
    assert config.lora_rank == 16 and isinstance(config.lora_rank, int) and config.epochs == 3
    assert config.target_modules == ["to_q", "to_v"]
    assert config.sample_prompts == ["a cat, sitting", "a dog"]  # prompts keep their commas
    assert (config.family, config.prediction_type, config.resolution) == ("sd2-v", "v_prediction", 768)
    assert config.base_model == "/m/x.ckpt" and config.max_grad_norm is None
    with pytest.raises(ConfigError, match="lora_rnak") as err:
        form.resolve(form.parse_values({"lora_rnak": 4}), get_family("sd1"), "epsilon", torch.float32)
    assert "lora_rank" in str(err.value)  # the nearest key is suggested
    with pytest.raises(ConfigError) as err:
        form.resolve(form.parse_values({"learning_rate": 5.0}), get_family("sd1"), "epsilon", torch.float32)
    assert err.value.key == "learning_rate"


def test_yaml_round_trip_and_kohya_aliases(tmp_path):
    from loraloop.a1111 import widgets as form

    config = TrainConfig(train_data_dir="/data/imgs", lora_rank=12, lora_alpha=6, learning_rate=5e-5,
                         sample_prompts=["a, b", "c"], target_modules=["to_k"], family="sd1",
                         prediction_type="epsilon", base_model="/models/a.safetensors", mixed_precision="fp16")
    text = form.export_yaml(config)
    values, notes = form.values_from_yaml(text + "preferred_weight: 0.6\n")
    assert values["lora_rank"] == 12 and values["lora_alpha"] == 6 and values["learning_rate"] == 5e-5
    assert values["sample_prompts"] == "a, b\nc" and values["target_modules"] == "to_k"
    assert values["preferred_weight"] == 0.6 and values["mixed_precision"] == "fp16"
    assert any("base_model" in n for n in notes) and "base_model" not in values
    # kohya names are accepted (network_dim → lora_rank) and typos named
    values, _ = form.values_from_yaml("network_dim: 32\ntrain_batch_size: 2\n")
    assert values == {"lora_rank": 32, "batch_size": 2}
    with pytest.raises(ConfigError, match="did you mean"):
        form.values_from_yaml("lerning_rate: 1e-4\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        form.values_from_yaml("a: [1,\n")


def test_exported_yaml_reproduces_the_run_in_the_cli(tmp_path):
    from loraloop.a1111 import widgets as form

    config = TrainConfig(train_data_dir=str(tmp_path), lora_rank=4, family="sd1", prediction_type="epsilon",
                         base_model="builtin:tiny-sd1")
    path = tmp_path / "run.yaml"
    path.write_text(form.export_yaml(config))
    assert load_config(path) == config


def test_caption_tools_preview_and_write_only_when_asked(tmp_path):
    from loraloop.a1111 import captions
    from loraloop.trainer.data import DatasetOptions

    folder = tmp_path / "ds"
    folder.mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (64, 64), "white").save(folder / f"{name}.png")
    (folder / "a.txt").write_text("1girl, red hair, smile", encoding="utf-8")
    (folder / "b.caption").write_text("1girl, blue hair", encoding="utf-8")  # c has no caption
    options = DatasetOptions(folder, trigger_word="mychar", min_bucket_reso=32, bucket_reso_steps=32, resolution=64,
                             caption_extensions=(".txt", ".caption"))
    edit = captions.CaptionEdit(prefix="photo, ", find="1girl", replace="woman", add_trigger=True)
    changes = {c.image.name: c for c in captions.plan_captions(options, edit)}
    assert changes["a.png"].after == "mychar, photo, woman, red hair, smile"
    assert changes["b.png"].after == "mychar, photo, woman, blue hair"
    assert changes["c.png"].after == "mychar, photo"
    assert {c.sidecar.name for c in changes.values()} == {"a.txt", "b.txt", "c.txt"}
    assert "3 of 3 captions change" in captions.preview_text(list(changes.values()), folder)
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "a.txt", "b.caption", "b.png", "c.png"]  # nothing yet
    written, skipped = captions.write_captions(list(changes.values()))
    assert sorted(p.name for p in written) == ["a.txt", "b.txt", "c.txt"] and not skipped
    assert (folder / "b.txt").read_text(encoding="utf-8") == "mychar, photo, woman, blue hair\n"
    assert (folder / "b.caption").read_text(encoding="utf-8") == "1girl, blue hair"  # the old file is left alone
    regex = captions.CaptionEdit(find=r"\bhair\b", replace="hairstyle", regex=True)
    assert regex.apply("red hair, hairband") == "red hairstyle, hairband"
    with pytest.raises(ConfigError, match="regular expression"):
        captions.CaptionEdit(find="(", regex=True).apply("x")


def test_captions_from_a_metadata_file_are_not_written(tmp_path):
    from loraloop.a1111 import captions
    from loraloop.trainer.data import DatasetOptions

    folder = tmp_path / "ds"
    folder.mkdir()
    Image.new("RGB", (64, 64), "white").save(folder / "a.png")
    (folder / "metadata.csv").write_text("filename,prompt\na.png,a white square\n", encoding="utf-8")
    options = DatasetOptions(folder, min_bucket_reso=32, bucket_reso_steps=32, resolution=64)
    (change,) = captions.plan_captions(options, captions.CaptionEdit(suffix=", plain"))
    assert change.sidecar is None and "metadata.csv" in change.reason
    written, skipped = captions.write_captions([change])
    assert written == [] and skipped == [change] and not (folder / "a.txt").exists()


def colour_dataset(folder):
    """a (green, tall), b (red, wide), c (blue, square, captioned already), created out of file-name order."""
    folder.mkdir()
    for name, size, colour in (("b.png", (96, 64), "red"), ("a.png", (64, 96), "lime"), ("c.png", (64, 64), "blue")):
        Image.new("RGB", size, colour).save(folder / f"{name}")
    (folder / "c.txt").write_text("my own caption\n", encoding="utf-8")
    return folder


def caption_fields(folder):
    from loraloop.a1111 import widgets as form
    from loraloop.a1111.actions import TabActions

    names = [f.name for f in form.form_fields()]
    values = form.default_values()
    values.update(train_data_dir=str(folder), trigger_word="sks", resolution=64, min_bucket_reso=32,
                  max_bucket_reso=128, bucket_reso_steps=32)
    return TabActions(names), [values[n] for n in names]


def test_caption_with_the_webuis_interrogators_writes_only_after_confirmation(webui, tmp_path):
    """"Caption with" runs the webui's own interrogators (shared.interrogator.interrogate, deepbooru.model.tag) in
    its GPU queue on the images without a caption, shows editable proposals, and writes nothing until Write; Write
    keeps existing files unless overwrite is ticked."""
    from modules import deepbooru

    from loraloop.a1111 import captions

    folder = colour_dataset(tmp_path / "ds")
    actions, fields = caption_fields(folder)
    clip, booru = (next(k for k, v in captions.INTERROGATORS.items() if v == kind) for kind in ("clip", "deepbooru"))
    interrogator = webui.shared.interrogator
    real, locked = interrogator.interrogate, []
    interrogator.interrogate = lambda image: locked.append(webui.call_queue.queue_lock._is_owned()) or real(image)
    edit = ["", ", plain", "", "", False, True]  # prefix, suffix, find, replace, regex, trigger word first
    proposals, status = actions.caption_with(*fields, *edit, clip, False)
    assert proposals.splitlines() == ["a.png: sks, a green square, flat colour, minimalism, plain",
                                      "b.png: sks, a red square, flat colour, minimalism, plain"]
    assert interrogator.calls == [(64, 96), (96, 64)] and locked == [True, True]  # in the queue, c left out
    assert "2 caption(s) proposed" in status and "1 image(s) already have a caption file" in status
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "b.png", "c.png", "c.txt"]  # nothing written yet

    edited = proposals.replace("minimalism", "flat design") + "\n\nc.png: sks, blue\n"
    status = actions.write_proposed(*fields, edited, False)
    assert "Wrote 2 caption file(s)" in status and "c.txt exists and was kept" in status
    assert (folder / "a.txt").read_text(encoding="utf-8") == "sks, a green square, flat colour, flat design, plain\n"
    assert (folder / "c.txt").read_text(encoding="utf-8") == "my own caption\n"

    proposals, status = actions.caption_with(*fields, "", "", "", "", False, False, booru, True)  # overwrite: all
    lines = proposals.splitlines()
    assert deepbooru.model.calls == 3 and [line.split(":")[0] for line in lines] == ["a.png", "b.png", "c.png"]
    assert lines[2] == "c.png: blue background, no humans, simple background"
    assert "Wrote 3 caption file(s)" in actions.write_proposed(*fields, proposals, True)
    assert (folder / "c.txt").read_text(encoding="utf-8") == "blue background, no humans, simple background\n"
    assert not list(folder.glob(".*.tmp"))

    assert "names no image" in actions.write_proposed(*fields, "zzz.png: x", True)
    assert "listed twice" in actions.write_proposed(*fields, "a.png: x\na.png: y", True)
    assert "ERROR: choose" in actions.caption_with(*fields, *edit, "nothing", False)[1]


def test_caption_with_reports_failures_and_stops_on_interrupt(webui, tmp_path):
    from loraloop.a1111 import captions

    folder = colour_dataset(tmp_path / "ds")
    actions, fields = caption_fields(folder)
    clip = next(k for k, v in captions.INTERROGATORS.items() if v == "clip")
    interrogator = webui.shared.interrogator
    interrogator.fail_on = (64, 96)  # a.png: the webui appends "<error>" instead of raising
    proposals, status = actions.caption_with(*fields, "", "", "", "", False, False, clip, True)
    assert [line.split(":")[0] for line in proposals.splitlines()] == ["b.png", "c.png"]
    assert "failed on a.png" in status
    interrogator.fail_on, real = None, interrogator.interrogate

    def interrupted_after_one(image):
        text = real(image)
        webui.shared.state.interrupt()  # the webui's Interrupt, clicked while the first image was interrogated
        return text

    interrogator.interrogate = interrupted_after_one
    webui.shared.state.interrupt()  # an old click does not stop the next run
    proposals, status = actions.caption_with(*fields, "", "", "", "", False, False, clip, True)
    assert len(proposals.splitlines()) == 1 and "Interrupted" in status
    assert not webui.shared.state.interrupted
    interrogator.interrogate = lambda image: (_ for _ in ()).throw(RuntimeError("no BLIP weights"))
    proposals, status = actions.caption_with(*fields, "", "", "", "", False, False, clip, True)
    assert proposals == "" and "RuntimeError: no BLIP weights" in status
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "b.png", "c.png", "c.txt"]


def test_actions_without_a_model(webui, tmp_path):
    """Dataset check, plan, export and import work before any model is loaded (and in Forge)."""
    from loraloop.a1111 import widgets as form
    from loraloop.a1111.actions import UNCHANGED, TabActions, model_info

    folder = tmp_path / "ds"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (96, 64), "white").save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"tag{i}, shared", encoding="utf-8")
    names = [f.name for f in form.form_fields()]
    actions = TabActions(names)
    values = form.default_values()
    values.update(train_data_dir=str(folder), resolution=64, min_bucket_reso=32, max_bucket_reso=128,
                  bucket_reso_steps=32, output_name="exp", max_train_steps=7)
    args = [values[n] for n in names]
    assert "No model loaded" in model_info()
    report = actions.check_dataset(*args)
    assert "images: 3 usable of 3 found" in report and "Result: OK" in report
    plan = actions.plan(*args)
    assert "3 images" in plan and "7 steps" in plan and "load a Stable Diffusion checkpoint" in plan
    text, path, note = actions.export_yaml(*args)
    assert yaml.safe_load(text)["max_train_steps"] == 7 and path.endswith("exp.yaml") and "auto" in note
    updates, note = actions.import_yaml("lora_rank: 24\nbase_model: x.ckpt\n")
    assert updates[names.index("lora_rank")] == 24 and "base_model" in note
    assert sum(u is not UNCHANGED for u in updates) == 1
    updates, note = actions.import_file(path)
    assert updates[names.index("max_train_steps")] == 7
    bad = dict(values, train_data_dir=str(tmp_path / "missing"))
    assert "ERROR" in actions.check_dataset(*[bad[n] for n in names]) or "FAIL" in actions.check_dataset(
        *[bad[n] for n in names])


def test_plan_with_a_loaded_model_uses_the_engine_planner(webui, tmp_path):
    from a1111_stub import models

    from loraloop.a1111 import widgets as form
    from loraloop.a1111.actions import TabActions

    folder = tmp_path / "ds"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), "white").save(folder / f"{i}.png")
    webui.load(models.build_sd("sd1"))
    names = [f.name for f in form.form_fields()]
    values = form.default_values()
    values.update(train_data_dir=str(folder), resolution=64, min_bucket_reso=32, bucket_reso_steps=32,
                  max_train_steps=3, vram_budget_gb=8)
    text = TabActions(names).plan(*[values[n] for n in names])
    assert "3 steps" in text and "Memory plan:" in text and "estimated peak" in text, text
    assert "VRAM tiers" in text, text


@pytest.fixture
def auto_checkpointing(monkeypatch):
    """The host default of gradient_checkpointing is "auto" (the memory planner decides), whichever engine is here."""
    from loraloop.trainer import config

    monkeypatch.setitem(config.HOST_DEFAULTS, "gradient_checkpointing", "auto")


def test_a_plannable_bool_defaulting_to_auto_is_an_auto_on_off_dropdown(auto_checkpointing):
    from loraloop.a1111 import widgets as form

    sd1 = (get_family("sd1"), "epsilon", torch.float32)
    fields = {f.name: f for f in form.form_fields()}
    gc = fields["gradient_checkpointing"]
    assert (gc.kind, gc.choices, gc.default) == ("choice", ("auto", "on", "off"), "auto")
    assert "memory planner" in gc.tooltip and "gradient_checkpointing" in form.auto_bool_fields()
    assert fields["flip_aug"].kind == "bool"  # not plannable: a checkbox
    # the tab's defaults keep the engine's `auto` list (it is sent with every run) and add the dropdown's key
    defaults = form.default_values()
    assert defaults["auto"] == ", ".join(TrainConfig().auto)
    config = form.resolve(form.parse_values(defaults), *sd1)
    assert set(config.auto) == set(TrainConfig().auto) | {"gradient_checkpointing"}
    for choice, value in (("on", True), ("off", False)):
        config = form.resolve(form.parse_values({**defaults, "gradient_checkpointing": choice}), *sd1)
        assert config.gradient_checkpointing is value and "gradient_checkpointing" not in config.auto
        assert set(config.auto) == set(TrainConfig().auto) - {"gradient_checkpointing"}  # the rest stays planned
    # "auto" wins over an `auto` list that does not name the key; an empty list plans nothing else
    config = form.resolve(form.parse_values({**defaults, "auto": "batch_size", "gradient_checkpointing": "auto"}), *sd1)
    assert config.auto == ["batch_size", "gradient_checkpointing"]
    config = form.resolve(form.parse_values({**defaults, "auto": "", "gradient_checkpointing": "off"}), *sd1)
    assert config.auto == [] and config.gradient_checkpointing is False
    # API values without an `auto` list: a bool is an explicit choice, "auto" hands the key to the planner
    assert "gradient_checkpointing" not in form.resolve(form.parse_values({"gradient_checkpointing": True}), *sd1).auto
    assert "gradient_checkpointing" in form.resolve(form.parse_values({"gradient_checkpointing": "auto"}), *sd1).auto
    assert "cache_latents" in form.resolve(form.parse_values({"cache_latents": "auto"}), *sd1).auto
    with pytest.raises(ConfigError) as err:
        form.parse_values({"gradient_checkpointing": "sometimes"})
    assert err.value.key == "gradient_checkpointing"
    # a switch the planner cannot choose: the error says which keys may be auto (not "may not be empty")
    with pytest.raises(ConfigError, match="cannot be auto") as err:
        form.resolve(form.parse_values({"flip_aug": "auto"}), *sd1)
    assert err.value.key == "flip_aug"


def test_auto_on_off_through_yaml(auto_checkpointing):
    from loraloop.a1111 import widgets as form

    planned = TrainConfig(auto=["batch_size", "gradient_checkpointing"])
    assert form.config_to_values(planned)["gradient_checkpointing"] == "auto"
    values, _ = form.values_from_yaml(form.export_yaml(planned))
    assert values["gradient_checkpointing"] == "auto" and values["auto"] == "batch_size, gradient_checkpointing"
    values, _ = form.values_from_yaml(form.export_yaml(TrainConfig(auto=[], gradient_checkpointing=True)))
    assert values["gradient_checkpointing"] == "on"
    values, _ = form.values_from_yaml("gradient_checkpointing: auto\n")
    assert values == {"gradient_checkpointing": "auto"}
    values, _ = form.values_from_yaml("auto: [batch_size]\n")  # the list decides the dropdown too
    assert values == {"auto": "batch_size", "gradient_checkpointing": "off"}
    # values entered without a model export YAML the CLI reads back with the same plan
    exported = yaml.safe_load(form.export_unresolved(form.parse_values(form.default_values())))
    assert exported["gradient_checkpointing"] == "auto" and "gradient_checkpointing" in exported["auto"]


def test_a_checkbox_default_stays_a_checkbox(monkeypatch):
    """Before the engine's host default became "auto" (or if it goes back to a bool), the setting is a checkbox."""
    from loraloop.a1111 import widgets as form
    from loraloop.trainer import config as engine_config

    monkeypatch.setitem(engine_config.HOST_DEFAULTS, "gradient_checkpointing", True)
    field = {f.name: f for f in form.form_fields()}["gradient_checkpointing"]
    assert (field.kind, field.default) == ("bool", True) and form.auto_bool_fields() == ()
    config = form.resolve(form.parse_values({**form.default_values(), "gradient_checkpointing": True}),
                          get_family("sd1"), "epsilon", torch.float32)
    assert config.gradient_checkpointing is True
