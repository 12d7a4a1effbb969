"""Opt-in: every flow family's REAL ComfyUI diffusion model, trained in-process by the engine through `ComfyBundle`.

    COMFYUI_DIR=/path/to/ComfyUI <ComfyUI's python> -m pytest -m comfyui tests/test_comfy_real_families.py -s

Skipped unless COMFYUI_DIR is set AND `-m comfyui` selects it. It runs inside ComfyUI's own Python (that venv needs
ComfyUI's requirements.txt plus this repo's requirements.txt and pytest), imports the checkout's `comfy` on CPU, and
must run on its own: a process that already imported the stand-in `comfy` (tests/comfy_stub, e.g. a whole-suite
run) skips it. Tested with ComfyUI 0.12.3 and 0.33.0.

For Flux.1 dev and schnell, Chroma, SD3, Z-Image, Lumina 2 and Qwen-Image, each built by its own model-config class of
comfy/supported_models.py at a tiny size with random weights (tests/comfy_real_support/families.py), conditioned with
random text embeddings of the model's widths (no tokenizers or text encoders are loaded):
1. `detect_family` names the family and rectified flow;
2. a fixed batch (one latent, fixed noise and u) overfits: 30 AdamW steps take the flow loss below 0.7x the first;
3. the exported kohya LoRA loads through ComfyUI's own loader (`comfy.lora.load_lora`) with no "lora key not
   loaded", every stem mapped onto the weight it adapted, and the ModelPatcher with those patches applied gives the
   adapted model's prediction within 1e-4;
4. the host is left as it was: the same Parameter objects with the same values once the adapters are gone, no
   module/parameter/hook left behind, ComfyUI's module-level switches (`in_training`, the rope functions) restored,
   and the same values again after ComfyUI unpatched its LoRA;
and, separately, gradient checkpointing (which the planner may turn on) gives the gradients of the plain run.
About 1-2 minutes per ComfyUI version on 2 CPU cores; per-family numbers are printed at the end with -s.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import pytest
import torch
from comfy_real_support.families import CASES, FamilyCase, OtherComfyLoaded, build, import_comfy
from comfy_real_support.server import comfy_dir_or_skip

pytestmark = pytest.mark.comfyui

STEPS = 30
LR = 1e-2
SEED = 1234
IDS = [c.family for c in CASES]
RESULTS: dict[str, dict[str, object]] = {}


@pytest.fixture(scope="module")
def comfy(request):
    """The real `comfy` package of COMFYUI_DIR, imported on CPU in this process."""
    path = comfy_dir_or_skip(request, "comfy/supported_models.py", "imports a real ComfyUI")
    try:
        module = import_comfy(path)
    except OtherComfyLoaded as e:
        pytest.skip(f"{e} in this process (the test stand-in?): run this file on its own")
    module.version = _version(path)
    yield module
    if RESULTS:
        print(f"\nComfyUI {module.version} families:", json.dumps(RESULTS, indent=1))


def _version(path: Path) -> str:
    try:
        text = (path / "comfyui_version.py").read_text()
    except OSError:
        return "?"
    return text.rsplit("=", 1)[-1].strip().strip("\"'")


def _build(comfy, case: FamilyCase):
    if not hasattr(comfy.supported_models, case.config):
        pytest.skip(f"ComfyUI {comfy.version} has no {case.config} model config")
    return build(case, seed=0)


def _inputs(case: FamilyCase, tokens: int = 7):
    """Conditioning (as ComfyBundle.encode_text gives a flow family), one latent, and a fixed noise draw."""
    from loraloop.trainer.bundle import Conditioning
    from loraloop.trainer.loss import LossSettings, draw_noise

    gen = torch.Generator().manual_seed(SEED)
    context = torch.randn(1, tokens, case.context_dim, generator=gen)
    pooled = torch.randn(1, case.pooled_dim, generator=gen) if case.pooled_dim else None
    cond = Conditioning(context, pooled, torch.tensor([tokens]))
    latents = torch.randn(1, 16, *case.latent, generator=gen)
    return cond, latents, draw_noise(latents.shape, gen, LossSettings(), 1000, flow=True)


def _snapshot(root: torch.nn.Module) -> dict[str, tuple[torch.nn.Parameter, torch.Tensor]]:
    return {name: (p, p.detach().clone()) for name, p in root.named_parameters()}


def _hooks(root: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + ("forward" in vars(m))
               for m in root.modules())


def _switches() -> dict[str, object]:
    """ComfyUI's module-level state a trainer may flip: `in_training` and the rope functions its models call."""
    state: dict[str, object] = {"in_training": getattr(sys.modules["comfy.model_management"], "in_training", None)}
    for name, module in list(sys.modules.items()):
        if module is not None and name.startswith("comfy.ldm."):
            for attr in ("apply_rope", "apply_rope1"):
                if attr in vars(module):
                    state[f"{name}.{attr}"] = vars(module)[attr]
    return state


