"""`detect_family`: SD1/SD2/SDXL single files are recognised from keys and shapes; everything else is refused by name.

Real-size key/shape maps are built on the meta device from the shipped configs and written in LDM layout by the test
helper, and diffusers' own single-file classifier is asked to agree with them.
"""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from helpers.ldm_checkpoint import ldm_state_dict, text_encoders_to_ldm, unet_to_ldm, vae_to_ldm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from loraloop.trainer.bundles.checkpoint import SUPPORTED, detect_family, shipped_config_dir
from loraloop.trainer.bundles.tiny import build_tiny_bundle
from loraloop.trainer.errors import ConfigError, UnsupportedModelError

SRC = "/models/thing.safetensors"
Shapes = dict[str, tuple[int, ...]]


def _meta_model_shapes(family: str) -> Shapes:
    """Key → shape of the real model of `family` in LDM layout (meta tensors: no memory)."""
    folder = shipped_config_dir(family)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        encoders = [CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder / "text_encoder")))]
        if family == "sdxl":
            config = CLIPTextConfig.from_pretrained(str(folder / "text_encoder_2"))
            encoders.append(CLIPTextModelWithProjection(config))
    sd = {**unet_to_ldm(unet), **vae_to_ldm(vae), **text_encoders_to_ldm(family, encoders)}
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.fixture(scope="module")
def real() -> dict[str, Shapes]:
    return {family: _meta_model_shapes(family) for family in ("sd1", "sd2", "sdxl")}


def detect_error(shapes: Shapes, **kw: object) -> str:
    with pytest.raises(UnsupportedModelError) as info:
        detect_family(shapes, source=SRC, **kw)  # type: ignore[arg-type]
    return str(info.value)


def replaced(shapes: Shapes, **changes: tuple[int, ...]) -> Shapes:
    out = dict(shapes)
    out.update({k.replace("__", "."): v for k, v in changes.items()})
    return out


def without(shapes: Shapes, prefix: str) -> Shapes:
    return {k: v for k, v in shapes.items() if not k.startswith(prefix)}


class TestRealLayouts:
    @pytest.mark.parametrize(("family", "diffusers_type"), [("sd1", "v1"), ("sd2", "v2"), ("sdxl", "xl_base")])
    def test_detected_and_diffusers_agrees(self, real: dict[str, Shapes], family: str, diffusers_type: str) -> None:
        shapes = real[family]
        assert detect_family(shapes) == family
        # diffusers' own classifier reads the same files: our helper writes what real checkpoints hold.
        assert infer_diffusers_model_type({k: torch.empty(v, device="meta") for k, v in shapes.items()}) == \
            diffusers_type

    def test_real_sd2_file_has_24_openclip_layers(self, real: dict[str, Shapes]) -> None:
        assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in real["sd2"]
        assert real["sd2"]["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"] == (3072, 1024)

    def test_sd2_defaults_to_epsilon_with_a_hint(self, real: dict[str, Shapes], caplog: pytest.LogCaptureFixture
                                                 ) -> None:
        with caplog.at_level(logging.INFO, logger="loraloop.trainer.bundles.checkpoint"):
            assert detect_family(real["sd2"], source=SRC) == "sd2"
        assert "family='sd2-v' or prediction_type='v_prediction'" in caplog.text
        assert SRC in caplog.text

    @pytest.mark.parametrize(("kw", "expected"), [({"family": "sd2-v"}, "sd2-v"),
                                                  ({"prediction_type": "v_prediction"}, "sd2-v"),
                                                  ({"family": "sd2", "prediction_type": "v_prediction"}, "sd2-v"),
                                                  ({"family": "sd2.1"}, "sd2"),
                                                  ({"prediction_type": "epsilon"}, "sd2")])
    def test_sd2_variant_from_caller(self, real: dict[str, Shapes], kw: dict, expected: str) -> None:
        assert detect_family(real["sd2"], **kw) == expected

    def test_v_prediction_leaves_other_families_alone(self, real: dict[str, Shapes]) -> None:
        assert detect_family(real["sd1"], prediction_type="v_prediction") == "sd1"
        assert detect_family(real["sdxl"], family="sdxl", prediction_type="v_prediction") == "sdxl"

    def test_family_alias(self, real: dict[str, Shapes]) -> None:
        assert detect_family(real["sd1"], family="sd1.5") == "sd1"


