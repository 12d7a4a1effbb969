"""Training inside Forge Neo (stand-in, tests/forge_neo_stub): adapters on Neo's own Linear class (an nn.Module that
is not an nn.Linear), the tab's run over Neo's forge_objects, its KModel/predictor, and the refusals.

The run with Neo's own modules is tests/test_a1111_forge_neo_real.py (FORGE_NEO_DIR).
"""

import copy
import sys

import pytest
import torch
from a1111_stub import models
from a1111_stub.fixtures import webui_fixture  # noqa: F401 - the `webui` fixture
from comfy_stub.harness import snapshot  # puts the ComfyUI stand-in on sys.path

# isort: split
from comfy_stub import stub_models
from forge_neo_stub import neo
from safetensors import safe_open
from test_a1111_training import dataset, tab_values  # noqa: F401 - the `dataset` fixture

from loraloop.trainer.errors import ConfigError, UnsupportedModelError


@pytest.fixture
def memory(monkeypatch):
    """Inside Forge Neo: `modules_forge` importable, `backend.memory_management` its model management."""
    import types

    fake = neo.FakeMemory()
    monkeypatch.setitem(sys.modules, "modules_forge", types.ModuleType("modules_forge"))
    monkeypatch.setitem(sys.modules, "backend.memory_management", fake)
    return fake


def assert_unchanged(module, snap):
    now = dict(module.named_parameters())
    assert set(now) == set(snap)
    for name, (obj, value) in snap.items():
        assert now[name] is obj and now[name].is_inference() == obj.is_inference(), name
        assert now[name].dtype == value.dtype and torch.equal(now[name], value), name


def fit(bundle, steps=8, spec=None):
    """A few steps on one fixed batch through the engine's Network; returns (losses, kohya state dict)."""
    from loraloop.trainer.network import Network, NetworkSpec

    torch.manual_seed(0)
    latents = bundle.encode_images(torch.rand(2, 3, 64, 64) * 2 - 1)
    cond = bundle.encode_text(["flat style, a red circle", "flat style, a blue circle"])
    noise = torch.randn_like(latents)
    if bundle.family.is_flow:
        t = bundle.shift_sigmas(torch.tensor([0.3, 0.7]))
        noisy, target = (1 - t.view(-1, 1, 1, 1)) * latents + t.view(-1, 1, 1, 1) * noise, noise - latents
    else:
        t = torch.tensor([150, 600])
        a = bundle.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy, target = a.sqrt() * latents + (1 - a).sqrt() * noise, noise
    losses = []
    with bundle.trainable(), Network(bundle, spec or NetworkSpec(rank=4, alpha=16.0)) as network:
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
        for _ in range(steps):
            loss = torch.nn.functional.mse_loss(bundle.predict(noisy, t, cond).float(), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses, network.state_dict()


def test_lora_on_a_neo_linear_is_its_own_output_plus_scaled_ba():
    from peft import LoraModel

    from loraloop.trainer.custom_layers import custom_modules, linear_like_lora
    from loraloop.trainer.memory.recovery.levers import shrink_rank
    from loraloop.trainer.network import ADAPTER, NetworkSpec, _export_layer, _peft_config

    with torch.inference_mode():
        root = neo.neo_layers(torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.GELU(), torch.nn.Linear(10, 6)),
                              storage=torch.float16, manual_cast=True)
    base = root[0]
    config = _peft_config(NetworkSpec(rank=4, alpha=2.0), {"0": (4, 2.0), "2": (4, 2.0)})
    config._register_custom_module(custom_modules(root, ["0", "2"]))
    tuner = LoraModel(root, config, ADAPTER)
    layer = root[0]
    assert isinstance(layer, linear_like_lora()) and layer.base_layer is base
    assert (layer.in_features, layer.out_features) == (12, 10)
    with torch.no_grad():
        for name, p in root.named_parameters():
            if ".lora_" in name:  # float32 adapters on fp16 base weights, as Network makes them
                p.data = p.data.float()
        layer.lora_B[ADAPTER].weight.normal_()
    x = torch.randn(3, 12)
    a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    calls = base.calls
    expected = torch.nn.functional.linear(x, base.weight.float(), base.bias.float()) + x @ a.T @ b.T * 0.5
    torch.testing.assert_close(layer(x), expected)
    assert base.calls == calls + 1  # Neo's own forward ran (its cast of the fp16 weight included)
    assert set(_export_layer("lora", layer)) == {"lora_down.weight", "lora_up.weight", "alpha"}
    shrink_rank(layer, 2)  # the OOM ladder's rank lever reads peft's attribute names
    assert layer.r[ADAPTER] == 2 and float(_export_layer("lora", layer)["alpha"]) == 2.0
    tuner.unload()
    assert root[0] is base


