"""The A1111 host bundle over the webui's model objects: family detection, kohya names, conditioning, latents."""

from pathlib import Path

import pytest
import torch
from a1111_stub import models
from a1111_stub.fixtures import webui_fixture  # noqa: F401 - the `webui` fixture

from loraloop.trainer.bundle import SizeInfo
from loraloop.trainer.errors import UnsupportedModelError
from loraloop.trainer.naming import TRANSFORMER_CLASSES, find_targets
from loraloop.trainer.network import Network, NetworkSpec

CONFIGS = Path(__file__).resolve().parent.parent / "trainer" / "model_configs"
TE_SUBS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")


def kohya_unet_names_of(family: str) -> set[str]:
    """kohya's UNet key stems for the real SD1.5/SD2.1 architecture: diffusers paths of every Linear/Conv2d inside a
    Transformer2DModel (docs/lora-format.md §1.2), from the shipped diffusers config, on the meta device."""
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(CONFIGS / family / "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return {"lora_unet_" + p.replace(".", "_") for p in find_targets(unet, TRANSFORMER_CLASSES)}


def bundle_for(model):
    from loraloop.a1111.bundle import WebuiBundle

    return WebuiBundle(model, "cpu")


@pytest.mark.parametrize(("kind", "v", "family", "prediction"), [
    ("sd1", False, "sd1", "epsilon"), ("sd2", False, "sd2", "epsilon"), ("sd2", True, "sd2-v", "v_prediction")])
def test_family_of_ldm_models(webui, kind, v, family, prediction):
    from loraloop.a1111.bundle import detect_family

    model = models.build_sd(kind, v=v)
    fam, pred = detect_family(model)
    assert (fam.name, pred) == (family, prediction)
    # older webuis set no is_sd2 flag: SD2 is told by the OpenCLIP embedder, as sd_models.set_model_type does
    del model.is_sd2
    assert detect_family(model)[0].name == family


def test_family_of_sdxl_and_refusals(webui):
    from loraloop.a1111.bundle import detect_family

    sdxl = models.build_sdxl()
    assert detect_family(sdxl) == (detect_family(sdxl)[0], "epsilon") and detect_family(sdxl)[0].name == "sdxl"
    with pytest.raises(UnsupportedModelError, match="no model is loaded"):
        detect_family(None)
    with pytest.raises(UnsupportedModelError, match="Forge"):
        detect_family(models.build_forge())
    sd1 = models.build_sd("sd1")
    sd1.model.conditioning_key = "hybrid"  # an inpainting checkpoint
    with pytest.raises(UnsupportedModelError, match="'hybrid'"):
        detect_family(sd1)
    sdxl.conditioner.embedders[4].input_key = "aesthetic_score"  # the SDXL refiner's conditioner
    with pytest.raises(UnsupportedModelError, match="refiner"):
        detect_family(sdxl)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_kohya_names_match_the_real_architecture(webui, kind):
    """With the real SD1/SD2 block structure, the adapted UNet modules get exactly kohya's diffusers-style names
    (SD1.5: 192), and SD1's CLIP gets `lora_te_text_model_encoder_layers_{i}_{sub}`."""
    bundle = bundle_for(models.build_sd(kind, full_layout=True))
    train_te = kind == "sd1"
    with Network(bundle, NetworkSpec(rank=2, train_text_encoder=train_te)) as network:
        keys = set(network.state_dict())
    stems = {k.split(".", 1)[0] for k in keys}
    unet = {s for s in stems if s.startswith("lora_unet_")}
    assert unet == kohya_unet_names_of(kind)
    assert len(unet) == 192
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in unet
    te = stems - unet
    if train_te:
        layers = 3  # the toy CLIP; the name pattern is the real one
        assert te == {f"lora_te_text_model_encoder_layers_{i}_{sub}" for i in range(layers) for sub in TE_SUBS}
    else:
        assert te == set() and bundle.text_encoders == []
    assert {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] for k in keys if not k.endswith(".alpha")} == {
        "lora_down.weight", "lora_up.weight"}


