"""Opt-in (LORALOOP_REAL_SIZE_TESTS=1): real-size SD1 / SD2 / SDXL single files load through the shipped configs.

The models are built from `model_configs/<family>` with every tensor set to its own constant (derived from its name), in
fp16, written in LDM layout (SD2 with its 24th OpenCLIP layer and projection), and loaded back with the shipped configs;
every weight must arrive in its place. Costs 2-7 GB of disk and RAM and 20-45 s per family on 2 CPU cores.
"""

from __future__ import annotations

import gc
import os
import zlib
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from helpers.ldm_checkpoint import text_encoders_to_ldm, unet_to_ldm, vae_to_ldm
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from loraloop.trainer.bundles.checkpoint import load_checkpoint_bundle, shipped_config_dir

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("LORALOOP_REAL_SIZE_TESTS"),
                                 reason="set LORALOOP_REAL_SIZE_TESTS=1 (needs ~10 GB of RAM for SDXL)")]


def constant(role: str, name: str) -> float:
    return ((zlib.crc32(f"{role}:{name}".encode()) % 4001) - 2000) / 1000.0


def build(family: str) -> dict[str, torch.nn.Module]:
    folder = shipped_config_dir(family)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # allocate fp16 straight away: SDXL in fp32 would need 14 GB
    try:
        with torch.device("meta"):
            modules = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
                       "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
                       "te0": CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder / "text_encoder")))}
            if family == "sdxl":
                config = CLIPTextConfig.from_pretrained(str(folder / "text_encoder_2"))
                modules["te1"] = CLIPTextModelWithProjection(config)
    finally:
        torch.set_default_dtype(default)
    for role, module in modules.items():
        module.to_empty(device="cpu")
        with torch.no_grad():
            for name, param in module.named_parameters():
                param.fill_(constant(role, name))
    return modules


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_real_size_single_file(family: str, tmp_path: Path) -> None:
    modules = build(family)
    encoders = [m for role, m in modules.items() if role.startswith("te")]
    sd = {**unet_to_ldm(modules["unet"]), **vae_to_ldm(modules["vae"]), **text_encoders_to_ldm(family, encoders)}
    path = tmp_path / f"{family}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    names = {role: sorted(n for n, _ in m.named_parameters()) for role, m in modules.items()}
    del sd, modules, encoders
    gc.collect()

    bundle = load_checkpoint_bundle(path, dtype=torch.float16)
    assert bundle.family.name == family
    loaded = dict(zip(names, bundle.modules().values(), strict=True))
    for role, module in loaded.items():
        params = dict(module.named_parameters())
        assert sorted(params) == names[role], role
        wrong = [n for n, p in params.items()
                 if not bool((p == torch.tensor(constant(role, n), dtype=torch.float16).to(p.dtype)).all())]
        assert not wrong, (role, wrong[:5])
