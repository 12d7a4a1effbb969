r"""Opt-in: training through Forge Neo's own backend modules (not a stand-in). Not run in CI.

    FORGE_NEO_DIR=/work/hosts/forge-neo pytest -m forge_neo tests/test_a1111_forge_neo_real.py

For SD 1.x, SDXL and Flux.1 layouts it builds a tiny UNet/Flux from Neo's own network classes with Neo's own layers
(`backend.operations.using_forge_operations`, loaded with `backend.state_dict.load_state_dict` as Neo's loader does,
under inference mode), wraps it in Neo's `KModel` (real predictor) and `UnetPatcher`, and then:
* trains a few steps through LoRA Loop's `NeoBundle` + `Network` inside `forge.training_memory` (Neo's real
  `backend.memory_management`), adapters on Neo's `ForgeOperations.Linear`; the loss falls;
* checks the UNet's weights are bit-identical afterwards (same Parameter objects);
* maps the written LoRA with Neo's own loader (`backend.patcher.lora.model_lora_keys_unet` + `load_lora`, i.e.
  modules_forge/packages/comfy/lora.py): zero unmatched keys, every adapted module patched;
* merges it into the weights the way Neo applies LoRAs (`UnetPatcher.add_patches` + `load_models_gpu` →
  `LoraLoader.refresh`) and checks the model's output equals LoRA Loop's adapted output; loading the LoRA-free patcher
  again restores the exact weight values.

Stand-ins: the engine's text and latent functions (`get_learned_conditioning`, `encode_first_stage`: Neo's prompt
engines and VAE need tokenizer files and weights, which are not used here) and the webui's `modules.errors` and
`modules.devices`. Neo runs on the CPU (`--always-cpu`, v3.5: `--cpu`) with `--attention-pytorch` (the 2025 copy's
basic-attention path reads an argument its args.py lacks).
A complete Forge Neo webui was not run. The numbers are printed; run with -s to see them.

Recipe for FORGE_NEO_DIR (outside the repository; none of it is committed): copy a Neo checkout's Python files,
    mkdir -p /work/hosts/forge-neo && cd <a Forge Neo checkout>   # git clone -b neo <Haoming02/sd-webui-forge-classic>
    git ls-tree -r --name-only HEAD backend modules_forge | grep '\.py$' | grep -v '^backend/huggingface/' |
        while read f; do mkdir -p /work/hosts/forge-neo/$(dirname $f); git show HEAD:$f > /work/hosts/forge-neo/$f; done
This repository's venv runs them (torch, diffusers, einops, psutil, safetensors); modules_forge/packages is appended to
sys.path as Neo's initialization does. Two trees were run, both passing (Haoming02's neo branch itself could be read
only file by file, not checked out, here):
* /work/hosts/forge-neo: Neo's backend of October 2025 as published in papaioannou-themistoklis/WebUI-Neo-Forge at
  7862a964 (ForgeOperations.Linear an nn.Module, as in Haoming02's operations.py at 06d6af9a/e0680a3b);
* /work/hosts/forge-neo-v3.5: Neo v3.5 as vendored under webui/ in exo101/sd-webui-forge-neo-v3 at 5692d2d1
  (ForgeOperations.Linear an nn.Linear subclass, ComfyUI-0.7-style ModelPatcher); it imports comfy_kitchen:
  `pip install --no-deps --target /work/hosts/forge-neo-v3.5-deps comfy-kitchen==0.2.40` and run with
  PYTHONPATH=/work/hosts/forge-neo-v3.5-deps FORGE_NEO_DIR=/work/hosts/forge-neo-v3.5.
"""

from __future__ import annotations

import inspect
import os
import sys
import types
import zlib
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.forge_neo

NEO_DIR = os.environ.get("FORGE_NEO_DIR")
CPU = torch.device("cpu")
TE = 32
SD15 = dict(in_channels=4, model_channels=32, out_channels=4, num_res_blocks=[1, 1], channel_mult=[1, 2],
            num_head_channels=8, use_spatial_transformer=True, transformer_depth=[1, 1],
            transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, context_dim=TE,
            use_linear_in_transformer=False)
