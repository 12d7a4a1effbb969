"""pytest fixtures that put the stand-in webui (`modules.*`, the built-in Lora extension's `networks`) on sys.path.

`webui` gives each test a fresh copy: the stub modules are imported anew (so `shared.state`, the queue wrapper's
records and the network list start empty), `--lora-dir` and the output folder point into tmp_path, and everything is
removed from sys.path/sys.modules afterwards. Use `from a1111_stub.fixtures import webui_fixture` in a test
module; tests then take a `webui` argument.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent / "webui"
PATHS = [str(ROOT), str(ROOT / "extensions-builtin" / "Lora")]
STUB_MODULES = ("modules", "networks")


@dataclass
class Webui:
    shared: ModuleType
    devices: ModuleType
    call_queue: ModuleType
    sd_hijack: ModuleType
    script_callbacks: ModuleType
    networks: ModuleType
    paths_internal: ModuleType
    lora_dir: Path
    output_dir: Path

    def load(self, model: object) -> object:
        """What the webui does when a checkpoint is loaded: `shared.sd_model` is the model."""
        self.shared.sd_model = model
        return model


def _drop_stub_modules() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in STUB_MODULES:
            del sys.modules[name]


@pytest.fixture(name="webui")
def webui_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _drop_stub_modules()
    for p in reversed(PATHS):
        monkeypatch.syspath_prepend(p)
    importlib.invalidate_caches()
    paths_internal = importlib.import_module("modules.paths_internal")
    data = tmp_path / "webui-data"
    paths_internal.data_path = str(data)
    paths_internal.models_path = str(data / "models")
    paths_internal.default_output_dir = str(data / "outputs")
    shared = importlib.import_module("modules.shared")
    lora_dir = data / "models" / "Lora"
    shared.cmd_opts.lora_dir = str(lora_dir)
    handle = Webui(shared=shared, devices=importlib.import_module("modules.devices"),
                   call_queue=importlib.import_module("modules.call_queue"),
                   sd_hijack=importlib.import_module("modules.sd_hijack"),
                   script_callbacks=importlib.import_module("modules.script_callbacks"),
                   networks=importlib.import_module("networks"), paths_internal=paths_internal,
                   lora_dir=lora_dir, output_dir=data / "outputs")
    try:
        yield handle
    finally:
        _drop_stub_modules()
