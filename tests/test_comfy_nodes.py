"""Node schemas, the entry point and the nodes end to end, against the stand-in (tests/comfy_stub)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from comfy_stub.harness import FAST, run_node, setup_host  # puts the stub first

# isort: split
import pytest
import torch
from comfy_stub import stub_models
from safetensors import safe_open

from loraloop.nodes import definitions as nodes
from loraloop.nodes.prompt import parse_lora_tags
from loraloop.nodes.widgets import HOST_OWNED
from loraloop.trainer.config import TrainConfig, field_help
from loraloop.trainer.errors import ConfigError, DatasetError, LoraFileError

ROOT = Path(__file__).resolve().parent.parent
# Built-in node ids of ComfyUI 0.12.3 that a custom node must not reuse (docs/hosts.md §1.1).
CORE_IDS = {"TrainLoraNode", "LoraModelLoader", "SaveLoRA", "LossGraphNode", "LoadImageDataSetFromFolder",
            "LoadImageTextDataSetFromFolder", "MakeTrainingDataset", "ResolutionBucket", "SaveTrainingDataset",
            "LoadTrainingDataset", "LoraLoader", "CLIPTextEncode", "Caption", "LoadDataset", "TrainLoRA"}


@pytest.fixture
def host(tmp_path):
    torch.set_flush_denormal(True)
    yield setup_host(tmp_path)
    torch.set_flush_denormal(False)


def config_widget_defaults():
    """LoRATrainConfig's widget values as a new node has them."""
    return {i.id: i.default for i in nodes.LoRATrainConfig.GET_SCHEMA().inputs if i.default is not None}


def schemas():
    return [n.GET_SCHEMA() for n in nodes.NODES]


def test_schemas_validate_with_prefixed_ids_tooltips_and_one_category(host):
    found = schemas()
    assert [s.display_name for s in found] == ["LoadDataset", "Caption", "LoRATrainConfig", "MemoryPlan", "TrainLoRA",
                                               "SaveLoRA", "ResizeLoRA", "LoRAPrompt"]
    for s in found:
        assert s.node_id.startswith("LoRALoop_") and s.node_id not in CORE_IDS
        assert s.category == "LoRA Loop" and s.description
        for i in s.inputs:
            if i.get_io_type() not in ("MODEL", "CLIP", "VAE", "LORALOOP_DATASET") and i.id not in ("model", "clip"):
                assert i.tooltip, f"{s.node_id}.{i.id} has no tooltip"
        info = s.get_v1_info()
        assert info["output"] and info["name"] == s.node_id


def test_config_widgets_come_from_trainconfig_metadata(host):
    config = nodes.LoRATrainConfig.GET_SCHEMA()
    widgets = {i.id: i for i in config.inputs}
    for name, meta in field_help().items():
        assert (name in widgets) != (name in HOST_OWNED), f"{name}: exactly one of widget or host-owned"
        if name in widgets:
            assert widgets[name].tooltip.startswith(meta["help"])
        if meta.get("choices") and name in widgets:
            assert {c for c in meta["choices"] if c is not None} <= set(widgets[name].options)
    assert widgets["lora_rank"].min == 1 and widgets["lora_rank"].max == 1024 and widgets["lora_rank"].default == 8
    assert widgets["learning_rate"].default == TrainConfig().learning_rate
    keys = {f.name for f in dataclasses.fields(TrainConfig)}
    assert keys == set(widgets) - {"import_yaml", "export_yaml"} | set(HOST_OWNED)


# ComfyUI imports a pack by path under the path itself (dots replaced): relative imports must resolve under that name.
COMFY_MODULE_NAME = "/opt/ComfyUI/custom_nodes/loraloop_x_git"


def test_entry_point_is_cheap_outside_comfyui_and_says_what_it_needs():
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location(sys.argv[2], sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); sys.modules[sys.argv[2]] = m; spec.loader.exec_module(m); "
            "heavy = [n for n in ('torch', 'comfy', 'comfy_api', 'diffusers', 'peft') if n in sys.modules]; "
            "assert not heavy, heavy; assert not hasattr(m, 'NODE_CLASS_MAPPINGS'); print(m.WEB_DIRECTORY); "
            "m.comfy_entrypoint")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "__init__.py"), COMFY_MODULE_NAME],
                         capture_output=True, text=True, cwd="/")
    assert out.stdout.strip() == "./web" and (ROOT / "web" / "loraloop.js").is_file()
    assert out.returncode != 0 and "need ComfyUI 0.12.3 or newer" in out.stderr