SDXL = dict(SD15, context_dim=2 * TE, use_linear_in_transformer=True, transformer_depth=[0, 1],
            transformer_depth_output=[0, 0, 1, 1], num_classes="sequential", adm_in_channels=TE + 6 * 256)
FLUX = dict(in_channels=16, out_channels=16, vec_in_dim=TE, context_in_dim=TE, hidden_size=32, mlp_ratio=2.0,
            num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[4, 6, 6], theta=10000, patch_size=2, qkv_bias=True,
            guidance_embed=True)


def _neo_module_names() -> list[str]:
    return [name for name, module in sys.modules.items()
            if str(getattr(module, "__file__", "") or "").startswith(str(Path(NEO_DIR).resolve()))]


@pytest.fixture(scope="module")
def neo():
    """Neo's backend imported from FORGE_NEO_DIR; sys.path, sys.argv and sys.modules are put back afterwards."""
    if not NEO_DIR or not (Path(NEO_DIR) / "backend" / "operations.py").is_file():
        pytest.skip("set FORGE_NEO_DIR to a folder holding Forge Neo's backend/ and modules_forge/ (see the docstring)")
    saved_path, saved_argv = list(sys.path), list(sys.argv)
    webui = {"modules.errors": {"display_once": lambda *_args, **_kwargs: None}, "modules.devices": {"device": CPU}}
    added = [name for name in ("modules", *webui) if name not in sys.modules]
    # backend/args.py parses the command line; unknown flags are ignored (Neo 2025: --always-cpu, 2026: --cpu)
    sys.argv = ["webui.py", "--always-cpu", "--cpu", "--attention-pytorch"]
    sys.path.insert(0, str(Path(NEO_DIR).resolve()))
    sys.path.append(str(Path(NEO_DIR).resolve() / "modules_forge" / "packages"))  # after our stand-ins' `comfy`
    sys.modules.setdefault("modules", types.ModuleType("modules"))
    for name, attributes in webui.items():  # the webui's modules Neo's backend imports on the way
        sys.modules.setdefault(name, types.SimpleNamespace(**attributes))
    try:
        import huggingface_guess.model_list as model_list
        from backend import memory_management, operations
        from backend.modules.k_model import KModel
        from backend.modules.k_prediction import Prediction, PredictionFlux
        from backend.nn.flux import IntegratedFluxTransformer2DModel
        from backend.nn.unet import IntegratedUNet2DConditionModel, Timestep
        from backend.patcher.lora import load_lora, model_lora_keys_unet
        from backend.patcher.unet import UnetPatcher
        from backend.state_dict import load_state_dict

        yield types.SimpleNamespace(
            model_list=model_list, memory_management=memory_management, operations=operations, KModel=KModel,
            Prediction=Prediction, PredictionFlux=PredictionFlux, Timestep=Timestep, UnetPatcher=UnetPatcher,
            IntegratedFluxTransformer2DModel=IntegratedFluxTransformer2DModel, load_state_dict=load_state_dict,
            IntegratedUNet2DConditionModel=IntegratedUNet2DConditionModel, load_lora=load_lora,
            model_lora_keys_unet=model_lora_keys_unet)
    finally:
        for name in [*_neo_module_names(), *added]:
            sys.modules.pop(name, None)
        sys.path[:], sys.argv[:] = saved_path, saved_argv


def build_net(neo, cls, config, storage):
    """What Neo's loader does for a UNet: build under using_forge_operations, load the state dict, set the dtypes."""
    with torch.inference_mode():
        torch.manual_seed(0)
        state = {k: torch.randn_like(v) * 0.05 for k, v in cls(**config).state_dict().items()}
        with neo.operations.using_forge_operations(device=CPU, dtype=storage,
                                                   manual_cast_enabled=storage != torch.float32):
            net = cls(**config).to(device=CPU, dtype=storage)
        neo.load_state_dict(net, state)
    if not hasattr(net, "_internal_dict"):
        net.config = dict(config, image_model="flux")
    net.storage_dtype, net.computation_dtype = storage, torch.float32
    net.load_device = net.offload_device = net.initial_device = CPU
    return net


