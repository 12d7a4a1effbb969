"""The repository as a webui extension: the script registers the tab and the API, nothing webui-specific leaks into
the package import (the ComfyUI pack and the CLI share it), metadata.ini, the JavaScript, the HTTP API, the Gradio tab.
"""

import configparser
import importlib.util
import re
import subprocess
import sys
import textwrap
import threading
import types
from pathlib import Path

import pytest
from a1111_stub import models
from a1111_stub.fixtures import webui_fixture  # noqa: F401 - the `webui` fixture

ROOT = Path(__file__).resolve().parent.parent


def load_script(path: Path):
    """What modules/script_loading.load_module does, with the extension folder first on sys.path (scripts.py)."""
    sys.path.insert(0, str(ROOT))
    try:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT))
    return module


def test_script_registers_the_tab_and_the_api(webui):
    from loraloop.a1111 import entry

    load_script(ROOT / "scripts" / "loraloop_tab.py")
    callbacks = webui.script_callbacks
    assert callbacks.callbacks_ui_tabs == [entry.on_ui_tabs]
    assert callbacks.callbacks_app_started == [entry.on_app_started]


def test_extension_files():
    ini = configparser.ConfigParser()
    ini.read(ROOT / "metadata.ini")
    assert ini.get("Extension", "Name") == "loraloop"
    js = (ROOT / "javascript" / "loraloop.js").read_text(encoding="utf-8")
    globals_ = re.findall(r"^(?:function|var|let|const)\s+([A-Za-z_$][\w$]*)", js, flags=re.M)
    assert globals_ and all(name.startswith("loraloop_") for name in globals_), globals_
    assert "loraloop_start_training" in globals_ and "requestProgress(" in js and "onUiLoaded(" in js
    css = (ROOT / "style.css").read_text(encoding="utf-8")
    assert "#loraloop_refresh_live" in css