def test_train_in_forge_neo_leaves_the_model_and_writes_a_kohya_lora(webui, memory, dataset):  # noqa: F811
    from loraloop.a1111 import training as job

    engine = webui.load(neo.build("sd15", storage=torch.float16))  # fp16 storage, cast to fp32 on the fly
    unet = engine.forge_objects.unet.model.diffusion_model
    snap = snapshot(unet)
    result = job.run_training(tab_values(webui, dataset, max_train_steps=2))
    assert result.steps == 2 and result.lora is not None and result.lora.is_file()
    with safe_open(str(result.lora), framework="pt") as fh:
        keys = list(fh.keys())
        meta = fh.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys) and meta["ss_base_model_version"] == "sd_v1"
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert_unchanged(unet, snap)
    assert memory.calls[:2] == ["unload_all_models", ("load_models_gpu", 1)] and "unload_all_models" in memory.calls[2:]
    assert any(r"\(centered\)" in p for p in engine.prompts)  # captions reach Neo's prompt parser literally


@pytest.mark.parametrize("kind", ["sdxl", "flux"])
def test_loss_falls_and_the_names_are_those_classic_and_comfyui_write(kind):
    from loraloop.a1111.forge import ForgeBundle, NeoBundle
    from loraloop.trainer.bundles.patcher import PatcherBundle

    engine = neo.build(kind, storage=torch.bfloat16)
    bundle = ForgeBundle(engine)
    assert isinstance(bundle, NeoBundle) and bundle.dtype == torch.bfloat16
    unet = bundle.unet
    snap = snapshot(unet)
    losses, state = fit(bundle)
    assert losses[-1] < 0.8 * losses[0]
    assert_unchanged(unet, snap)
    # The same network made of torch's layers, as ComfyUI (and Forge Classic) hold it: same targets, same kohya names.
    comfy = stub_models.build_flux()[0] if kind == "flux" else stub_models.build("sdxl")[0]
    reference = PatcherBundle(comfy, None, None)
    names = {reference.unet_lora_name(p) for p in reference.unet_targets(conv=False)}
    assert {k.rsplit(".", 2)[0] for k in state} == names


def test_neo_targets_are_the_torch_layers_targets_and_locon_adds_the_convs():
    from loraloop.a1111.forge import neo_unet_targets
    from loraloop.trainer.naming import unet_targets

    with torch.no_grad():
        torch_unet = neo._tiny_unet(sdxl=False)
        neo_unet = neo.neo_layers(copy.deepcopy(torch_unet))
    assert neo_unet_targets(neo_unet, conv=True) == unet_targets(torch_unet, conv=True)
    assert any(kind == "conv3x3" for kind in neo_unet_targets(neo_unet, conv=True).values())