class TestTinyTensors:
    @pytest.mark.parametrize(("name", "family"), [("tiny-sd1", "sd1"), ("tiny-sdxl", "sdxl")])
    def test_state_dict_of_tensors(self, name: str, family: str) -> None:
        assert detect_family(ldm_state_dict(build_tiny_bundle(name))) == family


    def test_non_tensor_entries_are_skipped(self) -> None:
        sd = ldm_state_dict(build_tiny_bundle("tiny-sd1"))
        assert detect_family({**sd, "global_step": 470000, "epoch": None}) == "sd1"


class TestCallerMismatch:
    def test_wrong_family(self, real: dict[str, Shapes]) -> None:
        msg = detect_error(real["sd1"], family="sdxl")
        assert msg.startswith(f"{SRC} is an SD 1.x checkpoint, but family='sdxl' was asked for")

    def test_sd2_v_family_with_epsilon(self, real: dict[str, Shapes]) -> None:
        with pytest.raises(ConfigError, match="contradicts"):
            detect_family(real["sd2"], family="sd2-v", prediction_type="epsilon")

    def test_bad_prediction_type(self, real: dict[str, Shapes]) -> None:
        with pytest.raises(ConfigError, match="prediction_type must be one of epsilon, v_prediction, not 'v'"):
            detect_family(real["sd1"], prediction_type="v")


