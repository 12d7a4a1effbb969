"""The ComfyUI host bundle against the stand-in (tests/comfy_stub), with the real ldm UNet and the real engine."""

import math

import pytest
import torch
from comfy_stub.harness import FAST, assert_unchanged, setup_host, snapshot  # puts the stand-in first on sys.path

# isort: split
import comfy.model_management as mm
from comfy_stub import stub_models

from loraloop.nodes.bundle import ComfyBundle, detect_family, trainable_weights
from loraloop.nodes.datasets import ComfyDataset
from loraloop.nodes.training import train_lora
from loraloop.nodes.widgets import node_config
from loraloop.trainer.bundle import Conditioning, SizeInfo
from loraloop.trainer.errors import TrainingInterrupted, UnsupportedModelError
from loraloop.trainer.families import get_family

# kohya names of the tiny UNet's attention blocks (attention at the full-resolution level only): SD1/SD2 use the
# diffusers path, SDXL the LDM path (docs/lora-format.md §1.3). Written out by hand, not computed by our naming code.
SD1_BLOCKS = ["down_blocks_0_attentions_0", "down_blocks_0_attentions_1", "mid_block_attentions_0",
              "up_blocks_1_attentions_0", "up_blocks_1_attentions_1", "up_blocks_1_attentions_2"]
SDXL_BLOCKS = ["input_blocks_1_1", "input_blocks_2_1", "middle_block_1", "output_blocks_3_1", "output_blocks_4_1",
               "output_blocks_5_1"]
LAYERS = ["proj_in", "proj_out"] + [f"transformer_blocks_0_{a}_{p}" for a in ("attn1", "attn2")
                                    for p in ("to_q", "to_k", "to_v", "to_out_0")] + \
         ["transformer_blocks_0_ff_net_0_proj", "transformer_blocks_0_ff_net_2"]


def expected(blocks):
    return {f"lora_unet_{b}_{layer}" for b in blocks for layer in LAYERS}


@pytest.fixture
def host(tmp_path):
    # Tiny random models hit subnormal floats in backward, which are ~5x slower on CPU; flush them for these tests.
    torch.set_flush_denormal(True)
    yield setup_host(tmp_path)
    torch.set_flush_denormal(False)


def dataset(base):
    return ComfyDataset("style", base / "input" / "style", trigger_word="flatstyle")


def test_family_detection():
    assert [detect_family(stub_models.build(k)[0])[0].name
            for k in ("sd15", "sd20v", "sdxl")] == ["sd1", "sd2-v", "sdxl"]
    assert detect_family(stub_models.build("sd20v")[0])[1] == "v_prediction"
    with pytest.raises(UnsupportedModelError, match="WAN21_T2V"):
        detect_family(stub_models.build("wan")[0])
    with pytest.raises(UnsupportedModelError, match=r"Flux2: Flux.2 .* 128-channel"):
        detect_family(stub_models.build("flux2")[0])
    assert detect_family(stub_models.build_flux()[0]) == (get_family("flux1"), "flow")
    assert detect_family(stub_models.build_flux(schnell=True)[0])[0].name == "flux1-schnell"


@pytest.mark.parametrize("kind", ["sd15", "sd20v"])
def test_predict_converts_x0_to_the_native_prediction(kind):
    """apply_model returns x0 given sigma; predict must return exactly what the UNet itself predicts (eps or v)."""
    patcher, _, _ = stub_models.build(kind)
    with torch.inference_mode(False), torch.no_grad():  # weights are inference tensors that require grad (0.12.3)
        bundle = ComfyBundle(patcher, None, None)
        gen = torch.Generator().manual_seed(0)
        noisy = torch.randn(3, 4, 8, 8, generator=gen)
        t = torch.tensor([5, 400, 990])
        ctx = torch.randn(3, 77, 32, generator=gen)
        native = bundle.unet(noisy, t.float(), context=ctx)  # eps (or v) from the UNet, VP input
        got = bundle.predict(noisy, t, Conditioning(ctx))
    assert torch.allclose(got, native, atol=2e-4, rtol=1e-4), (got - native).abs().max()
    # ᾱ comes from the model's sigmas: ᾱ = 1/(1+σ²) must match the scaled-linear schedule
    from loraloop.trainer.schedule import scaled_linear_alphas_cumprod

    assert torch.allclose(bundle.alphas_cumprod, scaled_linear_alphas_cumprod(), atol=1e-6)


