"""Training inside the (stand-in) webui with the real engine: queue wrapper, restore after success/error/cancel, files.

Each run trains the real ldm UNet behind the webui's objects for a few steps on CPU and then checks that the model is
bit-identical to the clean base (parameters, buffers, module objects, requires_grad, no patched forwards), that the
kohya keys, metadata and card files are right and that the Lora extension's list was refreshed.
"""

import json

import pytest
import torch
from a1111_stub import models
from a1111_stub.fixtures import webui_fixture  # noqa: F401 - the `webui` fixture
from PIL import Image, ImageDraw
from safetensors import safe_open

from loraloop.trainer.errors import ConfigError, UnsupportedModelError

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220)}
FAST = dict(resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32, lora_rank=2,
            max_train_steps=2, lr_scheduler="constant", learning_rate=1e-3, make_preview=False, sample_steps=1,
            gradient_checkpointing=False)


@pytest.fixture
def dataset(tmp_path):
    """Three 64×64 images with .txt captions (one with brackets, which must reach the text encoder literally)."""
    folder = tmp_path / "dataset"
    folder.mkdir()
    for i, (name, rgb) in enumerate(COLORS.items()):
        image = Image.new("RGB", (64, 64), (250, 250, 250))
        ImageDraw.Draw(image).ellipse((12, 12, 52, 52), fill=rgb)
        image.save(folder / f"{i}.png")
        caption = f"flat style, a {name} circle" + (" (centered)" if i == 0 else "")
        (folder / f"{i}.txt").write_text(caption, encoding="utf-8")
    return folder


def tab_values(webui, dataset, **overrides):
    from loraloop.a1111 import widgets as form

    values = form.default_values(webui.output_dir / "loraloop")
    values.update(FAST, train_data_dir=str(dataset), **overrides)
    return values


def snapshot(model):
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "modules": [(n, id(m)) for n, m in model.named_modules()],
            "grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "dtypes": {n: p.dtype for n, p in model.named_parameters()},
            "devices": {n: p.device for n, p in model.named_parameters()}}


