"""Flow-matching families inside ComfyUI, against the stand-in's tiny Flux.1 (tests/comfy_stub/comfy/ldm/flux).

The fast representative of the DiT families: the real host tests (tests/test_comfy_real_families.py) build every
family's real ComfyUI module; here the engine's flow path is pinned down on one small model.
"""

import logging
import math
import shutil

import pytest
import torch
from comfy_stub.harness import DEMO, FAST, assert_unchanged, run_node, setup_host, snapshot

# isort: split
import comfy.model_management as mm
import comfy.sd
from comfy_stub import stub_models

from loraloop.nodes import definitions as nodes
from loraloop.nodes.bundle import ComfyBundle, trainable_weights
from loraloop.nodes.datasets import ComfyDataset
from loraloop.nodes.training import train_lora
from loraloop.nodes.widgets import node_config
from loraloop.trainer import flow, loop
from loraloop.trainer.bundle import Conditioning
from loraloop.trainer.errors import TrainingInterrupted
from loraloop.trainer.families import get_family
from loraloop.trainer.loss import LossSettings, diffusion_loss, draw_noise
from loraloop.trainer.network import Network, NetworkSpec

# kohya's Flux.1 names for the tiny model's 2 double + 2 single blocks, written out by hand (docs/families.md §3).
DOUBLE = ["img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2", "img_mod_lin",
          "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2", "txt_mod_lin"]
SINGLE = ["linear1", "linear2", "modulation_lin"]
FLUX_STEMS = {f"lora_unet_double_blocks_{i}_{n}" for i in range(2) for n in DOUBLE} | \
             {f"lora_unet_single_blocks_{i}_{n}" for i in range(2) for n in SINGLE}
ATTENTION_STEMS = {s for s in FLUX_STEMS if s.endswith(("attn_qkv", "attn_proj", "linear1", "linear2"))}


@pytest.fixture
def host(tmp_path):
    torch.set_flush_denormal(True)
    yield setup_host(tmp_path)
    torch.set_flush_denormal(False)


def dataset(base, folder="style"):
    return ComfyDataset(folder, base / "input" / folder, trigger_word="flatstyle")


def _bundle(schnell=False):
    patcher, clip, vae = stub_models.build_flux(schnell=schnell)
    return ComfyBundle(patcher, clip, vae)


def test_shift_is_the_models_own_model_sampling():
    """σ = the MODEL's model_sampling shift of u: ModelSamplingFlux's μ=1.15 for dev (= time_shift α=e^1.15), none for
    schnell; a user's ModelSamplingFlux node (an object patch) is what training then uses."""
    u = torch.linspace(0.01, 0.99, 9)
    with torch.inference_mode(False):
        dev, schnell = _bundle(), _bundle(schnell=True)
        assert torch.allclose(dev.shift_sigmas(u), flow.time_shift(u, math.exp(1.15)), atol=1e-6)
        assert torch.allclose(schnell.shift_sigmas(u), u, atol=1e-6)
        patcher = stub_models.build_flux()[0]
        sampling = patcher.get_model_object("model_sampling")
        sampling.set_parameters(shift=2.0)
        assert torch.allclose(ComfyBundle(patcher, None, None).shift_sigmas(u), flow.time_shift(u, math.exp(2.0)),
                              atol=1e-6)


def test_predict_is_the_velocity_with_guidance_1_and_pooled_y():
    """ComfyUI's apply_model gives x0 = x − σ·F; predict must return the network's own velocity F, fed what kohya
    feeds Flux.1 dev while training: guidance 1.0 (not ComfyUI's sampling default 3.5) and the pooled CLIP-L as y."""
    with torch.inference_mode(False), torch.no_grad():
        bundle = _bundle()
        cond = bundle.encode_text(["a cat", "a dog"])
        x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
        sigma = torch.tensor([0.3, 0.8])
        got = bundle.predict(x, sigma, cond)
        width = int(cond.lengths.max())
        native = bundle.unet(x, sigma, context=cond.context[:, :width], y=cond.pooled, guidance=torch.ones(2))
        at_35 = bundle.unet(x, sigma, context=cond.context[:, :width], y=cond.pooled, guidance=torch.full((2,), 3.5))
    assert cond.pooled.shape == (2, 32) and bundle.guidance == 1.0
    assert torch.allclose(got, native, atol=1e-5), (got - native).abs().max()
    assert not torch.allclose(got, at_35, atol=1e-3)