def test_flux_sigmas_follow_neo_mu_like_comfyui_model_sampling_flux():
    from loraloop.a1111.forge import ForgeBundle
    from loraloop.trainer.bundles.patcher import PatcherBundle

    u = torch.tensor([0.1, 0.5, 0.9])
    neo_sigmas = ForgeBundle(neo.build("flux")).shift_sigmas(u)
    torch.testing.assert_close(neo_sigmas, PatcherBundle(stub_models.build_flux()[0], None, None).shift_sigmas(u))
    assert torch.allclose(ForgeBundle(neo.build("flux-schnell")).shift_sigmas(u), neo_sigmas, atol=0.2)


def test_neo_bundle_sets_every_attribute_a_patcher_bundle_sets():
    """NeoBundle sets PatcherBundle's attributes itself (Neo's KModel is not ComfyUI's BaseModel): none is missed."""
    from loraloop.a1111.forge import ForgeBundle

    classic = stub_models.build("sd15")[0]
    engine = torch.nn.Module()
    engine.forge_objects = type("Objects", (), {"unet": classic, "clip": None, "vae": None})()
    engine.sd_checkpoint_info = None
    assert set(vars(ForgeBundle(engine))) <= set(vars(ForgeBundle(neo.build("sd15"))))


def test_neo_refusals_name_the_reason(webui, memory, dataset):  # noqa: F811
    from loraloop.a1111 import forge
    from loraloop.a1111 import training as job
    from loraloop.trainer.network import Network, NetworkSpec

    packed = neo.build("sd15")
    blocks = packed.forge_objects.unet.model.diffusion_model
    blocks.input_blocks[1][1].proj_in = neo.ForgeOperationsBNB4bits.Linear(32, 32)
    with pytest.raises(UnsupportedModelError, match=r"quantized layers \(input_blocks\.1\.1\.proj_in: ForgeOpera"):
        forge.check_trainable(packed)
    fast = neo.build("sd15")
    with torch.inference_mode():
        layer = neo.fp8Operations.Linear(32, 32)
        layer.weight = torch.nn.Parameter(torch.zeros(32, 32, dtype=torch.float8_e4m3fn))
    fast.forge_objects.unet.model.diffusion_model.input_blocks[1][1].proj_in = layer
    with pytest.raises(UnsupportedModelError, match="_scaled_mm"):
        forge.check_trainable(fast)
    with pytest.raises(UnsupportedModelError, match=r"Chroma \(Chroma\).*SD 1\.x, SDXL and Flux"):
        forge.detect_family(neo.build("flux-schnell", config=neo.Chroma()))
    inpaint = neo.SD15()
    inpaint.unet_config = {"in_channels": 9}
    with pytest.raises(UnsupportedModelError, match="inpainting models"):
        forge.detect_family(neo.build("sd15", config=inpaint))
    with pytest.raises(UnsupportedModelError, match="EDM"):
        forge.detect_family(neo.build("sd15", predictor=neo.PredictionEDM()))
    bundle = forge.ForgeBundle(neo.build("sd15"))
    with bundle.trainable(), pytest.raises(ConfigError, match=r"loha cannot adapt .*Linear.*use lora or locon"):
        Network(bundle, NetworkSpec(network_type="loha"))
    assert forge.detect_family(neo.build("sd15"))[0].name == "sd1"
    webui.load(neo.build("sd15"))
    with pytest.raises(ConfigError, match="train_text_encoder"):
        job.run_training(tab_values(webui, dataset, train_text_encoder=True))
    webui.load(models.build_forge())
    with pytest.raises(UnsupportedModelError, match="Forge Neo's KModel"):
        job.run_training(tab_values(webui, dataset))
    assert memory.calls == []


def test_the_tab_describes_a_neo_model_as_trainable(webui, memory):
    """The tab's model line (a1111/bundle.py `describe`): a Neo SDXL is SDXL, trainable, its text encoder not (yet)."""
    from loraloop.a1111 import bundle as a1111_bundle

    facts = a1111_bundle.describe(neo.build("sdxl"))
    assert facts.family.name == "sdxl" and facts.prediction_type == "epsilon"
    assert facts.text_encoder_trainable is False
