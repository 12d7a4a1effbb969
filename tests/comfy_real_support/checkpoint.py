"""A random-weight SD1.5 single-file checkpoint (LDM keys, fp16, ~2 GB) built from our shipped `model_configs/sd1`.

ComfyUI detects the model from key names and shapes, so the file must have the real SD1.5 layout: UNet 320/640/1280
channels with 768-d cross-attention, the SD VAE, and CLIP ViT-L/14 text weights. Weights are diffusers'/transformers'
own random initialisation (seeded), so sampling gives finite, deterministic (meaningless) images.

The file is cached (by config and seed) in `$LORALOOP_TEST_CACHE` or `~/.cache/loraloop-tests`: building it takes
about a minute on 2 CPU cores and 7 GB of RAM at peak.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "trainer" / "model_configs" / "sd1"
FORMAT_VERSION = 1  # bump when the way the file is built changes


def cache_dir() -> Path:
    return Path(os.environ.get("LORALOOP_TEST_CACHE") or Path.home() / ".cache" / "loraloop-tests")


def _fingerprint(seed: int) -> str:
    parts = [FORMAT_VERSION, seed] + [json.loads((CONFIGS / sub / "config.json").read_text())
                                      for sub in ("unet", "vae", "text_encoder")]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def build_state_dict(seed: int = 0) -> dict:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    for path in (str(REPO / "tests"), str(REPO)):
        if path not in sys.path:
            sys.path.insert(0, path)
    from helpers.ldm_checkpoint import clip_to_ldm, unet_to_ldm, vae_to_ldm

    out: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS / "unet"))
        out.update({k: v.half() for k, v in unet_to_ldm(unet).items()})
        del unet
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / "vae"))
        out.update({k: v.half() for k, v in vae_to_ldm(vae).items()})
        del vae
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(str(CONFIGS / "text_encoder")))
        te_sd = clip_to_ldm(te, "cond_stage_model.transformer.")
        out.update({k: (v.half() if v.is_floating_point() else v) for k, v in te_sd.items()})
    return {k: v.contiguous() for k, v in out.items()}


def sd15_checkpoint(seed: int = 0) -> Path:
    """Path of the cached checkpoint, built on first use (written atomically)."""
    target = cache_dir() / f"loraloop-random-sd15-{_fingerprint(seed)}.safetensors"
    if target.is_file():
        return target
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    save_file(build_state_dict(seed), str(tmp), metadata={"note": "random weights, LoRA Loop tests"})
    tmp.replace(target)
    return target


if __name__ == "__main__":
    print(sd15_checkpoint(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