def test_entry_point_exposes_v3_inside_comfyui():
    code = ("import importlib.util, sys; sys.path.insert(0, sys.argv[2]); "
            "spec = importlib.util.spec_from_file_location(sys.argv[3], sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); sys.modules[sys.argv[3]] = m; spec.loader.exec_module(m); "
            "import asyncio; ext = asyncio.run(m.comfy_entrypoint()); "
            "assert not hasattr(m, 'NODE_CLASS_MAPPINGS') and 'loraloop' not in sys.modules; "
            "print(len(asyncio.run(ext.get_node_list())))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "__init__.py"), str(ROOT / "tests" / "comfy_stub"),
                          COMFY_MODULE_NAME], capture_output=True, text=True, cwd="/", check=True,
                         env={**os.environ, "PYTHONNOUSERSITE": "1"})
    assert out.stdout.strip() == str(len(nodes.NODES))


def test_load_dataset_and_caption(host):
    out = run_node(nodes.LoadDataset, folder="style", recursive=False, caption_extension=".txt")
    dataset, summary, images = out.args
    assert images.shape == (12, 512, 512, 3)
    assert "images: 12 usable" in summary and "captions: 12/12" in summary and str(host) not in summary
    out = run_node(nodes.Caption, dataset=[dataset], source=["existing"], trigger_word=["flatstyle"], prefix=[""],
                   suffix=["simple"], find=["flat style, "], replace=[""], write_sidecars=[True],
                   overwrite_sidecars=[False])
    new, text = out.args
    first = text.splitlines()[0]
    assert first == "flatstyle, a green circle on a blue background, simple"
    assert (host / "input" / "style" / "img_001.txt").read_text().strip() == first
    assert new.trigger_word == "flatstyle" and new.scan().records[0].caption == first
    with pytest.raises(ConfigError, match="already exist"):
        run_node(nodes.Caption, dataset=[dataset], source=["none"], trigger_word=["x"], prefix=[""], suffix=[""],
                 find=[""], replace=[""], write_sidecars=[True], overwrite_sidecars=[False])
    with pytest.raises(ConfigError, match=r"has 2 strings but .* 12 images"):
        run_node(nodes.Caption, dataset=[dataset], source=["strings"], trigger_word=[""], prefix=[""], suffix=[""],
                 find=[""], replace=[""], write_sidecars=[False], overwrite_sidecars=[False], captions=["a", "b"])


@pytest.mark.parametrize("folder", ["../outside", "/etc", "C:\\data", "style/../../x"])
def test_dataset_paths_cannot_escape_the_input_folder(host, folder):
    with pytest.raises((ConfigError, DatasetError), match=r"invalid dataset folder|not found"):
        run_node(nodes.LoadDataset, folder=folder, recursive=False, caption_extension=".txt")


def test_bad_dataset_is_a_clear_node_error(host):
    (host / "input" / "empty").mkdir()
    with pytest.raises(DatasetError, match="images: 0 usable"):
        run_node(nodes.LoadDataset, folder="empty", recursive=False, caption_extension=".txt")


def test_config_yaml_import_export(host):
    (host / "input" / "cfg.yaml").write_text("lora_rank: 4\nnetwork_dim: 4\nlearning_rate: 0.0005\noutput_dir: /abs\n")
    widgets = config_widget_defaults()
    config, text = run_node(nodes.LoRATrainConfig, **{**widgets, "import_yaml": "cfg.yaml", "export_yaml": "mine"}).args
    assert config.values["lora_rank"] == 4 and config.values["learning_rate"] == 0.0005
    assert "output_dir" not in config.values and {"resolution", "mixed_precision"} <= config.auto
    assert (host / "output" / "loraloop" / "mine.yaml").read_text() == text
    with pytest.raises(ConfigError, match="invalid import_yaml"):
        run_node(nodes.LoRATrainConfig, **{**widgets, "import_yaml": "../secret.yaml"})