def test_package_import_touches_no_webui_and_the_comfy_pack_ignores_it():
    code = textwrap.dedent(f"""
        import importlib, importlib.util, sys
        if importlib.util.find_spec("loraloop") is None:  # not installed here: load this checkout as the package
            spec = importlib.util.spec_from_file_location("loraloop", {str(ROOT / "__init__.py")!r},
                                                          submodule_search_locations=[{str(ROOT)!r}])
            sys.modules["loraloop"] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(sys.modules["loraloop"])
        for name in ("entry", "webui", "bundle", "training", "widgets", "actions", "api", "ui", "sink", "captions",
                     "plan", "forge", "outputs"):
            importlib.import_module("loraloop.a1111." + name)
        leaked = sorted({{m.split(".")[0] for m in sys.modules}} & {{"modules", "networks", "gradio", "fastapi"}})
        assert not leaked, leaked
        for name in [m for m in sys.modules if m.startswith("loraloop")]:
            del sys.modules[name]
        spec = importlib.util.spec_from_file_location("loraloop_pack", {str(ROOT / "__init__.py")!r})
        pack = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(pack)
        assert pack.WEB_DIRECTORY == "./web"
        assert not [m for m in sys.modules if m.startswith("loraloop.a1111")]
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_api_payloads_and_credentials():
    from loraloop.a1111 import api

    assert api.payload_values({"config": {"lora_rank": 4}, "preferred_weight": 1.0}) == {"lora_rank": 4,
                                                                                         "preferred_weight": 1.0}
    assert api.payload_values({"lora_rank": 4}) == {"lora_rank": 4}
    assert api.credentials_ok(None, None, None)
    assert api.credentials_ok("me:secret,you:pw", "you", "pw")
    assert not api.credentials_ok("me:secret", "me", "wrong")
    assert not api.credentials_ok("me:secret", None, None)


class RecordingLock:
    def __init__(self, events):
        self.lock, self.events = threading.RLock(), events

    def __enter__(self):
        self.lock.acquire()
        self.events.append("lock")

    def __exit__(self, *exc):
        self.events.append("unlock")
        self.lock.release()


def test_api_train_runs_in_the_webui_queue(webui, tmp_path):
    from loraloop.a1111 import api
    from loraloop.a1111 import training as job_module

    folder = tmp_path / "ds"
    folder.mkdir()
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a blue square {i}", encoding="utf-8")
    model = webui.load(models.build_sd("sd1"))
    events = []
    webui.call_queue.queue_lock = RecordingLock(events)
    real = job_module.run_training

    def spy(values):
        events.append(f"train(job={webui.shared.state.job!r})")
        return real(values)

    job_module.run_training, restore = spy, real
    try:
        out = api.train({"config": {"train_data_dir": str(folder), "resolution": 64, "min_bucket_reso": 32,
                                    "bucket_reso_steps": 32, "max_train_steps": 1, "lora_rank": 2,
                                    "output_name": "api run", "gradient_checkpointing": False},
                         "preferred_weight": 1.0, "make_preview": False})
    finally:
        job_module.run_training = restore
    assert events == ["lock", "train(job='loraloop-train')", "unlock"]
    assert out["name"] == "api run" and out["steps"] == 1 and out["prompt"] == "<lora:api run:1>"
    assert Path(out["lora"]).parent == webui.lora_dir and Path(out["card"]).is_file()
    assert webui.shared.state.job == "" and webui.shared.state.job_count == 0
    assert api.status()["running"] is False
    assert model is webui.shared.sd_model
    check = api.check_dataset({"config": {"train_data_dir": str(folder), "resolution": 64, "min_bucket_reso": 32,
                                          "bucket_reso_steps": 32}})
    assert check["will_fail"] is False and "2 usable" in check["report"]


def test_api_routes(webui):
    pytest.importorskip("fastapi")
    from loraloop.a1111 import api

    class App:
        def __init__(self):
            self.routes = {}

        def add_api_route(self, path, endpoint, methods):
            self.routes[path] = (endpoint, methods)

    webui.shared.cmd_opts.api = False
    assert api.register(App()) is False  # the webui serves no API: nothing is added
    webui.shared.cmd_opts.api = True
    app = App()
    assert api.register(app) is True
    assert {p: m for p, (_, m) in app.routes.items()} == {"/loraloop/v1/train": ["POST"],
                                                          "/loraloop/v1/check-dataset": ["POST"],
                                                          "/loraloop/v1/status": ["GET"]}
    from fastapi import HTTPException

    endpoint = app.routes["/loraloop/v1/train"][0]
    with pytest.raises(HTTPException) as err:  # no model loaded: a LoRA Loop error becomes HTTP 422
        endpoint({"config": {}}, None)
    assert err.value.status_code == 422 and "no model is loaded" in err.value.detail["error"]


def _standin_fastapi() -> dict:
    """The few FastAPI names api.register uses (fastapi 0.94 in the webui), for environments without FastAPI."""
    fastapi = types.ModuleType("fastapi")
    security = types.ModuleType("fastapi.security")

    class Depends:
        def __init__(self, dependency=None):
            self.dependency = dependency

    class HTTPException(Exception):
        def __init__(self, status_code, detail=None, headers=None):
            super().__init__(status_code, detail)
            self.status_code, self.detail, self.headers = status_code, detail, headers

    class HTTPBasicCredentials:
        def __init__(self, username, password):
            self.username, self.password = username, password

    class HTTPBasic:
        def __init__(self, auto_error=True):
            self.auto_error = auto_error

    fastapi.Body = lambda default=None, **_: default
    fastapi.Depends, fastapi.HTTPException, fastapi.security = Depends, HTTPException, security
    security.HTTPBasic, security.HTTPBasicCredentials = HTTPBasic, HTTPBasicCredentials
    return {"fastapi": fastapi, "fastapi.security": security}


def _fastapi_signature(call, seen=()):
    """What FastAPI does when a route is added (fastapi.dependencies.utils.get_typed_signature): every annotation of
    the endpoint and of its dependencies is resolved, string annotations in the function's own module globals."""
    import inspect
    import typing

    hints = typing.get_type_hints(call)  # raises NameError for a name only the enclosing function knew
    for param in inspect.signature(call).parameters.values():
        dependency = getattr(param.default, "dependency", None)
        if inspect.isfunction(dependency) and dependency not in seen:
            _fastapi_signature(dependency, (*seen, call))
    return hints


def test_api_route_annotations_resolve_as_fastapi_reads_them(webui, monkeypatch):
    """FastAPI resolves string annotations (`from __future__ import annotations`) in the endpoint's module globals;
    the FastAPI classes api.register imports locally are not there, and the real webui refused the routes with
    NameError: name 'HTTPBasicCredentials' is not defined."""
    real = importlib.util.find_spec("fastapi") is not None
    if not real:
        for name, module in _standin_fastapi().items():
            monkeypatch.setitem(sys.modules, name, module)
    from loraloop.a1111 import api

    class App:
        def __init__(self):
            self.hints = {}

        def add_api_route(self, path, endpoint, methods):
            self.hints[path] = _fastapi_signature(endpoint)
            if real:
                from fastapi.routing import APIRoute

                APIRoute(path, endpoint, methods=methods)  # the real thing, where FastAPI is installed

    webui.shared.cmd_opts.api = True
    app = App()
    assert api.register(app) is True
    assert set(app.hints) == {"/loraloop/v1/train", "/loraloop/v1/check-dataset", "/loraloop/v1/status"}
    assert app.hints["/loraloop/v1/train"]["payload"] is dict


def test_forge_is_detected_and_neo_layers_are_explained(webui, monkeypatch):
    from loraloop.a1111 import actions, forge

    monkeypatch.setitem(sys.modules, "modules_forge", types.ModuleType("modules_forge"))
    assert forge.detected()
    webui.load(models.build_forge())  # Neo-style layers that are not nn.Linear
    assert "cannot be trained" in actions.model_info() and "Forge Neo" in actions.model_info()


def test_the_gradio_tab(webui, monkeypatch):
    """Built with the installed Gradio (the webui's 3.41 or Forge's 4.x); skipped when Gradio is not installed."""
    gr = pytest.importorskip("gradio")
    from loraloop.a1111 import entry
    from loraloop.a1111 import widgets as form

    webui.load(models.build_sd("sd1"))
    ((blocks, title, elem_id),) = entry.on_ui_tabs()
    assert (title, elem_id) == ("LoRA Loop", "loraloop") and isinstance(blocks, gr.Blocks)
    widgets = blocks.loraloop_widgets
    fields = form.form_fields()
    assert list(widgets) == list(form.DATASET_FIELDS) + [
        f.name for g in form.groups(fields) for f in fields if f.group == g and f.name not in form.DATASET_FIELDS]
    assert {w.label for w in widgets.values()} == {f.name for f in fields}
    for f in fields:  # a dropdown for every choice, auto / on / off settings included
        assert isinstance(widgets[f.name], gr.Dropdown if f.kind == "choice" else gr.components.Component), f.name
    for name in form.auto_bool_fields():
        assert widgets[name].value == "auto" and [c[0] if isinstance(c, tuple) else c
                                                  for c in widgets[name].choices] == ["auto", "on", "off"]
    config = blocks.get_config_file() if hasattr(blocks, "get_config_file") else blocks.config
    hints = [c for c in config["components"] if "loraloop_hints" in str(c.get("props", {}).get("value", ""))]
    assert hints and "Adapter rank" in str(hints[0]["props"]["value"])
    js = [d.get("js") for d in config["dependencies"]]
    assert "loraloop_start_training" in js
    assert any(getattr(fn, "__self__", None) is not None and fn.__name__ == "train" for fn in webui.call_queue.wrapped)
    monkeypatch.setitem(sys.modules, "modules_forge", types.ModuleType("modules_forge"))
    ((forge_blocks, _, _),) = entry.on_ui_tabs()
    config = forge_blocks.get_config_file() if hasattr(forge_blocks, "get_config_file") else forge_blocks.config
    train = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "loraloop_train")
    assert train["props"].get("interactive") is not False and str(train["props"]["value"]) == "Train"