def _overfit(bundle, network, batch, after_step=None) -> list[float]:
    """STEPS AdamW steps of the flow loss on one fixed batch (conditioning, latents, noise draw); the losses."""
    from loraloop.trainer.loss import LossSettings, diffusion_loss

    cond, latents, draw = batch
    optimizer = torch.optim.AdamW(network.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        loss = diffusion_loss(bundle, latents, cond, draw, LossSettings())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if after_step is not None:
            after_step()
    return losses


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_family_trains_and_comfyui_loads_the_lora(comfy, case, caplog):
    from loraloop.nodes.bundle import ComfyBundle, detect_family
    from loraloop.trainer.naming import native_lora_name
    from loraloop.trainer.network import Network, NetworkSpec

    started = time.perf_counter()
    patcher = _build(comfy, case)
    unet = patcher.model.diffusion_model
    assert all(p.is_inference() for p in unet.parameters()), "the MODEL should hold inference tensors, as in a prompt"
    snap, names, hooks, switches = _snapshot(unet), [n for n, _ in unet.named_modules()], _hooks(unet), _switches()

    # 1. the family and its prediction type
    family, prediction = detect_family(patcher)
    assert (family.name, prediction) == (case.family, "flow")
    bundle = ComfyBundle(patcher, None, None)
    assert bundle.video_latent == (case.family == "qwen-image")

    # 2. a fixed batch overfits
    cond, latents, draw = _inputs(case)
    probe_x = torch.randn(1, 16, *case.latent, generator=torch.Generator().manual_seed(7))
    probe_sigma = torch.tensor([0.6])
    torch.manual_seed(SEED)
    with torch.inference_mode(False), bundle.trainable() as wrapped, \
            Network(bundle, NetworkSpec(rank=4, alpha=4)) as net:
        assert wrapped >= len(snap)  # every weight (and inference buffer) re-wrapped for autograd
        losses = _overfit(bundle, net, (cond, latents, draw))
        with torch.no_grad():
            adapted = bundle.predict(probe_x, probe_sigma, cond)
        lora = net.state_dict(torch.float32)
    train_s = time.perf_counter() - started
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < 0.7 * losses[0], (losses[0], losses[-1])

    # 4a. the adapters are gone: same Parameter objects, same values, same modules, no hooks, ComfyUI's switches back
    assert [n for n, _ in unet.named_modules()] == names
    assert _hooks(unet) == hooks
    assert _switches() == switches
    assert set(dict(unet.named_parameters())) == set(snap)
    for name, p in unet.named_parameters():
        assert p is snap[name][0], f"{name} is another Parameter object"
        assert torch.equal(p, snap[name][1]), f"{name} changed"

    # 3. ComfyUI's own loader maps every key, and its patched weights give the adapted prediction
    targets = bundle.unet_targets(conv=False)
    stems = {k.split(".", 1)[0] for k in lora}
    assert stems == {native_lora_name(path) for path in targets}
    assert set(lora) == {f"{s}.{part}" for s in stems for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    assert {s: key_map.get(s) for s in stems} == {native_lora_name(p): f"diffusion_model.{p}.weight" for p in targets}
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(lora, key_map)
    assert "lora key not loaded" not in caplog.text, caplog.text
    assert set(patches) == {f"diffusion_model.{p}.weight" for p in targets}
    clone = patcher.clone()
    assert set(clone.add_patches(patches, 1.0)) == set(patches)
    with torch.inference_mode():  # as a KSampler runs it
        base = bundle.predict(probe_x, probe_sigma, cond)
        clone.patch_model()
        try:
            patched = bundle.predict(probe_x, probe_sigma, cond)
        finally:
            clone.unpatch_model()
        after = bundle.predict(probe_x, probe_sigma, cond)
    diff = (patched - adapted).abs().max().item()
    assert (adapted - base).abs().max() > 1e-3, "the LoRA changes nothing: the comparison would prove nothing"
    assert diff < 1e-4, diff
    assert torch.equal(after, base)

    # 4b. ComfyUI's unpatch put the original values back (its Parameter objects are its own business)
    assert [n for n, _ in unet.named_modules()] == names
    for name, p in unet.named_parameters():
        assert torch.equal(p, snap[name][1]), f"{name} changed"

    RESULTS.setdefault(case.family, {}).update(
        loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4), max_abs_diff=float(f"{diff:.3g}"),
        lora_modules=len(stems), train_s=round(train_s, 1), total_s=round(time.perf_counter() - started, 1))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_family_gradient_checkpointing_gives_the_same_gradients(comfy, case):
    """The planner may turn gradient_checkpointing on. ComfyUI's DiT blocks add residuals into their input tensors in
    place (`img += …`), and checkpoint recomputes each block from its inputs in backward: the adapters' gradients
    must still be those of the plain run, and the blocks' forwards must be theirs again afterwards."""
    from loraloop.nodes.bundle import ComfyBundle
    from loraloop.trainer.checkpointing import gradient_checkpointing
    from loraloop.trainer.loss import LossSettings, diffusion_loss
    from loraloop.trainer.network import Network, NetworkSpec

    patcher = _build(comfy, case)
    unet = patcher.model.diffusion_model
    hooks = _hooks(unet)
    bundle = ComfyBundle(patcher, None, None)
    cond, latents, draw = _inputs(case)
    grads = []
    for enabled in (False, True):
        torch.manual_seed(SEED)
        with bundle.trainable(), Network(bundle, NetworkSpec(rank=4, alpha=4)) as net, \
                gradient_checkpointing(bundle.unet, enabled) as blocks:
            assert (blocks > 0) == enabled
            params = net.parameters()
            gen = torch.Generator().manual_seed(SEED)
            with torch.no_grad():
                for p in params:  # lora_up starts at 0: give every adapter a say in the output
                    p.normal_(std=0.1, generator=gen)
            diffusion_loss(bundle, latents, cond, draw, LossSettings()).backward()
            grads.append([None if p.grad is None else p.grad.clone() for p in params])
    assert _hooks(unet) == hooks
    plain, checkpointed = grads
    assert [g is None for g in plain] == [g is None for g in checkpointed]
    worst = max((a - b).abs().max().item() for a, b in zip(plain, checkpointed, strict=True) if a is not None)
    assert worst < 1e-6, worst
    RESULTS.setdefault(case.family, {})["checkpointing_grad_diff"] = worst


def test_flux_trains_on_fp8_weights_as_comfyui_holds_them(comfy):
    """A Flux MODEL loaded with fp8 weights (UNETLoader weight_dtype fp8_e4m3fn): the adapters train on top of the
    weights as they are — every block weight stays fp8 throughout (ComfyUI's manual-cast ops cast per call, no
    dequantised copy is kept), the loss falls, and the weights are bit-identical afterwards."""
    from loraloop.nodes.bundle import ComfyBundle
    from loraloop.trainer.memory import ModelInfo
    from loraloop.trainer.network import Network, NetworkSpec

    case = next(c for c in CASES if c.family == "flux1")
    if not hasattr(comfy.supported_models, case.config):
        pytest.skip(f"ComfyUI {comfy.version} has no {case.config} model config")
    fp8 = torch.float8_e4m3fn
    patcher = build(case, seed=0, weight_dtype=fp8)
    unet = patcher.model.diffusion_model
    block_weights = {n: p for n, p in unet.named_parameters()
                     if "blocks" in n and n.endswith(".weight") and p.dim() == 2}
    assert block_weights and all(p.dtype == fp8 for p in block_weights.values())
    snap = _snapshot(unet)
    bundle = ComfyBundle(patcher, None, None)
    assert bundle.dtype == fp8 and bundle.compute_dtype == torch.float32
    assert ModelInfo.for_bundle(bundle).sizes.unet == sum(p.numel() for p in unet.parameters())
    cond, latents, draw = _inputs(case)
    torch.manual_seed(SEED)
    with torch.inference_mode(False), bundle.trainable(), \
            Network(bundle, NetworkSpec(rank=4, alpha=4)) as net:
        def still_fp8() -> None:  # after every step: the adapted layers still hold fp8, nothing was upcast
            held = dict(unet.named_parameters())
            wrapped = [held[n.replace(".weight", ".base_layer.weight")] for n in block_weights
                       if n.replace(".weight", ".base_layer.weight") in held]
            assert wrapped and all(p.dtype == fp8 for p in wrapped)

        losses = _overfit(bundle, net, (cond, latents, draw), after_step=still_fp8)
        assert all(p.dtype == torch.float32 for p in net.parameters())  # the adapters themselves are float32
    assert losses[-1] < 0.7 * losses[0], (losses[0], losses[-1])
    for name, p in unet.named_parameters():
        assert p is snap[name][0] and p.dtype == snap[name][1].dtype and torch.equal(p.view(torch.uint8),
                                                                                    snap[name][1].view(torch.uint8))
    RESULTS.setdefault("flux1-fp8", {}).update(loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4))


