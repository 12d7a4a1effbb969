"""UNet layout mapping and kohya key names (docs/lora-format.md §1.2-§2)."""

import re

import pytest
import torch
from ldm_support import SD2_UNET, SD15_UNET, TINY_UNET, ldm_unet

from loraloop.trainer.naming import UNetLayout, find_targets, kohya_te_name, ldm_unet_lora_name, unet_targets

TE_PATTERN = r"(?:.*\.)?layers\.(\d+)\.((?:self_attn\.(?:q|k|v|out)_proj)|(?:mlp\.fc[12]))"

SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


def meta_ldm(**kwargs):
    with torch.device("meta"):
        return ldm_unet(**kwargs)


class TestUNetLayout:
    def test_ldm_and_diffusers_state_dicts_map_one_to_one(self):
        """Every parameter of a tiny ldm UNet maps to a same-shaped diffusers parameter and back."""
        from diffusers import UNet2DConditionModel

        ldm = ldm_unet(**TINY_UNET)
        dif = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=8,
                                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                   attention_head_dim=8)
        layout = UNetLayout.from_ldm_module(ldm)
        assert layout == UNetLayout.from_diffusers_config(dif.config)
        dsd = dif.state_dict()
        for key, value in ldm.state_dict().items():
            module, param = key.rsplit(".", 1)
            dkey = f"{layout.to_diffusers(module)}.{param}"
            assert dsd[dkey].shape == value.shape, key
            assert layout.to_ldm(layout.to_diffusers(module)) == module
        assert len(dsd) == len(ldm.state_dict())

    def test_sd15_closed_forms(self):
        """The SD1.5 map matches the closed forms A1111 and diffusers use (docs/lora-format.md §2.2)."""
        layout = UNetLayout.from_ldm_module(meta_ldm(**SD15_UNET))
        assert layout == UNetLayout(2, (True, True, True, False), (False, True, True, True))
        assert layout.to_diffusers("input_blocks.4.1.proj_in") == "down_blocks.1.attentions.0.proj_in"
        assert layout.to_diffusers("input_blocks.9.0.op") == "down_blocks.2.downsamplers.0.conv"
        assert layout.to_diffusers("output_blocks.2.1.conv") == "up_blocks.0.upsamplers.0.conv"
        assert layout.to_diffusers("output_blocks.5.2.conv") == "up_blocks.1.upsamplers.0.conv"
        assert layout.to_diffusers("output_blocks.11.0.skip_connection") == "up_blocks.3.resnets.2.conv_shortcut"
        assert layout.to_diffusers("middle_block.2.emb_layers.1") == "mid_block.resnets.1.time_emb_proj"
        assert layout.to_diffusers("input_blocks.0.0") == "conv_in"

    def test_unknown_path_raises(self):
        layout = UNetLayout(2, (True,), (True,))
        with pytest.raises(KeyError, match="no counterpart"):
            layout.to_diffusers("foo.bar")


class TestKohyaNames:
    def test_sd15_ldm_names_are_kohyas(self):
        """An LDM SD1.5 UNet yields kohya's 192 diffusers-style names (+86 LoCon convs)."""
        unet = meta_ldm(**SD15_UNET)
        layout = UNetLayout.from_ldm_module(unet)
        names = {ldm_unet_lora_name("diffusers", layout, p) for p in unet_targets(unet, conv=False)}
        assert len(names) == 192
        assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k" in names
        assert "lora_unet_mid_block_attentions_0_proj_in" in names
        assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2" in names
        assert "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_ff_net_0_proj" in names
        conv = {ldm_unet_lora_name("diffusers", layout, p) for p in unet_targets(unet, conv=True)}
        assert len(conv) - len(names) == 86
        assert "lora_unet_down_blocks_0_resnets_0_conv1" in conv
        assert "lora_unet_up_blocks_0_upsamplers_0_conv" in conv
        assert "lora_unet_down_blocks_2_downsamplers_0_conv" in conv

    def test_sd2_ldm_uses_linear_projections(self):
        unet = meta_ldm(**SD2_UNET)
        targets = unet_targets(unet, conv=False)
        assert len(targets) == 192
        assert isinstance(dict(unet.named_modules())["input_blocks.1.1.proj_in"], torch.nn.Linear)

    def test_sdxl_diffusers_unet_gets_sgm_names(self):
        """A diffusers SDXL UNet yields kohya's 722 SGM-style names (+66 LoCon)."""
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        layout = UNetLayout.from_diffusers_config(unet.config)
        targets = unet_targets(unet, conv=False)
        names = {"lora_unet_" + layout.to_ldm(p).replace(".", "_") for p in targets}
        assert len(names) == 722
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
        assert "lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj" in names
        assert "lora_unet_output_blocks_2_1_proj_out" in names
        assert len(unet_targets(unet, conv=True)) - len(targets) == 66
        assert layout.to_ldm("up_blocks.0.upsamplers.0.conv") == "output_blocks.2.2.conv"
        assert layout.to_ldm("down_blocks.1.downsamplers.0.conv") == "input_blocks.6.0.op"

    def test_text_encoder_names_ignore_host_prefixes(self):
        """CLIP layer names come out the same whatever the host calls the module.

        (transformers 4 or 5, A1111, ComfyUI)
        """
        expected = "lora_te1_text_model_encoder_layers_11_mlp_fc2"
        for path in ("encoder.layers.11.mlp.fc2", "text_model.encoder.layers.11.mlp.fc2",
                     "transformer.text_model.encoder.layers.11.mlp.fc2"):
            assert kohya_te_name("lora_te1", path, TE_PATTERN) == expected
        assert kohya_te_name("lora_te", "encoder.layers.0.self_attn.q_proj", TE_PATTERN) == (
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj")

    def test_clip_targets_match_kohya_counts(self):
        """72 CLIP-L modules for a 12-layer encoder (6 per layer)."""
        from transformers import CLIPTextConfig, CLIPTextModel

        with torch.device("meta"):
            te = CLIPTextModel(CLIPTextConfig())  # the CLIP-L defaults: 12 layers, 768 wide
        from loraloop.trainer.naming import TE_CLASSES

        targets = find_targets(te, TE_CLASSES)
        assert len(targets) == 72
        assert all(re.fullmatch(TE_PATTERN, t) for t in targets)


def test_dit_targets_leave_out_what_the_last_block_discards():
    """Qwen-Image's last block: its text stream's MLP and attention output are thrown away, so they get no adapter;
    the same layers of earlier blocks, and the last block's image stream, do."""
    from torch import nn

    from loraloop.trainer.families import get_family
    from loraloop.trainer.naming import dit_targets

    def block():
        b = nn.Module()
        b.attn = nn.Module()
        b.attn.to_q, b.attn.to_add_out = nn.Linear(4, 4), nn.Linear(4, 4)
        b.txt_mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
        b.img_mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
        return b

    root = nn.Module()
    root.transformer_blocks = nn.ModuleList([block() for _ in range(11)])  # 10 sorts before 9 as text: numbers count
    family = get_family("qwen-image")
    found = dit_targets(root, family.blocks, family.exclude, family.last_block_unused)
    assert "transformer_blocks.9.txt_mlp.0" in found and "transformer_blocks.9.attn.to_add_out" in found
    assert not any(p.startswith("transformer_blocks.10.") and ("txt_mlp" in p or "to_add_out" in p) for p in found)
    assert {"transformer_blocks.10.attn.to_q", "transformer_blocks.10.img_mlp.0"} <= set(found)