def test_train_save_and_prompt_end_to_end(host, caplog):
    model, clip, vae = stub_models.build("sd15")
    dataset = run_node(nodes.LoadDataset, folder="style", recursive=False, caption_extension=".txt",
                       trigger_word="flatstyle").args[0]
    widgets = config_widget_defaults()
    config = run_node(nodes.LoRATrainConfig, **{**widgets, **FAST, "max_train_steps": 2}).args[0]
    out = run_node(nodes.TrainLoRA, model=model, clip=clip, vae=vae, dataset=dataset, config=config, name="flat",
                   save_on_cancel=True)
    lora, model_out, _clip_out, loss, steps = out.args
    assert steps == 2 and loss.shape[0] == 1 and loss.shape[-1] == 3 and model_out is not model
    names = [run_node(nodes.SaveLoRA, lora=lora, name="../flat style?", subfolder="").args[0] for _ in range(2)]
    assert names == ["flat style.safetensors", "flat style_2.safetensors"]  # sanitized, unique, inside loras
    folder = host / "models" / "loras"
    with safe_open(str(folder / names[0]), framework="pt") as fh:
        meta = fh.metadata()
        assert all(k.startswith("lora_unet_") for k in fh.keys())  # noqa: SIM118 - safe_open is no dict
    assert meta["ss_network_module"] == "networks.lora" and meta["modelspec.trigger_phrase"] == "flatstyle"
    card = json.loads((folder / "flat style.json").read_text())
    assert card["trigger_words"] == ["flatstyle"] and card["sd version"] == "SD1"
    assert (folder / "flat style.preview.png").is_file()
    import folder_paths

    assert names[0] in folder_paths.get_filename_list("loras")  # LoraLoader lists it on the next queue
    with pytest.raises(ConfigError, match="invalid LoRA subfolder"):
        run_node(nodes.SaveLoRA, lora=lora, name="x", subfolder="../../etc")
    cond, model2, _clip2, clean = run_node(nodes.LoRAPrompt, model=model, clip=clip,
                                          text="<lora:flat style:0.8> flatstyle, a star").args
    assert clean == "flatstyle, a star" and cond[0][0].shape[1] == 77
    strengths = {v[0][0] for v in model2.patches.values()}
    assert strengths == {0.8} and not model.patches and "lora key not loaded" not in caplog.text
    with pytest.raises(LoraFileError, match="no LoRA called 'nope'"):
        run_node(nodes.LoRAPrompt, model=model, clip=clip, text="<lora:nope> x")


def test_resize_lora_node(host, caplog):
    """ResizeLoRA takes TrainLoRA's LORA_MODEL or a file of models/loras; its output loads through the LoRA loader
    with every key taken, and the saved file holds the ranks the report gives."""
    import comfy.sd

    from loraloop.trainer.resize import read_modules

    model, clip, vae = stub_models.build("sd15")
    dataset = run_node(nodes.LoadDataset, folder="style", recursive=False, caption_extension=".txt",
                       trigger_word="flatstyle").args[0]
    config = run_node(nodes.LoRATrainConfig, **{**config_widget_defaults(), **FAST, "max_train_steps": 2}).args[0]
    lora = run_node(nodes.TrainLoRA, model=model, clip=clip, vae=vae, dataset=dataset, config=config, name="flat",
                    save_on_cancel=False).args[0]
    small, report = run_node(nodes.ResizeLoRA, mode="rank", value=2.0, lora=lora, save_as="flat small").args
    assert set(small) == set(lora) and small.trigger_words == ["flatstyle"] and "kept energy" in report
    assert {v.shape[0] for k, v in small.items() if k.endswith("lora_down.weight")} == {2}
    assert "saved flat small.safetensors in models/loras" in report
    saved = host / "models" / "loras" / "flat small.safetensors"
    assert (host / "models" / "loras" / "flat small.json").is_file()  # SaveLoRA's card too
    with safe_open(str(saved), framework="pt") as fh:
        assert fh.metadata()["ss_network_dim"] == "2" and fh.metadata()["modelspec.trigger_phrase"] == "flatstyle"
    model2, _ = comfy.sd.load_lora_for_models(model, clip, small, 1.0, 1.0)
    stems = {k.split(".", 1)[0] for k in small}
    assert set(model2.patches) == stems and "lora key not loaded" not in caplog.text
    # from a file of models/loras, by the name LoraLoader lists; to a size
    out, report = run_node(nodes.ResizeLoRA, mode="max_mb", value=0.06, lora_name="flat small.safetensors").args
    modules, _ = read_modules(dict(out))
    assert {m.name: m.rank for m in modules} == {line.split()[0]: int(line.split()[3])
                                                 for line in report.splitlines()[1:len(modules) + 1]}
    assert "at most 0.06 MB" in report and "saved" not in report
    with pytest.raises(ConfigError, match="connect a LORA_MODEL"):
        run_node(nodes.ResizeLoRA, mode="energy", value=0.9)
    with pytest.raises(ConfigError, match="energy must be"):
        run_node(nodes.ResizeLoRA, mode="energy", value=2.0, lora=lora)