def test_sdxl_predict_passes_adm():
    patcher, clip, _ = stub_models.build("sdxl")
    with torch.inference_mode(False), torch.no_grad():
        bundle = ComfyBundle(patcher, clip, None)
        cond = bundle.encode_text(["a cat", "a dog"])
        assert cond.context.shape == (2, 77, 64) and cond.pooled.shape == (2, 32)
        noisy = torch.randn(2, 4, 8, 8)
        sizes = [SizeInfo((64, 64), (0, 0), (64, 64)), SizeInfo((80, 64), (8, 0), (64, 64))]
        out = bundle.predict(noisy, torch.tensor([100, 100]), cond, sizes)
        y = torch.cat([bundle.base_model.encode_adm(pooled_output=cond.pooled[i : i + 1], height=s.original[0],
                                                    width=s.original[1], crop_h=s.crop_top_left[0], crop_w=0,
                                                    target_height=64, target_width=64) for i, s in enumerate(sizes)])
        native = bundle.unet(noisy, torch.tensor([100.0, 100.0]), context=cond.context, y=y)
    assert torch.allclose(out, native, atol=2e-4)


def test_inference_weights_need_the_rewrap_and_it_restores_bit_exactly():
    patcher, _, _ = stub_models.build("sd15")
    unet = patcher.model.diffusion_model
    snap = snapshot(unet)
    x = torch.randn(1, 4, 8, 8)
    ctx = torch.randn(1, 77, 32)
    with torch.inference_mode(), torch.inference_mode(False):
        extra = torch.nn.Parameter(torch.zeros(1, 4, 8, 8))
        with pytest.raises(RuntimeError, match=r"[Ii]nference tensors"):
            unet(x + extra, torch.tensor([10.0]), context=ctx).sum().backward()
        with trainable_weights(unet) as n:
            assert n == len(snap)
            before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
            unet(x + extra, torch.tensor([10.0]), context=ctx).sum().backward()
            assert extra.grad is not None and extra.grad.abs().sum() > 0
            assert all(p.data_ptr() == snap[name][0].data_ptr() for name, p in unet.named_parameters())  # no copy
            assert (torch.cuda.memory_allocated() if torch.cuda.is_available() else 0) == before
    assert_unchanged(unet, snap)


def _train(host, kind="sd15", **overrides):
    patcher, clip, vae = stub_models.build(kind)
    snap = snapshot(patcher.model.diffusion_model)
    config = node_config({**FAST, **overrides})
    with torch.inference_mode():  # ComfyUI runs the prompt under inference mode
        run = train_lora(patcher, clip, vae, dataset(host), config, name="style", node_id="7")
    return patcher, run, snap


def test_training_restores_the_host_model_and_exports_kohya_names(host):
    patcher, run, snap = _train(host)
    assert_unchanged(patcher.model.diffusion_model, snap)
    assert run.steps == 3 and len(run.losses) == 3 and all(math.isfinite(v) for v in run.losses)
    stems = {k.split(".")[0] for k in run.lora}
    assert stems == expected(SD1_BLOCKS)
    assert any(run.lora[f"{s}.lora_up.weight"].abs().sum() > 0 for s in stems), "adapters did not train"
    assert run.lora.metadata["ss_base_model_version"] == "sd_v1" and run.lora.trigger_words == ["flatstyle"]
    # the LoRA is applied to the returned clone only
    assert set(run.model.patches) == stems and not patcher.patches and run.model.model is patcher.model
    # the UNet was loaded for training with every other model evicted and a full load
    models, memory, full = mm.load_calls[-1]
    assert models == [patcher] and memory >= 1e20 and full
    assert mm.empty_cache_calls > 0