def test_captions_of_different_lengths_run_as_their_own_batches():
    """DiT text is not padded to 77: a batch of captions of different token counts is run one length at a time, each
    row exactly as if it were alone (padding would change the joint attention)."""
    with torch.inference_mode(False), torch.no_grad():
        bundle = _bundle()
        captions = ["a cat", "a very small cat sitting on a red wooden chair in the sun", "a dog"]
        cond = bundle.encode_text(captions)
        assert sorted(set(cond.lengths.tolist())) == [4, 15]
        x = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(1))
        sigma = torch.tensor([0.2, 0.5, 0.9])
        batched = bundle.predict(x, sigma, cond)
        alone = torch.cat([bundle.predict(x[i : i + 1], sigma[i : i + 1], bundle.encode_text([c]))
                           for i, c in enumerate(captions)])
    assert torch.allclose(batched, alone, atol=1e-5)


def test_flow_loss_is_zero_for_the_exact_velocity():
    """The flow target is ε − x0 at x_σ = (1−σ)·x0 + σ·ε, with σ = the bundle's shift of a drawn u."""

    class Oracle:
        prediction_type, device = "flow", torch.device("cpu")

        def shift_sigmas(self, u):
            return flow.time_shift(u, 3.0)

        def predict(self, noisy, sigmas, cond, sizes=None):
            s = sigmas.view(-1, 1, 1, 1)
            return (noisy - self.x0) / s  # x_σ − σ·v = x0 → v = (x_σ − x0)/σ = ε − x0

    oracle = Oracle()
    oracle.x0 = torch.randn(4, 16, 4, 4)
    for sampling in flow.TIMESTEP_SAMPLINGS:
        draw = draw_noise(oracle.x0.shape, torch.Generator().manual_seed(0), LossSettings(timestep_sampling=sampling),
                          1000, flow=True)
        assert ((draw.timesteps > 0) & (draw.timesteps < 1)).all() and draw.timesteps.dtype.is_floating_point
        loss = diffusion_loss(oracle, oracle.x0, Conditioning(torch.zeros(4, 1, 8)), draw, LossSettings())
        assert loss.item() < 1e-9
    u = flow.draw_u(20000, torch.Generator().manual_seed(0), "logit_normal")
    assert abs(u.median().item() - 0.5) < 0.02 and (u.sub(0.5).abs() < 0.25).float().mean() > 0.6  # mid noise
    with pytest.raises(ValueError, match="timestep_sampling must be one of"):
        flow.draw_u(2, torch.Generator(), "cosmap")
    sig = flow.sampler_sigmas(6, lambda v: flow.time_shift(v, 3.0))
    assert sig[0] == 1.0 and sig[-1] == 0.0 and (sig[1:] < sig[:-1]).all()


def _train(host, folder="style", **overrides):
    patcher, clip, vae = stub_models.build_flux()
    snap = snapshot(patcher.model.diffusion_model)
    with torch.inference_mode():
        run = train_lora(patcher, clip, vae, dataset(host, folder), node_config({**FAST, **overrides}),
                         name="flux-style", node_id="7")
    return patcher, run, snap


def test_flux_trains_restores_the_host_and_comfyui_loads_every_key(host, caplog):
    patcher, run, snap = _train(host)
    assert_unchanged(patcher.model.diffusion_model, snap)
    assert run.steps == 3 and all(math.isfinite(v) for v in run.losses)
    stems = {k.split(".")[0] for k in run.lora}
    assert stems == FLUX_STEMS
    assert any(run.lora[f"{s}.lora_up.weight"].abs().sum() > 0 for s in stems), "adapters did not train"
    meta = run.lora.metadata
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    with caplog.at_level(logging.WARNING):
        model, _ = comfy.sd.load_lora_for_models(patcher, None, dict(run.lora), 1.0, 0.0)
    assert "lora key not loaded" not in caplog.text
    assert set(model.patches) == FLUX_STEMS