def test_unsupported_family_is_a_clear_error(host):
    from loraloop.trainer.errors import UnsupportedModelError

    model, clip, vae = stub_models.build("wan")
    dataset = run_node(nodes.LoadDataset, folder="style", recursive=False, caption_extension=".txt").args[0]
    with pytest.raises(UnsupportedModelError, match=r"WAN21_T2V.*SD 1.x.*Flux.1"):
        run_node(nodes.TrainLoRA, model=model, clip=clip, vae=vae, dataset=dataset, name="x", save_on_cancel=False)


def test_dynamic_vram_patcher_is_loaded_without_full_load(host):
    import comfy.model_management as mm

    from loraloop.nodes.bundle import ComfyBundle
    from loraloop.nodes.training import _load_for_training

    model, clip, vae = stub_models.build("sd15", dynamic=True)
    with torch.inference_mode(), torch.inference_mode(False):
        _load_for_training(ComfyBundle(model, clip, vae), None, dynamic_captions=True)
    assert mm.load_calls[-1] == ([model, clip.patcher], 1e20, False)


@pytest.mark.parametrize(("text", "clean", "tags"), [
    ("<lora:a> x", "x", [("a", 1.0, 1.0)]),
    ("x, <lora:sub/b:0.5>, y", "x, y", [("sub/b", 0.5, 0.5)]),
    ("<LORA:c:1:0.2>pic", "pic", [("c", 1.0, 0.2)]),
])
def test_lora_tags(text, clean, tags):
    got_clean, got = parse_lora_tags(text)
    assert got_clean == clean and [(t.name, t.unet, t.te) for t in got] == tags


def _dataset_and_config(**widgets):
    dataset = run_node(nodes.LoadDataset, folder="style", recursive=False, caption_extension=".txt").args[0]
    defaults = config_widget_defaults()
    config = run_node(nodes.LoRATrainConfig, **{**defaults, **FAST, **widgets}).args[0]
    return dataset, config


def test_gradient_checkpointing_is_auto_on_off_and_auto_goes_to_the_planner(host):
    spec = next(i for i in nodes.LoRATrainConfig.GET_SCHEMA().inputs if i.id == "gradient_checkpointing")
    assert spec.as_dict()["options"] == ["auto", "on", "off"] and spec.default == "auto"
    from loraloop.trainer.families import get_family

    def resolved(value):
        _, config = _dataset_and_config(gradient_checkpointing=value)
        return config.resolve(get_family("sd1"), "epsilon", torch.float32)

    auto, on, off = resolved("auto"), resolved("on"), resolved("off")
    assert "gradient_checkpointing" in auto.auto and {"batch_size", "accumulation_steps"} <= set(auto.auto)
    assert on.gradient_checkpointing is True and "gradient_checkpointing" not in on.auto
    assert off.gradient_checkpointing is False and "gradient_checkpointing" not in off.auto
    assert "resolution" not in auto.auto and "lora_rank" not in auto.auto  # what is learned is the user's choice


def _plan_text(model, dataset, config):
    return run_node(nodes.MemoryPlan, model=model, dataset=dataset, config=config).args[0]


def test_memory_plan_node_shows_the_plan_and_follows_the_free_memory(host):
    """Plenty of free memory: the planner leaves checkpointing off (faster); little: it turns it on and says why."""
    import comfy.model_management as mm

    model, _, _ = stub_models.build("sd15")
    dataset, config = _dataset_and_config(gradient_checkpointing="auto", resolution=512, min_bucket_reso=256,
                                          max_bucket_reso=512)
    mm.FREE_MEMORY = 64 * 2**30
    roomy = _plan_text(model, dataset, config)
    assert "estimated peak" in roomy and "seconds per step" in roomy and "fits" in roomy
    assert "gradient_checkpointing False" in roomy and "changed:           nothing" in roomy
    assert "VRAM tiers" in roomy and " 8 GB  fp8" in roomy  # the same tier table as `loraloop plan`
    mm.FREE_MEMORY = int(1.4 * 2**30)  # SD1.5 at 512 px with the weights resident: fits only with checkpointing
    tight = _plan_text(model, dataset, config)
    assert "gradient_checkpointing True" in tight and "gradient_checkpointing: False → True" in tight, tight
    assert mm.load_calls == []  # planning loads nothing