class _InferenceWeightVAE:
    """The stand-in VAE plus an identity 1×1 convolution whose weight is, like every weight real ComfyUI 0.12.3 loads on
    CPU (fp32, no dtype cast), an inference tensor with requires_grad=True: calling it with autograd on fails."""

    def __init__(self, vae):
        self.inner, self.patcher = vae, vae.patcher
        with torch.inference_mode():
            self.weight = torch.nn.Parameter(torch.eye(4).view(4, 4, 1, 1))

    def encode(self, images):
        return torch.nn.functional.conv2d(self.inner.encode(images), self.weight)

    def decode(self, latents, **kwargs):
        return self.inner.decode(torch.nn.functional.conv2d(latents, self.weight), **kwargs)


def test_weights_that_require_grad_as_in_comfyui_0_12_3(host, monkeypatch):
    """Real ComfyUI 0.12.3 loads every UNet, CLIP and VAE weight as an inference tensor with requires_grad=True (the
    stand-in builds them with False). Found in the real host: the final preview put adapters in and toggled
    requires_grad on those weights ("Setting requires_grad=True on inference tensor outside InferenceMode"), and its
    VAE decode ran with autograd on ("Inference tensors cannot be saved for backward"). Also covers VAE encoding per
    step (cache_latents off) and CLIP encoding per step (shuffled captions)."""
    from PIL import Image

    patcher, clip, vae = stub_models.build("sd15")
    with torch.inference_mode():
        patcher.model.diffusion_model.requires_grad_(True)
        clip.cond_stage_model.requires_grad_(True)
    vae = _InferenceWeightVAE(vae)
    snap = snapshot(patcher.model.diffusion_model)
    config = node_config({**FAST, "max_train_steps": 2, "sample_prompts": "flatstyle, a star", "sample_steps": 2,
                          "sample_every_n_steps": 1, "cache_latents": False, "shuffle_caption": True})
    from loraloop.nodes.sink import ComfySink

    progress = []
    monkeypatch.setattr(ComfySink, "sampling_step", lambda self, done, total: progress.append((done, total)))
    with torch.inference_mode():
        run = train_lora(patcher, clip, vae, dataset(host), config, name="style", node_id="7", preview_steps=3)
    assert run.steps == 2
    assert_unchanged(patcher.model.diffusion_model, snap)
    assert all(p.requires_grad for p in patcher.model.diffusion_model.parameters())
    assert isinstance(run.lora.preview, Image.Image) and run.lora.preview.size == (64, 64)  # a sample, not the plot
    assert progress == [(1, 3), (2, 3), (3, 3)]  # the preview after training reports its own progress


def test_metadata_records_the_checkpoint_comfyui_loaded(host):
    """ComfyUI 0.3x's loaders record the file on the patcher (`cached_patcher_init`); the LoRA names that base model,
    not itself, in ss_sd_model_name and in the embedded config."""
    import json

    from loraloop.nodes.training import checkpoint_name
    from loraloop.trainer.metadata import quick_model_hash

    patcher, clip, vae = stub_models.build("sd15")
    checkpoint = host / "models" / "checkpoints" / "sub" / "rand_sd15.safetensors"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(bytes(range(256)) * 8192)  # 2 MiB: the hash reads 64 KiB at 1 MiB
    patcher.cached_patcher_init = (print, (str(checkpoint), False, False), 0)
    with torch.inference_mode():
        run = train_lora(patcher, clip, vae, dataset(host), node_config({**FAST, "max_train_steps": 1}),
                         name="style", node_id="7")
    assert run.lora.metadata["ss_sd_model_name"] == "rand_sd15.safetensors"
    assert run.lora.metadata["ss_sd_model_hash"] == quick_model_hash(checkpoint) != ""
    assert json.loads(run.lora.metadata["loraloop_config"])["base_model"] == "rand_sd15.safetensors"
    assert "loader did not record" in checkpoint_name(stub_models.build("sd15")[0])  # 0.12.3 has no record