def test_exported_names_merged_into_the_weights_reproduce_the_adapted_forward():
    """What ComfyUI's loader does with a DiT LoRA — find `diffusion_model.<path>.weight` for each
    `lora_unet_<path with _>` and add scale·up·down — gives the adapted model's output within 1e-4."""
    with torch.inference_mode(False):
        bundle = _bundle()
        torch.manual_seed(0)
        x = torch.randn(1, 16, 8, 8)
        sigma = torch.tensor([0.6])
        cond = bundle.encode_text(["a flat style cat"])
        with trainable_weights(bundle.unet):
            with Network(bundle, NetworkSpec(rank=4, alpha=2)) as network:
                for p in network.parameters():
                    torch.nn.init.normal_(p, std=0.05)
                with torch.no_grad():
                    adapted = bundle.predict(x, sigma, cond)
                lora = network.state_dict(torch.float32)
            with torch.no_grad():
                base = bundle.predict(x, sigma, cond)
                by_stem = {"lora_unet_" + n.replace(".", "_"): m for n, m in bundle.unet.named_modules()}
                originals = {}
                for stem in {k.split(".")[0] for k in lora}:
                    layer = by_stem[stem]
                    up, down = lora[f"{stem}.lora_up.weight"], lora[f"{stem}.lora_down.weight"]
                    scale = lora[f"{stem}.alpha"].item() / down.shape[0]
                    originals[stem] = layer.weight
                    layer.weight = torch.nn.Parameter(layer.weight + scale * (up @ down))
                merged = bundle.predict(x, sigma, cond)
                for stem, w in originals.items():
                    by_stem[stem].weight = w
    assert (adapted - base).abs().max() > 1e-3, "adapters made no difference: the test would prove nothing"
    assert torch.allclose(merged, adapted, atol=1e-4), (merged - adapted).abs().max()


def test_loss_falls_on_a_fixed_batch(host, monkeypatch):
    """One image, fixed noise and σ: 40 steps must take the flow loss down by at least 30%."""
    one = host / "input" / "one"
    one.mkdir()
    image = sorted(p for p in (host / "input" / "style").iterdir() if p.suffix == ".png")[0]
    shutil.copy(image, one / image.name)
    (one / image.with_suffix(".txt").name).write_text("flatstyle, a cat")
    monkeypatch.setattr(loop, "micro_batch_seed", lambda *a: 1234)
    _, run, _ = _train(host, "one", max_train_steps=40, learning_rate=5e-3, flip_aug=False)
    first, last = sum(run.losses[:5]) / 5, sum(run.losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)


def test_attention_preset_adapts_only_the_attention_projections(host):
    _, run, _ = _train(host, max_train_steps=1, target_preset="attention")
    assert {k.split(".")[0] for k in run.lora} == ATTENTION_STEMS


def test_error_and_cancel_leave_the_flux_model_bit_identical(host, monkeypatch):
    import server

    patcher, clip, vae = stub_models.build_flux()
    snap = snapshot(patcher.model.diffusion_model)

    def cancel_at_two(event, data, sid=None):
        if event == "loraloop.loss" and data.get("step") == 2:
            mm.interrupt_current_processing(True)

    server.PromptServer.instance.send_sync = cancel_at_two
    with torch.inference_mode(), pytest.raises(mm.InterruptProcessingException) as info:
        train_lora(patcher, clip, vae, dataset(host), node_config({**FAST, "max_train_steps": 4}), name="fx",
                   node_id="7")
    assert isinstance(info.value.__cause__, TrainingInterrupted)
    assert_unchanged(patcher.model.diffusion_model, snap)
    assert len(list((host / "models" / "loras").glob("fx-cancelled-step000002*.safetensors"))) == 1

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ComfyBundle, "_velocity", boom)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="disk full"):
        train_lora(patcher, clip, vae, dataset(host), node_config(FAST), name="fx2", node_id="7")
    assert_unchanged(patcher.model.diffusion_model, snap)


def test_the_train_node_samples_flux_as_its_users_do(host, monkeypatch):
    """The TrainLoRA node on a Flux MODEL with a sample prompt: the preview is drawn by Euler at cfg 1 (one pass per
    step, no unconditional batch) and guidance 3.5, as Flux.1 dev is sampled; training itself fed guidance 1.0."""
    model, clip, vae = stub_models.build_flux()
    guidance_seen, batch_seen = [], []
    velocity = ComfyBundle._velocity

    def spy(self, x, sigmas, context, pooled):
        guidance_seen.append(self.guidance)
        batch_seen.append(x.shape[0])
        return velocity(self, x, sigmas, context, pooled)

    monkeypatch.setattr(ComfyBundle, "_velocity", spy)
    widgets = {i.id: i.default for i in nodes.LoRATrainConfig.GET_SCHEMA().inputs if i.default is not None}
    config = run_node(nodes.LoRATrainConfig, **{**widgets, **FAST, "max_train_steps": 2,
                                                "sample_prompts": "flatstyle cat"}).args[0]
    data = run_node(nodes.LoadDataset, folder="style", recursive=False, caption_extension=".txt").args[0]
    out = run_node(nodes.TrainLoRA, model=model, clip=clip, vae=vae, dataset=data, config=config, name="fluxnode",
                   save_on_cancel=False, preview_steps=3)
    lora, trained = out.args[0], out.args[1]
    assert set(trained.patches) == FLUX_STEMS and {k.split(".")[0] for k in lora} == FLUX_STEMS
    assert guidance_seen[:2] == [1.0, 1.0] and guidance_seen[-3:] == [3.5, 3.5, 3.5]
    assert batch_seen[-3:] == [1, 1, 1]  # cfg 1: no unconditional half
    assert getattr(lora, "preview", None) is not None