class FakeComponent:
    """A Gradio component as far as ui.py uses it: its arguments, a context, `.click` recorded."""

    def __init__(self, gr, *args, **kwargs):
        self.type, self.args, self.kwargs, self.clicks = type(self).__name__, args, kwargs, []
        self.label, self.value = kwargs.get("label"), kwargs.get("value")
        gr.made.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def click(self, fn=None, inputs=None, outputs=None, **kwargs):
        self.clicks.append({"fn": fn, "inputs": inputs, "outputs": outputs, **kwargs})


def fake_gradio(version):
    """A module standing in for `gradio` (not installed here) that records what build_tab makes."""
    gr = types.ModuleType("gradio")
    gr.__version__, gr.made = version, []
    for name in ("Blocks", "HTML", "Row", "Column", "Markdown", "Button", "Textbox", "Accordion", "Checkbox",
                 "Dropdown", "Number", "File", "Image"):
        setattr(gr, name, type(name, (FakeComponent,), {"__init__": lambda self, *a, _gr=gr, **k:
                                                         FakeComponent.__init__(self, _gr, *a, **k)}))
    gr.update = lambda **kwargs: {"__type__": "update", **kwargs}
    return gr


@pytest.mark.parametrize("version", ["3.41.2", "4.40.0"])
def test_the_tab_renders_the_widget_schema(webui, monkeypatch, version):
    """Every field of the schema becomes the Gradio component of its kind, with the schema's default, choices and
    bounds, in the tab's layout (dataset fields first, then one accordion per group); runs without Gradio."""
    from loraloop.a1111 import ui
    from loraloop.a1111 import widgets as form

    gr = fake_gradio(version)
    monkeypatch.setitem(sys.modules, "gradio", gr)
    tab = ui.build_tab()
    components = tab.loraloop_widgets
    fields = form.form_fields(webui.output_dir / "loraloop")
    assert list(components) == list(form.DATASET_FIELDS) + [
        f.name for g in form.groups(fields) for f in fields if f.group == g and f.name not in form.DATASET_FIELDS]
    widgets = form.tab_schema().by_name()
    for f in fields:
        c = components[f.name]
        assert (c.label, c.value, c.kwargs["elem_id"]) == (f.name, f.default, f"loraloop_{f.name}"), f.name
        kind = widgets[f.name].kind if f.name in widgets else f.kind
        expected = {"bool": "Checkbox", "switch": "Dropdown", "choice": "Dropdown", "int": "Number",
                    "float": "Number"}.get(kind, "Textbox")
        assert c.type == expected, f.name
        if expected == "Dropdown":
            assert c.kwargs["choices"] == list(widgets[f.name].choices), f.name
        if expected == "Number":
            assert c.kwargs["precision"] == (0 if kind == "int" else None), f.name
            assert (c.kwargs["minimum"], c.kwargs["maximum"]) == (f.minimum, f.maximum), f.name
        if expected == "Textbox":
            assert c.kwargs["lines"] == (3 if kind == "lines" else 1), f.name
    assert components["gradient_checkpointing"].kwargs["choices"] == ["auto", "on", "off"]
    assert components["resolution"].kwargs["minimum"] == 0 and components["lora_rank"].kwargs["minimum"] == 1
    train = next(c for c in gr.made if c.kwargs.get("elem_id") == "loraloop_train")
    (click,) = train.clicks
    assert click[("js" if version.startswith("4") else "_js")] == "loraloop_start_training"
    assert click["inputs"][1:] == [components[f.name] for f in fields]  # the handlers get the fields in order