def test_train_lora_that_cannot_fit_stops_before_encoding_with_advice(host):
    import comfy.model_management as mm

    model, clip, vae = stub_models.build("sd15")
    dataset, config = _dataset_and_config(gradient_checkpointing="off")
    mm.FREE_MEMORY = 50 * 2**20
    calls = []
    vae.encode = lambda *a, **k: calls.append("encode")
    from loraloop.trainer.errors import OutOfMemory

    with pytest.raises(OutOfMemory, match=r"does not fit in the 0\.05 GB.*widgets set to 'auto'") as info:
        run_node(nodes.TrainLoRA, model=model, clip=clip, vae=vae, dataset=dataset, config=config, name="x",
                 save_on_cancel=False)
    assert "free" in str(info.value) and calls == [] and mm.load_calls == []


def test_train_lora_applies_the_plan_and_reports_it(host):
    import comfy.model_management as mm
    import server

    model, clip, vae = stub_models.build("sd15")
    dataset, config = _dataset_and_config(gradient_checkpointing="auto", max_train_steps=1, resolution=192,
                                          max_bucket_reso=192)
    mm.FREE_MEMORY = int(0.2 * 2**30)  # an SD1.5 plan at 192 px: 0.28 GB without checkpointing, 0.09 GB with
    out = run_node(nodes.TrainLoRA, model=model, clip=clip, vae=vae, dataset=dataset, config=config, name="p",
                   save_on_cancel=False)
    shown = out.ui.as_dict()["text"][0]
    texts = [m for m in server.PromptServer.instance.messages if "memory plan" in str(m)]
    assert texts, "the plan is sent to the node as progress text"
    assert "memory plan" in shown and "gradient_checkpointing True" in shown
    assert json.loads(out.args[0].metadata["ss_gradient_checkpointing"].lower()) is True


def test_predict_asks_for_sdpa_attention_through_the_override(host):
    """ComfyUI's CPU default is sub-quadratic attention (slower backward; sage/flash builds may have none): the bundle
    passes transformer_options["optimized_attention_override"], which, under 0.12.3's `wrap_attn` rules (mirrored in
    the stand-in), runs SDPA instead of the default. The stand-in's ldm UNet has its own attention, so that the real
    UNet's attention calls go through it is checked only in a real ComfyUI (bench/README.md: SDPA vs sub-quadratic)."""
    from comfy.ldm.modules import attention

    from loraloop.nodes.bundle import ComfyBundle
    from loraloop.trainer.bundle import Conditioning

    model, _, _ = stub_models.build("sd15")
    with torch.inference_mode(False), torch.no_grad():
        bundle = ComfyBundle(model, None, None)
        bundle.predict(torch.randn(1, 4, 8, 8), torch.tensor([10]), Conditioning(torch.randn(1, 77, 32)))
    options = bundle.base_model.last_transformer_options
    override = options["optimized_attention_override"]
    q, k, v = (torch.randn(2, 16, 64) for _ in range(3))
    attention.calls.clear()
    got = attention.optimized_attention(q, k, v, 4, transformer_options=options)
    want = attention.attention_sub_quad(q, k, v, 4)
    assert attention.calls == ["pytorch", "sub_quad"] and torch.allclose(got, want, atol=1e-5)
    assert callable(override)


def test_load_dataset_scans_the_folder_once(host, monkeypatch):
    from loraloop.trainer.data import report as report_module

    calls = []
    real = report_module.scan_dataset
    monkeypatch.setattr(report_module, "scan_dataset", lambda options: calls.append(options) or real(options))
    out = run_node(nodes.LoadDataset, folder="style", recursive=False, caption_extension=".txt")
    assert len(calls) == 1 and "12 images" in out.args[1]