def test_refused_models_name_what_is_missing(host):
    from loraloop.trainer.errors import UnsupportedModelError

    data = run_node(nodes.LoadDataset, folder="style", recursive=False, caption_extension=".txt").args[0]
    model, clip, vae = stub_models.build("flux2")
    with pytest.raises(UnsupportedModelError, match=r"Flux.2 .*128-channel"):
        run_node(nodes.TrainLoRA, model=model, clip=clip, vae=vae, dataset=data, name="x", save_on_cancel=False)
    assert DEMO.is_dir()


def test_the_planner_counts_the_hosts_own_dit():
    """Inside ComfyUI the planner sizes the DiT the host holds: its parameters and the LoRA's exactly as the network
    will build them (any size, the tiny model here), with the closed-form step model of dit.py."""
    from loraloop.trainer.memory import ModelInfo, RunShape
    from loraloop.trainer.memory.estimation.devices import cpu_device
    from loraloop.trainer.memory.estimation.estimate import estimate_memory

    with torch.inference_mode(False):
        bundle = _bundle()
        info = ModelInfo.for_bundle(bundle)
        with trainable_weights(bundle.unet), Network(bundle, NetworkSpec(rank=4, alpha=4)) as network:
            adapter = sum(p.numel() for p in network.parameters())
    assert info.sizes.unet == sum(p.numel() for p in bundle.unet.parameters())
    assert info.sizes.adapter_params(4) == adapter
    small = estimate_memory(info, RunShape("flux1", (64, 64), mixed_precision="no"), cpu_device())
    large = estimate_memory(info, RunShape("flux1", (256, 256), mixed_precision="no"), cpu_device())
    assert 0 < small.parts["activations"] < large.parts["activations"]


def test_text_encoder_lora_trains_flux_clip_l_only(host):
    """train_text_encoder on Flux.1: CLIP-L (kohya lora_te1, it makes the pooled vector) trains beside the DiT; the
    T5 stays frozen. Families without a CLIP refuse it with the reason."""
    patcher, clip, vae = stub_models.build_flux()
    snap = snapshot(clip.cond_stage_model)
    with torch.inference_mode():
        run = train_lora(patcher, clip, vae, dataset(host), node_config({**FAST, "max_train_steps": 2,
                                                                        "train_text_encoder": True}),
                         name="fte", node_id="7")
    prefixes = {k.split("_")[0] + "_" + k.split("_")[1] for k in run.lora}
    assert prefixes == {"lora_unet", "lora_te1"}
    assert_unchanged(clip.cond_stage_model, snap)
    from loraloop.nodes.bundle import text_encoder_slots
    from loraloop.trainer.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="zimage has no CLIP text encoder"):
        text_encoder_slots(clip, get_family("zimage"))


def test_a_plan_that_swaps_blocks_loads_part_of_the_weights_through_comfyui(host, monkeypatch):
    """When the plan streams blocks, TrainLoRA asks ComfyUI's own partial loading (lowvram) to keep the plan's weight
    bytes on the device and trains with checkpointing; the model is handed back bit-identical."""
    from dataclasses import replace

    from loraloop.nodes import training

    real_plan = training.plan_run
    budgets = []

    def swapping_plan(bundle, config, data):
        plan = real_plan(bundle, config, data)
        budget = int(bundle.patcher.model_size() * 0.4)
        budgets.append(budget)
        memory = replace(plan.memory, parts={**plan.memory.parts, "weights_unet": budget})
        return replace(plan, shape=replace(plan.shape, blocks_to_swap=2, gradient_checkpointing=True,
                                           weights_resident=False), memory=memory)

    monkeypatch.setattr(training, "plan_run", swapping_plan)
    mm.load_calls.clear()
    patcher, run, snap = _train(host)
    assert run.steps == 3 and all(math.isfinite(v) for v in run.losses)
    (_, _, full_load), = [c for c in mm.load_calls if c[0][0] is patcher]
    assert not full_load
    assert patcher.partial_loads == [(patcher.load_device, budgets[0] - patcher.model_size())]
    assert patcher.loaded_size() == budgets[0]
    assert run.lora.metadata["ss_gradient_checkpointing"] == "True"
    assert_unchanged(patcher.model.diffusion_model, snap)