class Engine:
    """The ForgeDiffusionEngine's surface LoRA Loop uses; text and latents are stand-ins (see the module docstring)."""

    def __init__(self, kind, patcher, embedder=None):
        self.kind = kind
        clip = types.SimpleNamespace(cond_stage_model=torch.nn.ModuleDict())
        self.forge_objects = types.SimpleNamespace(unet=patcher, clip=clip, vae=None, clipvision=None)
        self.forge_objects_original = types.SimpleNamespace(**vars(self.forge_objects))
        self.sd_checkpoint_info = types.SimpleNamespace(filename=f"neo-real-{kind}.safetensors", title=kind)
        self.embedder = embedder

    @torch.inference_mode()
    def get_learned_conditioning(self, prompts):
        rows = []
        for prompt in prompts:
            generator = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
            width, tokens = (2 * TE, 77) if self.kind == "sdxl" else (TE, 8 if self.kind == "flux" else 77)
            rows.append((torch.randn(1, tokens, width, generator=generator), torch.randn(1, TE, generator=generator)))
        context, pooled = torch.cat([c for c, _ in rows]), torch.cat([p for _, p in rows])
        if self.kind == "sd15":
            return context
        if self.kind == "sdxl":
            sizes = torch.cat([self.embedder(torch.tensor([v])) for v in (1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0)])
            return {"crossattn": context, "vector": torch.cat([pooled, sizes.flatten()[None].repeat(len(prompts), 1)],
                                                              dim=1)}
        return {"crossattn": context, "vector": pooled, "guidance": torch.full((len(prompts),), 3.5)}

    @torch.inference_mode()
    def encode_first_stage(self, x):
        channels = 16 if self.kind == "flux" else 4
        return torch.nn.functional.avg_pool2d(x.float(), 8).repeat(1, 6, 1, 1)[:, :channels]


def build(neo, kind, storage=torch.float32):
    """A Neo engine stand-in over Neo's real UNet/Flux, KModel, predictor and UnetPatcher (keyword arguments: their
    order changed between Neo versions; Flux's predictor takes the model config since v3.5, μ-shift arguments
    before)."""
    if kind == "flux":
        net = build_net(neo, neo.IntegratedFluxTransformer2DModel, FLUX, storage)
        config, embedder = neo.model_list.Flux(dict(net.config)), None
        takes_config = "model_config" in inspect.signature(neo.PredictionFlux).parameters
        predictor = neo.PredictionFlux(config) if takes_config else neo.PredictionFlux()
    else:
        net = build_net(neo, neo.IntegratedUNet2DConditionModel, SDXL if kind == "sdxl" else SD15, storage)
        config_cls = neo.model_list.SDXL if kind == "sdxl" else neo.model_list.SD15
        config = config_cls(dict(net.config))
        predictor = neo.Prediction(sigma_data=1.0, prediction_type="epsilon", beta_schedule="linear",
                                   linear_start=0.00085, linear_end=0.012, timesteps=1000)
        embedder = neo.Timestep(256) if kind == "sdxl" else None
    kmodel = neo.KModel(model=net, diffusers_scheduler=None, k_predictor=predictor, config=config)
    return Engine(kind, neo.UnetPatcher(kmodel, load_device=CPU, offload_device=CPU), embedder)


def snapshot(module):
    with torch.inference_mode():
        return {n: (p, p.detach().clone()) for n, p in module.named_parameters()}


def assert_unchanged(module, snap, same_objects=True):
    now = dict(module.named_parameters())
    assert set(now) == set(snap)
    replaced = [n for n, (p, _) in snap.items() if same_objects and now[n] is not p]
    changed = [n for n, (_, v) in snap.items() if not torch.equal(now[n], v)]
    assert not replaced and not changed, f"replaced {replaced[:3]}, changed {changed[:3]} of {len(snap)}"