def test_flux_trains_through_comfyuis_partial_loading(comfy):
    """When the plan streams blocks, TrainLoRA loads the MODEL through ComfyUI's own partial (lowvram) loading
    (nodes/training.py `keep_weights_on_device`): the layers left out run ComfyUI's cast-per-call ops. Training through
    them, with the checkpointing block swap needs, gives the fully loaded run's first loss exactly and overfits; the
    weights are bit-identical after, and ComfyUI unloads the model as usual."""
    import comfy.model_management as mm

    from loraloop.nodes.bundle import ComfyBundle
    from loraloop.nodes.training import keep_weights_on_device
    from loraloop.trainer.checkpointing import gradient_checkpointing
    from loraloop.trainer.network import Network, NetworkSpec

    case = next(c for c in CASES if c.family == "flux1")
    batch = _inputs(case)
    runs = []
    for partial in (False, True):
        patcher = _build(comfy, case)
        unet = patcher.model.diffusion_model
        snap = _snapshot(unet)
        mm.load_models_gpu([patcher])
        if partial:
            keep_weights_on_device(patcher, patcher.model_size() // 3)
            cast = [m for m in unet.modules() if getattr(m, "comfy_cast_weights", False)]
            assert cast, "nothing was left to ComfyUI's per-call casting"
        bundle = ComfyBundle(patcher, None, None)
        torch.manual_seed(SEED)
        with torch.inference_mode(False), bundle.trainable(), gradient_checkpointing(bundle.unet), \
                Network(bundle, NetworkSpec(rank=4, alpha=4)) as net:
            runs.append(_overfit(bundle, net, batch))
        for name, p in unet.named_parameters():
            assert torch.equal(p, snap[name][1]), f"{name} changed"
        mm.unload_all_models()
    full, partial = runs
    assert partial[0] == full[0]
    assert partial[-1] < 0.7 * partial[0], (partial[0], partial[-1])
    RESULTS.setdefault("flux1-partial-load", {}).update(loss_first=round(partial[0], 4),
                                                        loss_last=round(partial[-1], 4))