class TestRejected:
    def test_sdxl_refiner(self, real: dict[str, Shapes]) -> None:
        shapes = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v
                  for k, v in without(real["sdxl"], "conditioner.embedders.0.").items()}
        assert detect_error(shapes) == (f"{SRC} is an SDXL refiner (only an OpenCLIP bigG text encoder), which LoRA "
                                        f"Loop cannot train; supported: {SUPPORTED}")

    @pytest.mark.parametrize(("channels", "what"), [(9, "an inpainting model (UNet in_channels 9)"),
                                                    (8, "an InstructPix2Pix model (UNet in_channels 8)"),
                                                    (5, "a model whose UNet takes 5 input channels")])
    def test_unet_input_channels(self, real: dict[str, Shapes], channels: int, what: str) -> None:
        for family in ("sd1", "sdxl"):
            shapes = replaced(real[family], model__diffusion_model__input_blocks__0__0__weight=(320, channels, 3, 3))
            assert detect_error(shapes).startswith(f"{SRC} is {what}")

    @pytest.mark.parametrize(("keys", "what"), [
        (["model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias",
          "model.diffusion_model.x_embedder.proj.weight"], "a Stable Diffusion 3 / 3.5 (MMDiT) model"),
        (["joint_blocks.37.x_block.mlp.fc1.weight", "pos_embed"], "a Stable Diffusion 3 / 3.5 (MMDiT) model"),
        (["model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale",
          "model.diffusion_model.img_in.weight"], "a Flux.1 / Chroma model"),
        (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "a Flux.1 / Chroma model"),
    ])
    def test_flow_models_are_recognised(self, keys: list[str], what: str) -> None:
        assert detect_error(dict.fromkeys(keys, (1,))) == f"{SRC} is {what}"  # loaded with components_from

    @pytest.mark.parametrize(("keys", "what"), [
        (["clip_txt_mapper.weight", "down_blocks.0.0.channelwise.0.weight"], "a Stable Cascade model"),
        (["down_blocks.1.0.channelwise.0.weight", "effnet_mapper.0.weight"], "a Stable Cascade model"),
        (["down_blocks.0.motion_modules.0.temporal_transformer.norm.bias"], "an AnimateDiff motion module"),
        (["control_model.input_hint_block.0.weight", "control_model.time_embed.0.weight"], "a ControlNet"),
        (["model.diffusion_model.input_blocks.0.0.weight", "edm_mean", "edm_std"],
         "Playground v2.5 (an EDM-schedule model)"),
    ])
    def test_other_model_kinds(self, keys: list[str], what: str) -> None:
        assert detect_error(dict.fromkeys(keys, (1,))).startswith(f"{SRC} is {what}, which LoRA Loop cannot train")

    def test_stable_video_diffusion(self, real: dict[str, Shapes]) -> None:
        shapes = replaced(real["sd2"], model__diffusion_model__input_blocks__1__0__time_stack__in_layers__0__weight=(
            320,), model__diffusion_model__input_blocks__1__0__time_mixer__mix_factor=(1,))
        assert detect_error(shapes).startswith(f"{SRC} is a Stable Video Diffusion (SVD) model")

    @pytest.mark.parametrize("keys", [
        ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "lora_unet_down_blocks_0_attentions_0"
                                                                          "_proj_in.alpha"],
        ["lora_te1_text_model_encoder_layers_0_mlp_fc1.hada_w1_a"],
        ["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight", "unet.down_blocks.0.attentions.0.proj_in.lora_B"
                                                                  ".weight"],
    ])
    def test_lora_file(self, keys: list[str]) -> None:
        msg = detect_error(dict.fromkeys(keys, (4, 4)))
        assert msg.startswith(f"{SRC} is a LoRA, not a checkpoint (it has keys like {keys[0]!r})")
        assert "give the base model the LoRA was made for instead" in msg

    @pytest.mark.parametrize("prefix", ["", "first_stage_model."])
    def test_vae_only(self, real: dict[str, Shapes], prefix: str) -> None:
        shapes = {prefix + k.removeprefix("first_stage_model."): v for k, v in real["sd1"].items()
                  if k.startswith("first_stage_model.")}
        assert detect_error(shapes).startswith(f"{SRC} is a VAE-only file (no UNet, no text encoder)")

    def test_text_encoder_only(self, real: dict[str, Shapes]) -> None:
        shapes = {k: v for k, v in real["sdxl"].items() if k.startswith("conditioner.")}
        assert detect_error(shapes).startswith(f"{SRC} is a text-encoder-only file (no UNet, no VAE)")

    def test_unet_only(self, real: dict[str, Shapes]) -> None:
        shapes = {k.removeprefix("model.diffusion_model."): v for k, v in real["sdxl"].items()
                  if k.startswith("model.diffusion_model.")}
        assert detect_error(shapes).startswith(f"{SRC} is a UNet-only file (no VAE, no text encoder)")

    def test_diffusers_unet_weights(self) -> None:
        unet = build_tiny_bundle("tiny-sd1").unet
        msg = detect_error(unet.state_dict())
        assert "the UNet weights of a diffusers folder; give the whole folder (the one with model_index.json)" in msg

    def test_unknown_lists_prefixes(self) -> None:
        shapes = {"net.blocks.0.attn.weight": (4,), "net.blocks.1.attn.weight": (4,), "net.head.weight": (4,),
                  "scale": (1,)}
        msg = detect_error(shapes)
        assert msg == (f"{SRC} is not a Stable Diffusion checkpoint LoRA Loop recognises (no model.diffusion_model.* "
                       "keys; key prefixes found: net.blocks (2), net.head (1), scale (1)); supported: " + SUPPORTED)

    def test_empty(self) -> None:
        assert detect_error({}).startswith(f"{SRC} holds no tensors")

    def test_no_text_encoder(self, real: dict[str, Shapes]) -> None:
        msg = detect_error(without(real["sd1"], "cond_stage_model."))
        assert msg.startswith(f"{SRC} has a UNet but no text-encoder weights LoRA Loop knows")
        assert "key prefixes found: model.diffusion_model (" in msg
        assert "needs a full checkpoint (UNet + VAE + text encoders)" in msg

    def test_no_vae(self, real: dict[str, Shapes]) -> None:
        msg = detect_error(without(real["sd1"], "first_stage_model."))
        assert msg.startswith(f"{SRC} has no VAE weights (first_stage_model.* keys)")

    def test_unet_and_text_encoder_widths_disagree(self, real: dict[str, Shapes]) -> None:
        # An SD1 UNet (768-wide cross-attention) with SD2's OpenCLIP-H text encoder (1024).
        shapes = {**without(real["sd1"], "cond_stage_model."),
                  **{k: v for k, v in real["sd2"].items() if k.startswith("cond_stage_model.")}}
        msg = detect_error(shapes)
        assert "looks like an SD 2.x checkpoint, but its UNet attends to width 768 while its text encoders give 1024" \
            in msg

    def test_class_conditioned_sd2(self, real: dict[str, Shapes]) -> None:
        shapes = replaced(real["sd2"], model__diffusion_model__label_emb__0__0__weight=(1280, 2048))
        assert detect_error(shapes).startswith(f"{SRC} is a class-conditioned SD 2.x UNet (e.g. SD 2.1 unCLIP)")

    def test_sdxl_without_size_conditioning(self, real: dict[str, Shapes]) -> None:
        shapes = without(real["sdxl"], "model.diffusion_model.label_emb.")
        assert detect_error(shapes).startswith(f"{SRC} is an SDXL-layout file without SDXL's size conditioning")