def test_exported_yaml_imports_back_to_the_same_config(host):
    """`key: auto` survives export → import (resolution/mixed_precision follow the model, the planner keeps
    gradient_checkpointing), and kohya names in an imported file are used, not dropped."""
    from loraloop.trainer.families import get_family

    widgets = config_widget_defaults()
    first, text = run_node(nodes.LoRATrainConfig, **{**widgets, "lora_rank": 12, "export_yaml": "round"}).args
    assert "gradient_checkpointing: auto" in text and "resolution: auto" in text
    (host / "input" / "round.yaml").write_text((host / "output" / "loraloop" / "round.yaml").read_text())
    again = run_node(nodes.LoRATrainConfig, **{**widgets, "import_yaml": "round.yaml"}).args[0]
    sdxl = (get_family("sdxl"), "epsilon", torch.float16)
    assert again.resolve(*sdxl) == first.resolve(*sdxl)
    assert again.resolve(*sdxl).resolution == 1024 and again.resolve(*sdxl).mixed_precision == "fp16"
    assert "gradient_checkpointing" in again.resolve(*sdxl).auto
    (host / "input" / "kohya.yaml").write_text("network_dim: 6\nnetwork_alpha: 3\n")
    kohya = run_node(nodes.LoRATrainConfig, **{**widgets, "import_yaml": "kohya.yaml"}).args[0]
    assert kohya.values["lora_rank"] == 6 and kohya.values["lora_alpha"] == 3


def test_load_dataset_leaves_buckets_to_the_run_which_shows_its_own(host):
    """LoadDataset runs before the config and the model are known: its summary shows the image sizes and says that
    buckets come from LoRATrainConfig at training time (no table at a resolution the run may not use); TrainLoRA prints
    the buckets of the run (here 64 px)."""
    import server
    from PIL import Image

    summary = run_node(nodes.LoadDataset, folder="style", recursive=False, caption_extension=".txt").args[1]
    assert "Buckets" not in summary and "512x512" not in summary
    assert "buckets: decided when TrainLoRA runs" in summary and "image sizes: 64x64" in summary
    assert summary.index("image sizes") < summary.index("Result:")
    small = host / "input" / "small"  # 40 px: too small for a 512 px run's buckets, fine for a 64 px one
    small.mkdir()
    Image.new("RGB", (40, 40), "white").save(small / "a.png")
    assert "image sizes: 40x40 (1)" in run_node(nodes.LoadDataset, folder="small", recursive=False,
                                                caption_extension=".txt").args[1]
    model, clip, vae = stub_models.build("sd15")
    dataset, config = _dataset_and_config(enable_bucket=True, max_train_steps=1)
    run_node(nodes.TrainLoRA, model=model, clip=clip, vae=vae, dataset=dataset, config=config, name="b",
             save_on_cancel=False, preview_steps=0)
    texts = [m[1]["text"] for m in server.PromptServer.instance.messages if m[0] == "progress_text"]
    table = next(t for t in texts if "buckets:" in t)
    sizes = [line.split()[0] for line in table.split("buckets:")[1].splitlines()[2:-1]]
    assert sizes and "64x64" in sizes and all(int(w) * int(h) <= 64 * 64 for w, h in (s.split("x") for s in sizes))