def test_sdxl_names_are_sgm_paths(webui):
    bundle = bundle_for(models.build_sdxl())
    with Network(bundle, NetworkSpec(rank=2)) as network:
        stems = {k.split(".", 1)[0] for k in network.state_dict()}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in stems  # SDXL's first attention block
    assert "lora_unet_middle_block_1_proj_in" in stems
    assert "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_2" in stems
    assert not any("down_blocks" in s or "lora_te" in s for s in stems)


def test_sdxl_predict_rebuilds_the_webui_vector(webui):
    """pooled + size embeddings per sample = what get_learned_conditioning builds for 1024²; other sizes differ."""
    model = models.build_sdxl()
    bundle = bundle_for(model)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    cond = bundle.encode_text(["a cat", "a dog"])
    with torch.no_grad():
        expected = model.apply_model(x, t, model.get_learned_conditioning(["a cat", "a dog"]))
        got = bundle.predict(x, t, cond, [SizeInfo((1024, 1024), (0, 0), (1024, 1024))] * 2)
        other = bundle.predict(x, t, cond, [SizeInfo((512, 768), (16, 0), (512, 768))] * 2)
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other, got)
    assert cond.pooled.shape == (2, models.WIDTH) and cond.context.shape == (2, 77, 2 * models.WIDTH)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_latents_are_the_scaled_posterior_mean(webui, kind):
    model = models.build_sdxl() if kind == "sdxl" else models.build_sd("sd1")
    bundle = bundle_for(model)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    latents = bundle.encode_images(pixels)
    assert torch.equal(latents, bundle.encode_images(pixels))  # deterministic: cached latents can be resumed
    vae = model.first_stage_model
    with torch.no_grad():
        mean = vae.quant_conv(vae.encoder(pixels)).chunk(2, dim=1)[0]
    torch.testing.assert_close(latents, mean * model.scale_factor)
    decoded = bundle.decode_latents(latents)
    assert decoded.shape == (1, 3, 64, 64) and decoded.dtype == torch.float32


def test_captions_are_literal_and_padded_like_the_webui(webui):
    model = models.build_sd("sd1")
    bundle = bundle_for(model)
    with torch.no_grad():
        literal = bundle.encode_text(["a (red) circle"]).context
        assert torch.equal(literal, model.get_learned_conditioning([r"a \(red\) circle"]))
        assert not torch.equal(literal, model.get_learned_conditioning(["a (red) circle"]))  # emphasis would apply
        webui.shared.opts.emphasis = "None"  # the webui reads prompts literally itself: nothing to escape
        assert bundle.prompt_text("a (red) circle") == "a (red) circle"
        webui.shared.opts.emphasis = "Original"
        long = ", ".join(f"tag{i}" for i in range(25))  # 75-150 tokens: two chunks
        assert bundle.set_caption_lengths(["short", long]) == 154
        short = bundle.encode_text(["short"]).context
        assert short.shape[1] == 154
        assert torch.equal(short[:, :77], model.get_learned_conditioning(["short"]))
        assert torch.equal(short[:, 77:], model.get_learned_conditioning([""]))  # padded with the empty chunk
        assert bundle.encode_text([long]).context.shape[1] == 154


def test_half_precision_vae_falls_back_to_float32_and_stays_half(webui):
    """A fp16 VAE that overflows (SDXL's does) is re-run in float32 for that call; its weights come back bit-exact."""
    model = models.build_sd("sd1")
    vae = model.first_stage_model.half()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    bundle = bundle_for(model)
    calls = []
    encode = model.encode_first_stage

    def overflowing(x):
        calls.append(x.dtype)
        out = encode(x)
        if x.dtype == torch.float16:
            out.mean.fill_(float("nan"))
        return out

    model.encode_first_stage = overflowing
    try:
        latents = bundle.encode_images(torch.rand(1, 3, 64, 64))
    except RuntimeError as err:  # pragma: no cover - CPU builds without half convolutions
        pytest.skip(f"no float16 convolution on this CPU build: {err}")
    assert calls == [torch.float16, torch.float32] and torch.isfinite(latents).all()
    assert all(v.dtype == torch.float16 and torch.equal(v, before[k]) for k, v in vae.state_dict().items())
