"""The shipped config-only diffusers folders (`model_configs/<family>`) describe the real SD1.5 / SD2.1 / SDXL models.

Everything is built on the meta device, so real-size models cost no memory and a fraction of a second. Three independent
checks: well-known parameter counts; diffusers' own LDM-yaml → diffusers-config mapping applied to the original yaml
parameters; and the original `ldm` UNet/VAE (stable-diffusion-sdkit, A1111's SD1/SD2 classes) having exactly the keys
and shapes of our UNet/VAE once written in LDM layout.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from helpers.ldm_checkpoint import unet_to_ldm, vae_to_ldm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from loraloop.trainer.bundles.checkpoint import CONFIG_ROOT, TEXT_ENCODERS, alphas_cumprod_from, shipped_config_dir
from loraloop.trainer.families import FAMILIES
from loraloop.trainer.schedule import scaled_linear_alphas_cumprod

FAMILY_DIRS = ("sd1", "sd2", "sd2-v", "sdxl")


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_unet(family: str) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(shipped_config_dir(family) / "unet"))


def meta_vae(family: str) -> AutoencoderKL:
    with torch.device("meta"):
        return AutoencoderKL.from_config(AutoencoderKL.load_config(shipped_config_dir(family) / "vae"))


def meta_text_encoder(family: str, subfolder: str = "text_encoder") -> torch.nn.Module:
    config = CLIPTextConfig.from_pretrained(str(shipped_config_dir(family) / subfolder), local_files_only=True)
    cls = CLIPTextModelWithProjection if subfolder == "text_encoder_2" else CLIPTextModel
    with torch.device("meta"):
        return cls(config)


class TestFolders:
    def test_one_folder_per_family(self) -> None:
        # The DDPM families load from single files on the command line; the flow families train inside a host.
        ddpm = [name for name, family in FAMILIES.items() if not family.is_flow]
        assert sorted(p.name for p in CONFIG_ROOT.iterdir() if p.is_dir()) == sorted(ddpm) == sorted(FAMILY_DIRS)

    @pytest.mark.parametrize("family", FAMILY_DIRS)
    def test_configs_only_no_weights_no_tokenizer(self, family: str) -> None:
        folder = shipped_config_dir(family)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        subfolders = [s.subfolder for s in TEXT_ENCODERS[family.split("-")[0]]]
        expected = ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json",
                    *(f"{s}/config.json" for s in subfolders)]
        assert files == sorted(expected)
        index = json.loads((folder / "model_index.json").read_text())
        assert all(s in index for s in ("unet", "vae", *subfolders))

    @pytest.mark.parametrize(("family", "prediction", "sample_size"),
                             [("sd1", "epsilon", 64), ("sd2", "epsilon", 64), ("sd2-v", "v_prediction", 96),
                              ("sdxl", "epsilon", 128)])
    def test_scheduler_and_resolution(self, family: str, prediction: str, sample_size: int) -> None:
        folder = shipped_config_dir(family)
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert scheduler.get("prediction_type", "epsilon") == prediction == FAMILIES[family].prediction_type
        assert (scheduler["beta_schedule"], scheduler["beta_start"], scheduler["beta_end"],
                scheduler["num_train_timesteps"]) == ("scaled_linear", 0.00085, 0.012, 1000)
        unet = json.loads((folder / "unet" / "config.json").read_text())
        assert unet["sample_size"] * 8 == FAMILIES[family].resolution == sample_size * 8

    @pytest.mark.parametrize("family", FAMILY_DIRS)
    def test_noise_schedule_is_sds(self, family: str) -> None:
        assert torch.equal(alphas_cumprod_from(shipped_config_dir(family)), scaled_linear_alphas_cumprod())

    @pytest.mark.parametrize("family", FAMILY_DIRS)
    def test_vae_scaling_factor_matches_family(self, family: str) -> None:
        vae = json.loads((shipped_config_dir(family) / "vae" / "config.json").read_text())
        assert vae.get("scaling_factor", 0.18215) == FAMILIES[family].latent_scale
        assert vae.get("force_upcast", False) is (family == "sdxl")


class TestParameterCounts:
    @pytest.mark.parametrize(("family", "expected"), [("sd1", 859_520_964), ("sd2", 865_910_724),
                                                      ("sd2-v", 865_910_724), ("sdxl", 2_567_463_684)])
    def test_unet(self, family: str, expected: int) -> None:
        assert count(meta_unet(family)) == expected

    @pytest.mark.parametrize("family", FAMILY_DIRS)
    def test_vae(self, family: str) -> None:
        assert count(meta_vae(family)) == 83_653_863

    @pytest.mark.parametrize(("family", "subfolder", "expected"),
                             [("sd1", "text_encoder", 123_060_480),  # OpenAI CLIP ViT-L/14 text tower
                              ("sd2", "text_encoder", 340_387_840),  # OpenCLIP ViT-H/14, 23 of 24 layers
                              ("sdxl", "text_encoder", 123_060_480),
                              ("sdxl", "text_encoder_2", 694_659_840)])  # OpenCLIP bigG + projection
    def test_text_encoders(self, family: str, subfolder: str, expected: int) -> None:
        assert count(meta_text_encoder(family, subfolder)) == expected


# The UNet / first-stage parameters of the original inference yamls (v1-inference.yaml, v2-inference(-v).yaml,
# sd_xl_base.yaml), as diffusers' converter reads them.
_VAE_DD = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
           "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
_LDM_UNETS = {
    "sd1": {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
            "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_heads": 8,
            "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 768, "legacy": False},
    "sd2": {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
            "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
            "num_head_channels": 64, "use_spatial_transformer": True, "use_linear_in_transformer": True,
            "transformer_depth": 1, "context_dim": 1024, "legacy": False},
    "sdxl": {"adm_in_channels": 2816, "num_classes": "sequential", "in_channels": 4, "out_channels": 4,
             "model_channels": 320, "attention_resolutions": [4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 4],
             "num_head_channels": 64, "use_linear_in_transformer": True, "transformer_depth": [1, 2, 10],
             "context_dim": 2048, "spatial_transformer_attn_type": "softmax-xformers", "legacy": False},
}
_CONFIG_KEYS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                "layers_per_block", "cross_attention_dim", "attention_head_dim", "use_linear_projection",
                "transformer_layers_per_block", "class_embed_type", "addition_embed_type", "addition_time_embed_dim",
                "projection_class_embeddings_input_dim", "norm_num_groups", "norm_eps", "flip_sin_to_cos",
                "freq_shift", "act_fn", "only_cross_attention", "num_class_embeds")


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


class TestAgainstOriginalModels:
    @pytest.mark.parametrize(("family", "ldm"), [("sd1", "sd1"), ("sd2", "sd2"), ("sd2-v", "sd2"), ("sdxl", "sdxl")])
    def test_unet_config_matches_diffusers_mapping_of_ldm_yaml(self, family: str, ldm: str) -> None:
        from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

        params = {k: v for k, v in _LDM_UNETS[ldm].items() if k not in ("legacy", "image_size")}
        params.setdefault("transformer_depth", None)
        original = {"model": {"params": {"unet_config": {"params": params},
                                         "first_stage_config": {"params": {"ddconfig": _VAE_DD}}}}}
        derived = create_unet_diffusers_config_from_ldm(original, checkpoint={})
        with torch.device("meta"):  # the full configs, defaults filled in
            theirs = UNet2DConditionModel.from_config(derived).config
        ours = meta_unet(family).config
        assert {k: _plain(ours[k]) for k in _CONFIG_KEYS} == {k: _plain(theirs[k]) for k in _CONFIG_KEYS}

    @pytest.mark.parametrize(("family", "ldm"), [("sd1", "sd1"), ("sd2", "sd2")])
    def test_unet_has_the_ldm_unets_keys_and_shapes(self, family: str, ldm: str) -> None:
        from ldm.modules.diffusionmodules.openaimodel import UNetModel

        with torch.device("meta"):
            original = UNetModel(**_LDM_UNETS[ldm])
        expected = {k: tuple(v.shape) for k, v in original.state_dict().items()}
        ours = {k: tuple(v.shape) for k, v in unet_to_ldm(meta_unet(family), prefix="").items()}
        assert ours == expected

    def test_vae_has_the_ldm_autoencoders_keys_and_shapes(self) -> None:
        from ldm.modules.diffusionmodules.model import Decoder, Encoder

        with torch.device("meta"):
            parts = {"encoder": Encoder(**_VAE_DD), "decoder": Decoder(**_VAE_DD)}
            expected = {f"{name}.{k}": tuple(v.shape) for name, m in parts.items() for k, v in m.state_dict().items()}
        # quant_conv / post_quant_conv sit in ldm's AutoencoderKL around the encoder and decoder.
        expected.update({"quant_conv.weight": (8, 8, 1, 1), "quant_conv.bias": (8,),
                         "post_quant_conv.weight": (4, 4, 1, 1), "post_quant_conv.bias": (4,)})
        ours = {k: tuple(v.shape) for k, v in vae_to_ldm(meta_vae("sd1"), prefix="").items()}
        assert ours == expected