def test_sdxl_and_v_prediction_train(host):
    patcher, run, snap = _train(host, "sdxl", max_train_steps=1)
    assert_unchanged(patcher.model.diffusion_model, snap)
    assert {k.split(".")[0] for k in run.lora} == expected(SDXL_BLOCKS)
    patcher, run, snap = _train(host, "sd20v", max_train_steps=1)
    assert_unchanged(patcher.model.diffusion_model, snap)
    assert run.lora.metadata["ss_base_model_version"] == "sd_v2_v"
    assert run.lora.metadata["modelspec.prediction_type"] == "v"


def test_cancel_stops_within_a_step_saves_partial_and_restores(host):
    import server

    patcher, clip, vae = stub_models.build("sd15")
    snap = snapshot(patcher.model.diffusion_model)
    steps_seen = []

    def cancel_after_two(event, data, sid=None):
        server.PromptServer.instance.messages.append((event, data, sid))
        if event == "loraloop.loss" and data.get("step"):
            steps_seen.append(data["step"])
            if data["step"] == 2:
                mm.interrupt_current_processing(True)  # the user presses Cancel

    server.PromptServer.instance.send_sync = cancel_after_two
    with torch.inference_mode(), pytest.raises(mm.InterruptProcessingException) as info:
        train_lora(patcher, clip, vae, dataset(host), node_config({**FAST, "max_train_steps": 4}), name="style",
                   node_id="7")
    assert steps_seen == [1, 2]
    assert isinstance(info.value.__cause__, TrainingInterrupted)
    saved = list((host / "models" / "loras").glob("style-cancelled-step000002*.safetensors"))
    assert len(saved) == 1
    assert_unchanged(patcher.model.diffusion_model, snap)
    assert not mm.processing_interrupted()


def test_cancel_raised_inside_an_op_saves_the_last_completed_step(host, monkeypatch):
    """ComfyUI 0.33: `comfy/ops.py` raises InterruptProcessingException (a BaseException there) from inside every op's
    forward, mid-step, so the engine's own stop check never sees the Cancel. The last completed step is still saved."""

    class Interrupt033(BaseException):
        pass

    monkeypatch.setattr(mm, "InterruptProcessingException", Interrupt033)
    patcher, clip, vae = stub_models.build("sd15")
    snap = snapshot(patcher.model.diffusion_model)
    forwards = []

    def op_checks_interrupt(module, args):
        forwards.append(1)
        if len(forwards) == 3:  # Cancel pressed during the third step's forward
            raise Interrupt033

    handle = patcher.model.diffusion_model.register_forward_pre_hook(op_checks_interrupt)
    try:
        with torch.inference_mode(), pytest.raises(Interrupt033) as info:
            train_lora(patcher, clip, vae, dataset(host), node_config({**FAST, "max_train_steps": 5,
                                                                      "gradient_checkpointing": "off"}),
                       name="style033", node_id="7")
    finally:
        handle.remove()
    cancel = info.value.__cause__
    assert isinstance(cancel, TrainingInterrupted) and cancel.step == 2
    saved = list((host / "models" / "loras").glob("style033-cancelled-step000002*.safetensors"))
    assert len(saved) == 1 and cancel.saved == saved[0]
    assert_unchanged(patcher.model.diffusion_model, snap)