def test_cancel_only_interrupts_a_training_run(webui):
    from loraloop.a1111.actions import TabActions
    from loraloop.a1111.sink import LIVE

    LIVE.finish("done")
    assert TabActions.cancel() == "No training is running." and webui.shared.state.interrupted is False
    LIVE.start("x")
    try:
        assert "Cancelling" in TabActions.cancel() and webui.shared.state.interrupted is True
    finally:
        LIVE.finish("done")


def test_install_py_keeps_old_webui_pins_working():
    """A1111 1.10 (transformers 4.30): peft is pinned to 0.13.2 and diffusers is not installed (a current diffusers
    brings huggingface_hub ≥ 1.0, which breaks the webui's CLIP tokenizer loading); newer hosts get everything."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("loraloop_install", ROOT / "install.py")
    install = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install)
    todo = ["peft>=0.13", "diffusers>=0.30", "pyyaml"]
    assert install.plan_installs(todo, old_transformers=True) == ["peft==0.13.2", "pyyaml"]
    assert install.plan_installs(todo, old_transformers=False) == todo
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    names = {re.split(r"[<>=!~ ]", line)[0].lower() for line in lines if line}
    assert names and not names & {"torch", "torchvision", "xformers", "gradio", "transformers"}


def test_resize_action_writes_into_the_lora_folder(webui):
    """The tab's resize section: the LoRAs of the Lora folder to pick from, the resized file beside the others (the
    webui's list refreshed), the report, and one-line errors."""
    import torch

    from loraloop.a1111 import actions
    from loraloop.trainer.lorafile import load_lora, save_lora

    gen = torch.Generator().manual_seed(0)
    save_lora(webui.lora_dir / "styles" / "flat.safetensors", {
        "lora_unet_a.lora_down.weight": torch.randn(8, 32, generator=gen).half(),
        "lora_unet_a.lora_up.weight": torch.randn(16, 8, generator=gen).half(),
        "lora_unet_a.alpha": torch.tensor(4.0).half()}, {"ss_network_dim": "8", "ss_output_name": "flat"})
    assert actions.lora_files() == ["styles/flat.safetensors"]
    by_energy, by_rank, _ = actions.RESIZE_TARGETS
    text = actions.resize_lora("styles/flat.safetensors", by_rank, 2, "flat_small", False)
    assert "kept energy" in text and "lora_unet_a" in text and not text.startswith("ERROR")
    tensors, metadata = load_lora(webui.lora_dir / "flat_small.safetensors")
    assert tensors["lora_unet_a.lora_down.weight"].shape[0] == 2 and metadata["ss_network_dim"] == "2"
    assert metadata["ss_output_name"] == "flat_small" and "flat_small" in webui.networks.available_networks
    again = actions.resize_lora("styles/flat.safetensors", by_rank, 2, "flat_small", False)
    assert again.startswith("ERROR:") and "already exists" in again and "overwrite" in again
    assert not actions.resize_lora("styles/flat.safetensors", by_rank, 4, "flat_small", True).startswith("ERROR")
    assert not actions.resize_lora("styles/flat.safetensors", by_energy, 0.9, "", False).startswith("ERROR")
    assert (webui.lora_dir / "flat_resized.safetensors").is_file()  # the default output name
    assert "energy must be" in actions.resize_lora("styles/flat.safetensors", by_energy, 3, "x", False)
    assert "no LoRA '../outside.safetensors'" in actions.resize_lora("../outside.safetensors", by_rank, 2, "x", False)
    assert actions.resize_lora("", by_rank, 2, "x", False).startswith("ERROR: no LoRA")


def test_the_tab_wires_the_resize_section(webui, monkeypatch):
    from loraloop.a1111 import actions, ui

    gr = fake_gradio("3.41.2")
    monkeypatch.setitem(sys.modules, "gradio", gr)
    ui.build_tab()
    by_id = {c.kwargs.get("elem_id"): c for c in gr.made if c.kwargs.get("elem_id")}
    (click,) = by_id["loraloop_resize_button"].clicks
    assert click["fn"] is actions.resize_lora and click["outputs"] == [by_id["loraloop_resize_report"]]
    assert click["inputs"] == [by_id[f"loraloop_resize_{n}"] for n in ("lora", "target", "value", "name", "overwrite")]
    assert by_id["loraloop_resize_target"].kwargs["choices"] == list(actions.RESIZE_TARGETS)
    (refresh,) = by_id["loraloop_resize_refresh"].clicks
    assert refresh["outputs"] == [by_id["loraloop_resize_lora"]] and refresh["fn"]()["choices"] == []
