"""The tab's Train inside Forge Classic (stand-in): `shared.sd_model.forge_objects` holds ComfyUI-design objects, so
the ComfyUI stand-in's tiny models play them (tests/comfy_stub), behind the webui stand-in (tests/a1111_stub).

The real Forge Classic run is tests/test_a1111_real_webui.py with A1111_DIR pointing at a Forge Classic checkout; Forge
Neo is tests/test_a1111_forge_neo.py (stand-in) and tests/test_a1111_forge_neo_real.py (Neo's own modules).
"""

import sys
import types

import pytest
import torch
from a1111_stub import models
from a1111_stub.fixtures import webui_fixture  # noqa: F401 - the `webui` fixture
from comfy_stub.harness import snapshot  # puts the ComfyUI stand-in on sys.path

# isort: split
from comfy_stub import stub_models
from safetensors import safe_open
from test_a1111_training import dataset, tab_values  # noqa: F401 - the `dataset` fixture

from loraloop.trainer.errors import UnsupportedModelError


class FakeMemory(types.ModuleType):
    """Forge Classic's ldm_patched.modules.model_management, as far as LoRA Loop calls it."""

    def __init__(self):
        super().__init__("ldm_patched.modules.model_management")
        self.calls = []

    def unload_all_models(self):
        self.calls.append("unload_all_models")

    def load_models_gpu(self, models, memory_required=0):
        self.calls.append(("load_models_gpu", len(models)))

    def soft_empty_cache(self, force=False):
        self.calls.append("soft_empty_cache")


def forge_classic_model():
    """What Forge Classic exposes as shared.sd_model: the webui's LatentDiffusion shell with `forge_objects`."""
    patcher, clip, vae = stub_models.build("sd15")
    engine = torch.nn.Module()
    engine.forge_objects = types.SimpleNamespace(unet=patcher, clip=clip, vae=vae)
    engine.model = types.SimpleNamespace(diffusion_model=patcher.model.diffusion_model)
    engine.sd_checkpoint_info = types.SimpleNamespace(filename="random-sd15.safetensors")
    return engine


@pytest.fixture
def forge(webui, monkeypatch):
    memory = FakeMemory()
    monkeypatch.setitem(sys.modules, "modules_forge", types.ModuleType("modules_forge"))
    monkeypatch.setitem(sys.modules, "ldm_patched.modules.model_management", memory)
    return memory


def test_train_in_forge_classic_leaves_the_model_and_writes_a_kohya_lora(webui, forge, dataset):  # noqa: F811
    from loraloop.a1111 import actions
    from loraloop.a1111 import training as job

    model = webui.load(forge_classic_model())
    unet = model.forge_objects.unet.model.diffusion_model
    snap = snapshot(unet)
    assert actions.model_info().startswith("Training on the loaded model")
    result = job.run_training(tab_values(webui, dataset, max_train_steps=2))
    assert result.steps == 2 and result.lora is not None and result.lora.is_file()
    with safe_open(str(result.lora), framework="pt") as fh:
        keys = list(fh.keys())
        meta = fh.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys) and meta["ss_base_model_version"] == "sd_v1"
    now = dict(unet.named_parameters())
    assert all(now[n] is p and torch.equal(now[n], v) for n, (p, v) in snap.items())
    assert forge.calls[:2] == ["unload_all_models", ("load_models_gpu", 1)] and "unload_all_models" in forge.calls[2:]


def test_a_forge_model_of_neither_kind_is_refused_with_the_reason(webui, forge, dataset):  # noqa: F811
    """Forge Neo trains in place too (tests/test_a1111_forge_neo.py); a model that is neither Classic's nor Neo's is
    refused before anything is touched."""
    from loraloop.a1111 import actions
    from loraloop.a1111 import training as job

    webui.load(models.build_forge())  # forge_objects whose UNet patcher holds neither a BaseModel nor a KModel
    with pytest.raises(UnsupportedModelError, match=r"neither Forge Classic's .* nor Forge Neo's KModel"):
        job.run_training(tab_values(webui, dataset))
    assert "cannot be trained" in actions.model_info()
    assert forge.calls == []