def test_an_error_mid_training_leaves_the_host_clean(host, monkeypatch):
    from loraloop.nodes import sink

    patcher, clip, vae = stub_models.build("sd15")
    snap = snapshot(patcher.model.diffusion_model)

    def boom(self, info):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sink.ComfySink, "step", boom)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="disk full"):
        train_lora(patcher, clip, vae, dataset(host), node_config({**FAST, "max_train_steps": 1}), name="style",
                   node_id="7")
    assert_unchanged(patcher.model.diffusion_model, snap)


def test_progress_reaches_the_node(host):
    import comfy.utils
    import server

    _train(host)
    events = [d for e, d, _ in server.PromptServer.instance.messages if e == "loraloop.loss"]
    assert events[0] == {"node": "7", "reset": True}
    assert [e["step"] for e in events[1:]] == [1, 2, 3] and all(e["total"] == 3 for e in events[1:])
    texts = [d["text"] for e, d, _ in server.PromptServer.instance.messages if e == "progress_text"]
    assert any(t.startswith("step 3/3 · loss ") and "ETA" in t for t in texts)
    assert [u[0] for u in comfy.utils.updates if u[3] == "7"][-1] == 3


@pytest.mark.parametrize(("kind", "prefixes"), [("sd15", {"lora_te"}), ("sdxl", {"lora_te1", "lora_te2"})])
def test_text_encoder_training_inside_comfyui(host, kind, prefixes):
    """train_text_encoder: the CLIP's text models get adapters, captions are encoded through them with autograd every
    step, the LoRA holds kohya lora_te names that ComfyUI applies to the CLIP clone, and both the UNet and the CLIP
    are handed back bit-identical."""
    patcher, clip, vae = stub_models.build(kind)
    unet_snap, clip_snap = snapshot(patcher.model.diffusion_model), snapshot(clip.cond_stage_model)
    config = node_config({**FAST, "max_train_steps": 2, "train_text_encoder": True, "text_encoder_lr": 1e-2,
                          "sample_prompts": "flatstyle, a star", "sample_steps": 2})
    with torch.inference_mode():
        run = train_lora(patcher, clip, vae, dataset(host), config, name="style", node_id="7")
    assert_unchanged(patcher.model.diffusion_model, unet_snap)
    assert_unchanged(clip.cond_stage_model, clip_snap)
    te = {k for k in run.lora if k.startswith("lora_te")}
    assert {k.split("_text_model_")[0] for k in te} == prefixes
    layer = next(iter(sorted(prefixes)))
    up = run.lora[f"{layer}_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"]
    assert up.abs().max() > 0  # trained: lora_up starts at zero
    n_layers = clip.cond_stage_model.items()[0][1].config.num_hidden_layers
    assert len([k for k in te if k.startswith(layer + "_") and k.endswith(".lora_down.weight")]) == 6 * n_layers
    assert run.clip is not clip and {s.split("_text_model_")[0] for s in run.clip.patcher.patches} == prefixes
    assert not clip.patcher.patches
    # No model-management call while the weights are re-wrapped: after the load for training, only the final
    # preview's VAE decode loads anything (a CLIP load mid-training could unload part of the UNet on a GPU).
    after = mm.load_calls[[memory for _, memory, _ in mm.load_calls].index(1e20) + 1 :]
    assert all(clip.patcher not in models for models, _, _ in after)


def test_text_encoder_lora_continues_only_with_train_text_encoder(host):
    from loraloop.trainer.errors import LoraFileError

    patcher, clip, vae = stub_models.build("sd15")
    config = node_config({**FAST, "max_train_steps": 1, "train_text_encoder": True})
    with torch.inference_mode():
        first = train_lora(patcher, clip, vae, dataset(host), config, name="te", node_id="7")
    from loraloop.trainer.lorafile import save_lora

    save_lora(host / "models" / "loras" / "te.safetensors", dict(first.lora), first.lora.metadata)
    with torch.inference_mode(), pytest.raises(LoraFileError, match="turn on train_text_encoder"):
        train_lora(patcher, clip, vae, dataset(host), node_config({**FAST, "resume_lora": "te.safetensors"}),
                   name="te2", node_id="7")
    with torch.inference_mode():
        again = train_lora(patcher, clip, vae, dataset(host),
                           node_config({**FAST, "max_train_steps": 1, "train_text_encoder": True,
                                        "resume_lora": "te.safetensors"}), name="te2", node_id="7")
    assert set(again.lora) == set(first.lora)