def test_train_lora_preview_steps_is_an_appended_widget_passed_to_training(host, monkeypatch):
    """The cost of the preview after training is a visible setting: an optional INT appended after TrainLoRA's old
    widgets (saved workflows keep their values), cheap by default, handed to train_lora as `preview_steps`."""
    from loraloop.nodes import training

    inputs = nodes.TrainLoRA.GET_SCHEMA().inputs
    widgets = [i for i in inputs if i.get_io_type() in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")]
    assert [i.id for i in widgets] == ["name", "save_on_cancel", "preview_steps"]
    steps = widgets[-1]
    assert steps.optional and steps.min == 0 and steps.default == nodes.PREVIEW_STEPS <= 8 and "0 = no sample" in \
        steps.tooltip
    calls = []

    class Stop(Exception):
        pass

    def fake_train_lora(*args, **kwargs):
        calls.append(kwargs)
        raise Stop

    monkeypatch.setattr(training, "train_lora", fake_train_lora)
    common = dict(model=None, clip=None, vae=None, dataset=None, name="x", save_on_cancel=False)
    for given in ({"preview_steps": 0}, {"preview_steps": 3}, {}):
        with pytest.raises(Stop):
            run_node(nodes.TrainLoRA, **common, **given)
    assert [c["preview_steps"] for c in calls] == [0, 3, nodes.PREVIEW_STEPS]
    # The graph samples TrainLoRA's MODEL output (slot 1) anyway: no separate preview on the critical path.
    sampled = {"7": {"class_type": "LoRALoop_TrainLoRA", "inputs": {}},
               "9": {"class_type": "KSampler", "inputs": {"model": ["7", 1], "seed": 1}}}
    saved_only = {"7": {"class_type": "LoRALoop_TrainLoRA", "inputs": {}},
                  "8": {"class_type": "LoRALoop_SaveLoRA", "inputs": {"lora": ["7", 0]}}}
    for prompt in (sampled, saved_only):
        with pytest.raises(Stop):
            run_node(nodes.TrainLoRA, prompt=prompt, **common, preview_steps=5)
    assert [c["preview_steps"] for c in calls[3:]] == [0, 5]


def test_imported_yaml_uses_the_engines_reading(host):
    """import_yaml goes through the engine's from_mapping: type errors and typos are the engine's, and a file's
    `auto` list decides the auto / on / off switch and hands its keys to the planner with their values."""
    from loraloop.trainer.families import get_family

    widgets = config_widget_defaults()
    (host / "input" / "bad.yaml").write_text("lora_rank: many\n")
    with pytest.raises(ConfigError, match=r"lora_rank.*whole number"):
        run_node(nodes.LoRATrainConfig, **{**widgets, "import_yaml": "bad.yaml"})
    (host / "input" / "list.yaml").write_text("auto: [lora_rank]\nlora_rank: 32\n")
    config = run_node(nodes.LoRATrainConfig, **{**widgets, "import_yaml": "list.yaml"}).args[0]
    resolved = config.resolve(get_family("sd1"), "epsilon", torch.float32)
    assert resolved.lora_rank == 32 and "lora_rank" in resolved.auto
    assert resolved.gradient_checkpointing is False and "gradient_checkpointing" not in resolved.auto


# -- captions: LoadDataset's images out, strings (or a local captioner) back in --------------------------------------
CAPTION_WIDGETS = dict(trigger_word=[""], prefix=[""], suffix=[""], find=[""], replace=[""], write_sidecars=[False],
                       overwrite_sidecars=[False])


def colour_folder(host):
    """Three images of different sizes and colours whose file-name order differs from their creation order."""
    from PIL import Image

    folder = host / "input" / "colours"
    folder.mkdir()
    for name, size, colour in (("b.png", (64, 32), (255, 0, 0)), ("a.png", (32, 64), (0, 255, 0)),
                               ("c.jpg", (40, 40), (0, 0, 255))):
        Image.new("RGB", size, colour).save(folder / name)
    return folder


def test_load_dataset_outputs_the_images_in_file_name_order_letterboxed(host):
    from loraloop.nodes.datasets import PREVIEW_SIZE

    colour_folder(host)
    out = run_node(nodes.LoadDataset, folder="colours", recursive=False, caption_extension=".txt")
    schema = nodes.LoadDataset.GET_SCHEMA()
    assert [o.io_type for o in schema.outputs] == ["LORALOOP_DATASET", "STRING", "IMAGE"]  # appended at the end
    dataset, _, images = out.args
    assert [r.path.name for r in dataset.scan().records] == ["a.png", "b.png", "c.jpg"]
    assert images.shape == (3, PREVIEW_SIZE, PREVIEW_SIZE, 3) and images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    middle = PREVIEW_SIZE // 2
    assert torch.allclose(images[0, middle, middle], torch.tensor([0.0, 1.0, 0.0]), atol=0.02)  # a: green
    assert torch.allclose(images[1, middle, middle], torch.tensor([1.0, 0.0, 0.0]), atol=0.02)  # b: red
    assert torch.allclose(images[2, middle, middle], torch.tensor([0.0, 0.0, 1.0]), atol=0.05)  # c: blue
    # a is 32x64: scaled to 256x512 and centred, black bars left and right; b (64x32) gets them above and below.
    assert float(images[0, middle, : PREVIEW_SIZE // 4 - 2].max()) == 0.0 and float(images[0, middle, 200].max()) > 0
    assert float(images[1, : PREVIEW_SIZE // 4 - 2, middle].max()) == 0.0
    assert torch.count_nonzero(images[2].sum(-1)) == PREVIEW_SIZE * PREVIEW_SIZE  # square: no bars


def test_caption_maps_strings_back_in_image_order(host):
    colour_folder(host)
    dataset = run_node(nodes.LoadDataset, folder="colours", recursive=False, caption_extension=".txt").args[0]
    strings = ["green one", "red one", "blue one"]  # what a captioner node returned for LoadDataset's images
    new, text = run_node(nodes.Caption, dataset=[dataset], source=["strings"], captions=strings,
                         **{**CAPTION_WIDGETS, "trigger_word": ["sks"]}).args
    assert {r.path.name: r.caption for r in new.scan().records} == {
        "a.png": "sks, green one", "b.png": "sks, red one", "c.jpg": "sks, blue one"}
    assert text.splitlines() == ["sks, green one", "sks, red one", "sks, blue one"]
    # a captioner node that joined its answers into one string, one line each
    new, _ = run_node(nodes.Caption, dataset=[dataset], source=["strings"], captions=["green\nred\n\nblue\n"],
                      **CAPTION_WIDGETS).args
    assert [r.caption for r in new.scan().records] == ["green", "red", "blue"]
    new, _ = run_node(nodes.Caption, dataset=[dataset], source=["strings"], captions=["all the same"],
                      **CAPTION_WIDGETS).args
    assert [r.caption for r in new.scan().records] == ["all the same"] * 3
    with pytest.raises(ConfigError, match=r"has 4 strings but the dataset 'colours' has 3 images.*image order"):
        run_node(nodes.Caption, dataset=[dataset], source=["strings"], captions=["1", "2", "3", "4"],
                 **CAPTION_WIDGETS)


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    from helpers.tiny_captioner import build_tiny_blip

    return build_tiny_blip(tmp_path_factory.mktemp("captioner") / "tiny-blip")


def test_caption_with_a_local_captioner_model(host, tiny_blip, monkeypatch):
    """source "captioner: <folder under models/captioners>" captions every image with that model, loaded on
    ComfyUI's device for the node only and released with ComfyUI's soft_empty_cache."""
    import gc
    import shutil
    import weakref

    import comfy.model_management as mm
    import comfy.utils
    import folder_paths

    from loraloop.trainer import captioner as engine

    colour_folder(host)
    shutil.copytree(tiny_blip, host / "models" / "captioners" / "blips" / "tiny")
    sources = next(i for i in nodes.Caption.GET_SCHEMA().inputs if i.id == "source").options
    assert sources == ["existing", "strings", "none", "captioner: blips/tiny"]
    assert folder_paths.get_folder_paths("captioners") == [str(host / "models" / "captioners")]
    loaded, real_load = [], engine.load_captioner

    def load(path, **kwargs):
        captioner = real_load(path, **kwargs)
        loaded.append((captioner, weakref.ref(captioner.model), kwargs))
        return captioner

    monkeypatch.setattr(engine, "load_captioner", load)
    dataset = run_node(nodes.LoadDataset, folder="colours", recursive=False, caption_extension=".txt").args[0]
    caches = mm.empty_cache_calls
    new, text = run_node(nodes.Caption, dataset=[dataset], source=["captioner: blips/tiny"], style=["tags"],
                         **{**CAPTION_WIDGETS, "trigger_word": ["sks"], "write_sidecars": [True]}).args
    captions = text.splitlines()
    assert len(captions) == 3 and all(c.startswith("sks") for c in captions)
    assert [r.caption for r in new.scan().records] == captions
    assert [(host / "input" / "colours" / f"{n}.txt").read_text().strip() for n in "abc"] == captions
    ((captioner, model_ref, kwargs),) = loaded
    assert kwargs["device"] == mm.get_torch_device() and kwargs["empty_cache"] is mm.soft_empty_cache
    assert not captioner.loaded and mm.empty_cache_calls == caches + 1
    gc.collect()
    assert model_ref() is None, "the captioner is still referenced after the node ran"
    assert comfy.utils.updates[-1][:2] == (3, 3)
    with pytest.raises(ConfigError, match="no captioner model 'gone'"):
        run_node(nodes.Caption, dataset=[dataset], source=["captioner: gone"], **CAPTION_WIDGETS)