@pytest.mark.parametrize(("kind", "storage"), [("sd15", torch.float32), ("sd15", torch.bfloat16),
                                               ("sdxl", torch.float32), ("flux", torch.float32)])
def test_lora_trained_on_neo_layers_loads_in_neo_and_leaves_the_weights(neo, kind, storage):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_a1111_forge_neo import fit

    from loraloop.a1111 import forge
    from loraloop.trainer.network import NetworkSpec, applied_lora

    engine = build(neo, kind, storage)
    patcher = engine.forge_objects.unet
    kmodel, net = patcher.model, patcher.model.diffusion_model
    # Neo's own Linear: an nn.Module in the 2025 backend (peft cannot adapt it by itself: trainer/custom_layers.py
    # does), an nn.Linear subclass in Neo v3.5's (peft's own LoRA layer)
    linear = next(m for m in net.modules() if type(m).__qualname__ == "ForgeOperations.Linear")
    layer_kind = "nn.Linear subclass" if isinstance(linear, torch.nn.Linear) else "nn.Module, not an nn.Linear"
    snap = snapshot(net)
    forge.check_trainable(engine)
    bundle = forge.ForgeBundle(engine)
    assert isinstance(bundle, forge.NeoBundle) and bundle.dtype == storage
    spec = NetworkSpec(rank=4, alpha=16.0)
    with forge.training_memory(bundle):
        losses, state = fit(bundle, steps=12, spec=spec)
    assert losses[-1] < losses[0], losses
    assert_unchanged(net, snap)

    unet_keys = neo.model_lora_keys_unet(kmodel, {})
    patches, unmatched = neo.load_lora({k: v.float() for k, v in state.items()}, unet_keys)
    assert unmatched == {}
    assert len(patches) == len({k.rsplit(".", 2)[0] for k in state})

    torch.manual_seed(1)
    channels = 16 if kind == "flux" else 4
    x, sigma = torch.randn(2, channels, 8, 8), torch.tensor([0.4, 0.8]) if kind == "flux" else torch.tensor([1.0, 5.0])
    cond = bundle.encode_text(["a red circle", "a blue square"])
    extra = {}
    if kind == "sdxl":
        extra["y"] = bundle._adm(cond.pooled, None, x)
    if kind == "flux":
        extra = {"y": cond.pooled, "guidance": torch.ones(2)}
    with torch.no_grad():
        base = kmodel.apply_model(x, sigma, c_crossattn=cond.context, **extra)
        with bundle.trainable(), applied_lora(bundle, spec, {k: v.float() for k, v in state.items()}):
            ours = kmodel.apply_model(x, sigma, c_crossattn=cond.context, **extra)
    with_lora = patcher.clone()
    with_lora.add_patches(filename="loraloop.safetensors", patches=patches, strength_patch=1.0, strength_model=1.0)
    neo.memory_management.load_models_gpu([with_lora])  # Neo merges the LoRA into the weights here
    with torch.no_grad():
        merged = kmodel.apply_model(x, sigma, c_crossattn=cond.context, **extra)
    tolerance = 2e-2 if storage == torch.bfloat16 else 1e-4  # Neo merges into bf16 weights; ours adds in fp32
    assert (ours - base).abs().max() > 10 * tolerance  # the LoRA does something
    torch.testing.assert_close(merged, ours, atol=tolerance, rtol=tolerance)
    effect, mismatch = (ours - base).abs().max(), (merged - ours).abs().max()
    print(f"\n{kind} {storage} (Neo's Linear: {layer_kind}): loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
          f"{len(patches)} modules patched by Neo's loader, 0 unmatched; LoRA effect {effect:.3e}, "
          f"Neo merge vs ours {mismatch:.2e}")
    neo.memory_management.load_models_gpu([patcher])  # no LoRA: Neo puts its backup back
    neo.memory_management.unload_all_models()
    assert_unchanged(net, snap, same_objects=False)  # Neo v3.5 restores bf16 weights as new Parameter objects