def assert_identical(model, snap):
    state = model.state_dict()
    assert state.keys() == snap["state"].keys()
    changed = [k for k, v in state.items() if not torch.equal(v, snap["state"][k])]
    assert not changed, f"{len(changed)} tensors changed, e.g. {changed[:3]}"
    assert [(n, id(m)) for n, m in model.named_modules()] == snap["modules"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == snap["grad"]
    assert {n: p.dtype for n, p in model.named_parameters()} == snap["dtypes"]
    assert {n: p.device for n, p in model.named_parameters()} == snap["devices"]
    assert not [n for n, m in model.named_modules() if "forward" in m.__dict__]  # no checkpointing wrapper left


def read_lora(path):
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()  # noqa: SIM118


def test_sd1_run_from_the_tab(webui, dataset):
    """The Train button's function, through the webui's GPU queue wrapper, with a LoRA still applied from the last
    generation, text-encoder training, intermediate saves and sample previews."""
    from loraloop.a1111 import widgets as form
    from loraloop.a1111.actions import TabActions

    model = webui.load(models.build_sd("sd1"))
    unet_layer = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k
    te_modules = dict(model.cond_stage_model.wrapped.transformer.named_modules())  # `text_model.` only before 4.31
    te_layer = next(m for n, m in te_modules.items() if n.endswith("layers.0.self_attn.q_proj"))
    clean = snapshot(model)
    webui.networks.apply_for_test(unet_layer, torch.full_like(unet_layer.weight, 0.5), "old_lora")
    webui.networks.apply_for_test(te_layer, torch.full_like(te_layer.weight, 0.5), "old_lora")
    assert not torch.equal(unet_layer.weight, clean["state"][
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"])
    rng = torch.random.get_rng_state()
    gc_before = webui.devices.gc_calls

    names = [f.name for f in form.form_fields()]
    handlers = TabActions(names)
    train = handlers.train_job()
    assert webui.call_queue.wrapped == [handlers.train]  # the webui's GPU queue wrapper, shared with txt2img
    values = tab_values(webui, dataset, output_name="sd1_test", trigger_word="flatstyle", train_text_encoder=True,
                        save_every_n_steps=1, save_last_n=1, sample_prompts="a red circle", sample_every_n_steps=1,
                        make_preview=True, gradient_checkpointing=True)
    loss_plot, preview, html = train("task(abc12)", *[values[n] for n in names])

    assert "Trained 2 steps" in html and "&lt;lora:sd1_test:0.8&gt;" in html, html
    assert isinstance(loss_plot, Image.Image) and isinstance(preview, Image.Image)
    assert "old_lora" in html  # the user is told the applied LoRA was taken out
    assert_identical(model, clean)  # the clean base: the applied LoRA is out, the trained one never merged
    assert webui.networks.loaded_networks == []
    assert unet_layer.network_current_names == () and te_layer.network_current_names == ()
    assert torch.equal(torch.random.get_rng_state(), rng)  # the webui's seeds are not disturbed

    lora_dir, work = webui.lora_dir, webui.output_dir / "loraloop"
    assert sorted(p.name for p in lora_dir.iterdir()) == [
        "sd1_test-step000002.safetensors", "sd1_test.json", "sd1_test.preview.png", "sd1_test.safetensors"]
    assert {p.name for p in work.iterdir()} >= {"sd1_test.yaml", "sd1_test_loss.png", "sd1_test-state.pt", "samples"}
    assert sorted(p.name for p in (work / "samples").iterdir()) == ["sd1_test_step000001.png",
                                                                    "sd1_test_step000002.png"]

    tensors, meta = read_lora(lora_dir / "sd1_test.safetensors")
    stems = {k.split(".", 1)[0] for k in tensors}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k" in stems  # diffusers-style, SD1
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in stems
    assert all(s.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_", "lora_te_"))
               for s in stems)
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert any(tensors[k].abs().sum() > 0 for k in tensors if k.endswith("lora_up.weight"))  # it trained
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_sd_model_name"] == "toy-sd1.safetensors" and meta["modelspec.trigger_phrase"] == "flatstyle"
    assert meta["ss_network_dim"] == "2" and meta["ss_steps"] == "2"
    card = json.loads((lora_dir / "sd1_test.json").read_text(encoding="utf-8"))
    assert card["activation text"] == "flatstyle" and card["preferred weight"] == 0.8 and card["sd version"] == "SD1"

    # the Lora extension rescanned after the files were written: <lora:sd1_test> resolves without a restart
    assert {"sd1_test", "sd1_test-step000002"} <= set(webui.networks.available_networks)
    # progress went through the webui's state, and the wrapper reset it afterwards
    history = webui.shared.state.textinfo_history
    assert any(t.startswith("step 1/2 · loss") for t in history) and any(t.startswith("step 2/2") for t in history)
    assert webui.shared.state.job_count == 0 and webui.shared.state.interrupted is False
    assert webui.shared.state.id_live_preview >= 2 and webui.shared.state.current_image is not None
    assert webui.sd_hijack.calls == ["undo", "apply"]  # cross-attention optimisation off while training, then back
    assert webui.devices.gc_calls >= gc_before + 3  # state.begin/end and the session's own torch_gc


def test_cancel_saves_partial_lora_and_restores(webui, dataset, monkeypatch):
    from loraloop.a1111 import sink
    from loraloop.a1111 import widgets as form
    from loraloop.a1111.actions import TabActions

    model = webui.load(models.build_sd("sd1"))
    clean = snapshot(model)
    step = sink.WebuiSink.step

    def interrupt_after_two(self, info):
        step(self, info)
        if info.step == 2:
            webui.shared.state.interrupt()  # the Cancel button / the webui's Interrupt

    monkeypatch.setattr(sink.WebuiSink, "step", interrupt_after_two)
    names = [f.name for f in form.form_fields()]
    values = tab_values(webui, dataset, output_name="c", max_train_steps=5, trigger_word="flatstyle")
    _, preview, html = TabActions(names).train_job()("task(x)", *[values[n] for n in names])
    assert "Cancelled after 2 of 5 steps" in html and preview is None
    assert_identical(model, clean)
    assert sorted(p.name for p in webui.lora_dir.iterdir()) == ["c-cancelled-step000002.json",
                                                                "c-cancelled-step000002.safetensors"]
    _, meta = read_lora(webui.lora_dir / "c-cancelled-step000002.safetensors")
    assert meta["ss_steps"] == "2"
    assert "c-cancelled-step000002" in webui.networks.available_networks
    assert webui.shared.state.interrupted is False  # reset by the webui's wrapper for the next job


def test_error_mid_training_restores_everything(webui, dataset):
    from loraloop.a1111 import widgets as form
    from loraloop.a1111.actions import TabActions
    from loraloop.a1111.sink import LIVE

    model = webui.load(models.build_sd("sd1"))
    clean = snapshot(model)
    apply_model = model.apply_model
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access (simulated)")
        return apply_model(*args, **kwargs)

    model.apply_model = failing
    names = [f.name for f in form.form_fields()]
    values = tab_values(webui, dataset, output_name="e", max_train_steps=2)
    _, _, html = TabActions(names).train_job()("task(y)", *[values[n] for n in names])
    del model.apply_model
    assert "RuntimeError" in html and "simulated" in html
    assert_identical(model, clean)
    assert webui.sd_hijack.calls == ["undo", "apply"]
    assert not webui.lora_dir.exists() or not any(webui.lora_dir.iterdir())
    assert LIVE.snapshot()["running"] is False and "simulated" in LIVE.snapshot()["text"]


def test_sd2_v_parameterization(webui, dataset):
    from loraloop.a1111 import training as job

    model = webui.load(models.build_sd("sd2", v=True))
    clean = snapshot(model)
    with pytest.raises(ConfigError, match=r"SD 1\.x CLIP only") as err:
        job.run_training(tab_values(webui, dataset, output_name="v", train_text_encoder=True))
    assert err.value.key == "train_text_encoder"
    result = job.run_training(tab_values(webui, dataset, output_name="v", max_train_steps=1))
    assert result.config.prediction_type == "v_prediction" and result.config.resolution == 64
    assert_identical(model, clean)
    tensors, meta = read_lora(result.lora)
    assert meta["ss_v2"] == "True" and meta["modelspec.prediction_type"] == "v"
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in {k.split(".", 1)[0] for k in tensors}
    assert not any(k.startswith("lora_te") for k in tensors)
    assert json.loads(result.card.read_text())["sd version"] == "SD2"


def test_sdxl_run(webui, dataset):
    from loraloop.a1111 import training as job

    model = webui.load(models.build_sdxl())
    clean = snapshot(model)
    result = job.run_training(tab_values(webui, dataset, output_name="xl", make_preview=True))
    assert_identical(model, clean)
    tensors, meta = read_lora(result.lora)
    stems = {k.split(".", 1)[0] for k in tensors}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in stems
    assert all(s.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for s in stems)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert json.loads(result.card.read_text())["sd version"] == "SDXL"
    assert result.preview_path.name == "xl.preview.png" and result.offloaded == ["text encoder", "VAE"]


def test_half_precision_model_settings(webui):
    """A webui without --no-half loads float16 weights: 'auto' trains with fp16 autocast + GradScaler, and float32
    compute ('no') is refused with the reason, before anything is touched."""
    from loraloop.a1111 import widgets as form
    from loraloop.trainer.families import get_family

    settings = form.parse_values({"mixed_precision": "auto", "resolution": 0})
    config = form.resolve(settings, get_family("sdxl"), "epsilon", torch.float16)
    assert (config.mixed_precision, config.resolution) == ("fp16", 1024)
    assert form.resolve(settings, get_family("sd1"), "epsilon", torch.bfloat16).mixed_precision == "bf16"
    assert form.resolve(settings, get_family("sd1"), "epsilon", torch.float32).mixed_precision == "no"
    with pytest.raises(ConfigError, match="float16") as err:
        form.resolve(form.parse_values({"mixed_precision": "no"}), get_family("sd1"), "epsilon", torch.float16)
    assert err.value.key == "mixed_precision"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 ldm models train on CUDA only (CPU group_norm "
                    "rejects float16 weights; the webui runs --no-half on CPU)")
def test_fp16_weights_train_float32_adapters_with_loss_scaling(webui, dataset, monkeypatch):  # pragma: no cover
    """On a GPU: fp16 weights, autocast + GradScaler, float32 adapters, the fp16 base bit-identical afterwards."""
    from loraloop.a1111 import training as job
    from loraloop.trainer import loop

    model = models.build_sd("sd1").cuda().half()
    webui.load(model)
    webui.devices.device = torch.device("cuda")
    webui.devices.dtype = webui.devices.dtype_unet = webui.devices.dtype_inference = torch.float16
    clean = snapshot(model)
    seen = {}
    real_train = loop.train

    def spy(bundle, batches, config, sink=None, **kwargs):
        hook = kwargs["on_step_end"]

        def check(step, network):
            seen["adapters"] = {p.dtype for p in network.parameters()}
            seen["base"] = {p.dtype for n, p in bundle.unet.named_parameters() if "lora_" not in n}
            hook(step, network)

        return real_train(bundle, batches, config, sink, **{**kwargs, "on_step_end": check})

    monkeypatch.setattr(job, "train", spy)
    result = job.run_training(tab_values(webui, dataset, output_name="h", max_train_steps=2,
                                         gradient_checkpointing=True, make_preview=True))
    assert seen == {"adapters": {torch.float32}, "base": {torch.float16}}
    assert result.config.mixed_precision == "fp16" and result.steps == 2
    assert all(torch.isfinite(t).all() for t in read_lora(result.lora)[0].values())
    assert_identical(model, clean)


def test_refusals_leave_the_model_alone(webui, dataset):
    from loraloop.a1111 import training as job

    model = webui.load(models.build_sd("sd1"))
    clean = snapshot(model)
    webui.shared.cmd_opts.lowvram = True
    with pytest.raises(UnsupportedModelError, match="--lowvram"):
        job.run_training(tab_values(webui, dataset))
    webui.shared.cmd_opts.lowvram = False
    webui.load(models.build_forge())
    with pytest.raises(UnsupportedModelError, match="Forge"):
        job.run_training(tab_values(webui, dataset))
    webui.load(model)
    with pytest.raises(ConfigError, match="resume_lora"):
        job.run_training(tab_values(webui, dataset, resume_lora="no_such_lora"))
    assert_identical(model, clean)
    assert webui.sd_hijack.calls == []


def test_names_never_overwrite_unless_asked(webui, tmp_path):
    from loraloop.a1111.outputs import choose_name

    folder = tmp_path / "Lora"
    folder.mkdir()
    (folder / "style.safetensors").write_bytes(b"x")
    assert choose_name(folder, "style", overwrite=False) == "style_2"
    assert choose_name(folder, "style", overwrite=True) == "style"
    assert choose_name(folder, "../evil/name", overwrite=False) == "evil_name"


def test_runs_on_torch_without_amp_grad_scaler(webui, dataset, monkeypatch):
    """The webui's default torch 2.1.2 has no torch.amp.GradScaler (added in 2.3): the engine's loop falls back to
    torch.cuda.amp.GradScaler by itself, and the extension adds nothing to torch."""
    from loraloop.a1111 import training as job

    model = webui.load(models.build_sd("sd1"))
    clean = snapshot(model)
    monkeypatch.delattr(torch.amp, "GradScaler")  # after the model is built: its imports cached
    result = job.run_training(tab_values(webui, dataset, output_name="old_torch", max_train_steps=1))
    assert result.steps == 1 and not hasattr(torch.amp, "GradScaler")
    assert_identical(model, clean)


def test_memory_plan_refuses_what_cannot_fit_before_touching_the_model(webui, dataset):
    """The engine's planner runs before the session (here with a budget, as on a GPU): a run that cannot fit is
    refused with advice and nothing is touched; one that fits is planned and reported."""
    from loraloop.a1111 import training as job

    model = webui.load(models.build_sd("sd1"))
    clean = snapshot(model)
    with pytest.raises(ConfigError, match="does not fit"):
        job.run_training(tab_values(webui, dataset, output_name="m", vram_budget_gb=0.5))
    assert_identical(model, clean)
    assert webui.sd_hijack.calls == [] and not webui.lora_dir.exists()
    result = job.run_training(tab_values(webui, dataset, output_name="m", vram_budget_gb=64, max_train_steps=1))
    assert result.steps == 1 and any(t.startswith("memory plan:") for t in webui.shared.state.textinfo_history)
    assert_identical(model, clean)


def test_text_encoder_stays_when_its_outputs_are_not_cached(webui, dataset):
    """cache_text_encoder_outputs: false encodes captions every step, so the text encoder must stay on the device:
    only what prepare_batches really cached may leave it."""
    import dataclasses

    from loraloop.a1111 import training as job
    from loraloop.trainer.config import TrainConfig

    if "cache_text_encoder_outputs" not in {f.name for f in dataclasses.fields(TrainConfig)}:
        pytest.skip("this engine has no cache_text_encoder_outputs")
    model = webui.load(models.build_sd("sd1"))
    clean = snapshot(model)
    result = job.run_training(tab_values(webui, dataset, output_name="no_text_cache", max_train_steps=1,
                                         cache_text_encoder_outputs=False))
    assert result.steps == 1 and result.offloaded == ["VAE"]
    assert_identical(model, clean)
    result = job.run_training(tab_values(webui, dataset, output_name="text_cache", max_train_steps=1))
    assert result.offloaded == ["text encoder", "VAE"]


def test_cancel_while_caching_latents_is_a_clean_cancel(webui, dataset, monkeypatch):
    from loraloop.a1111 import widgets as form
    from loraloop.a1111.actions import TabActions
    from loraloop.a1111.bundle import WebuiBundle

    model = webui.load(models.build_sd("sd1"))
    clean = snapshot(model)
    encode = WebuiBundle.encode_images

    def cancel_on_first_image(self, pixels):
        webui.shared.state.interrupt()  # Cancel pressed while the first latent is encoded
        return encode(self, pixels)

    monkeypatch.setattr(WebuiBundle, "encode_images", cancel_on_first_image)
    names = [f.name for f in form.form_fields()]
    values = tab_values(webui, dataset, output_name="early", max_train_steps=5)
    _, preview, html = TabActions(names).train_job()("task(x)", *[values[n] for n in names])
    assert "ancelled" in html and "failed" not in html.lower() and preview is None
    assert_identical(model, clean)
    assert not list(webui.lora_dir.glob("early*"))