class _InPlaceResidualLayer(torch.nn.Module):
    """The residual pattern of ComfyUI 0.12.3's CLIPLayer (comfy/clip_model.py): `x += f(norm(x))`, in place."""

    def __init__(self, width=8):
        super().__init__()
        self.layer_norm1, self.layer_norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.attn, self.mlp = torch.nn.Linear(width, width), torch.nn.Linear(width, width)

    def forward(self, x, in_place=True):
        if not in_place:
            return x + self.attn(self.layer_norm1(x)) + self.mlp(self.layer_norm2(x + self.attn(self.layer_norm1(x))))
        x += self.attn(self.layer_norm1(x))
        x += self.mlp(self.layer_norm2(x))
        return x


def test_autograd_runs_through_in_place_residuals_and_leaves_no_hooks():
    from loraloop.nodes.bundle import autograd_safe_residuals

    torch.manual_seed(0)
    layer = _InPlaceResidualLayer()
    x = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="inplace operation"):
        layer(x * 1).sum().backward()
    x.grad = None
    with autograd_safe_residuals([layer]) as hooked:
        layer(x * 1).sum().backward()
    assert hooked == 2
    got = x.grad.clone()
    x.grad = None
    layer(x, in_place=False).sum().backward()
    assert torch.allclose(got, x.grad, atol=1e-6)
    assert all(not m._forward_pre_hooks for m in layer.modules())


def test_cancel_while_caching_latents_is_a_comfyui_interrupt(host):
    patcher, clip, vae = stub_models.build("sd15")
    snap = snapshot(patcher.model.diffusion_model)
    mm.interrupt_current_processing(True)  # Cancel pressed before the first image is encoded
    with torch.inference_mode(), pytest.raises(mm.InterruptProcessingException):
        train_lora(patcher, clip, vae, dataset(host), node_config(FAST), name="style", node_id="7")
    assert vae.encode_calls == 0 and all(memory != 1e20 for _, memory, _ in mm.load_calls)  # UNet never loaded
    assert_unchanged(patcher.model.diffusion_model, snap)
    assert not list((host / "models" / "loras").glob("*.safetensors"))


def test_uncached_text_keeps_the_clip_loaded_beside_the_unet(host):
    patcher, clip, vae = stub_models.build("sd15")
    with torch.inference_mode():
        train_lora(patcher, clip, vae, dataset(host),
                   node_config({**FAST, "max_train_steps": 1, "cache_text_encoder_outputs": False}), name="s",
                   node_id="7")
    (models,) = [m for m, memory, _ in mm.load_calls if memory == 1e20]  # the load for training
    assert clip.patcher in models and patcher in models


def test_uncached_latents_encode_through_the_resident_vae_without_model_management(host):
    """cache_latents off: the VAE is loaded with the UNet for training and images are encoded through it directly; a
    VAE.encode (which calls load_models_gpu) while the weights are re-wrapped could unload part of the UNet on a GPU."""
    patcher, clip, vae = stub_models.build("sd15")
    snap = snapshot(patcher.model.diffusion_model)
    with torch.inference_mode():
        train_lora(patcher, clip, vae, dataset(host),
                   node_config({**FAST, "max_train_steps": 2, "cache_latents": False}), name="s", node_id="7")
    (models,) = [m for m, memory, _ in mm.load_calls if memory == 1e20]
    assert vae.patcher in models and patcher in models
    assert vae.encode_calls == 0 and vae.first_stage_model.calls >= 2  # every step, none through VAE.encode
    assert_unchanged(patcher.model.diffusion_model, snap)
