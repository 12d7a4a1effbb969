"""Flux.1 and SD3/3.5 diffusers folders (the layout their Hugging Face repositories publish), loaded offline.

Everything comes from the folder: transformer, VAE, text encoders and their tokenizers (T5's vocabulary ships only
with a model). The time shift is the scheduler's (`shift`; Flux.1 dev's resolution-dependent shift is taken at its
1024-pixel value μ = 1.15, ComfyUI's default). LoRA training of the text encoders is not offered here.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from ..errors import LoraLoopError
from ..families import get_family
from .flow_bundle import FlowBundle

log = logging.getLogger(__name__)

# pipeline class → (text encoder subfolders with their kohya prefixes, tokenizer subfolders)
FLOW_PIPELINES = {
    "FluxPipeline": ((("text_encoder", "lora_te1"), ("text_encoder_2", "lora_te3")), ("tokenizer", "tokenizer_2")),
    "StableDiffusion3Pipeline": ((("text_encoder", "lora_te1"), ("text_encoder_2", "lora_te2"),
                                  ("text_encoder_3", "lora_te3")), ("tokenizer", "tokenizer_2", "tokenizer_3")),
}


def is_flow_folder(index: dict) -> bool:
    return index.get("_class_name") in FLOW_PIPELINES


def _load(cls: type, folder: Path, subfolder: str, **kwargs: object) -> torch.nn.Module:
    try:
        return cls.from_pretrained(str(folder), subfolder=subfolder, local_files_only=True, **kwargs)  # type: ignore[attr-defined]
    except (OSError, RuntimeError, ValueError) as e:
        raise LoraLoopError(f"cannot load {folder / subfolder} ({e})") from e


def load_flow_folder(folder: Path, index: dict, family: str | None, dtype: torch.dtype) -> FlowBundle:
    import transformers
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import AutoTokenizer

    from .flux import FluxArchitecture
    from .sd3 import SD3Architecture

    pipeline = index["_class_name"]
    flux = pipeline == "FluxPipeline"
    for part in ("transformer", "vae"):
        if not (folder / part / "config.json").is_file():
            msg = f"{folder} is a {pipeline} folder without {part}/config.json; the download is incomplete"
            raise LoraLoopError(msg)
    transformer = _load(FluxTransformer2DModel if flux else SD3Transformer2DModel, folder, "transformer",
                        torch_dtype=dtype)
    detected = ("flux1" if transformer.config.guidance_embeds else "flux1-schnell") if flux else "sd3"
    if family is not None and get_family(family).name != detected:
        msg = f"{folder} holds a {pipeline} detected as {detected}, but family is set to {family}; remove family"
        raise LoraLoopError(msg)
    vae = _load(AutoencoderKL, folder, "vae", torch_dtype=torch.float32)
    encoder_dirs, tokenizer_dirs = FLOW_PIPELINES[pipeline]
    encoders, tokenizers = [], []
    for (subfolder, prefix), tokenizer_dir in zip(encoder_dirs, tokenizer_dirs, strict=True):
        if (index.get(subfolder) or [None, None])[1] is None or not (folder / subfolder).is_dir():
            if subfolder == "text_encoder_3":  # SD3 runs without T5 (zeros in its place)
                continue
            raise LoraLoopError(f"{folder} has no {subfolder}/, which {pipeline} needs")
        library, class_name = index[subfolder]  # e.g. ["transformers", "T5EncoderModel"]
        cls = getattr(transformers, class_name, None) if library == "transformers" else None
        if cls is None:
            raise LoraLoopError(f"{folder}: {subfolder} is a {library}.{class_name}, which {pipeline} does not use")
        encoders.append((prefix, _load(cls, folder, subfolder, torch_dtype=dtype)))
        tokenizers.append(AutoTokenizer.from_pretrained(str(folder / tokenizer_dir), local_files_only=True))
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_path.read_text(encoding="utf-8")) if scheduler_path.is_file() else {}
    shift = None
    if scheduler.get("use_dynamic_shifting"):
        shift = math.exp(float(scheduler.get("max_shift", 1.15)))
    elif "shift" in scheduler:
        shift = float(scheduler["shift"])
    log.info("loading %s folder %s as %s (shift %s)", pipeline, folder, detected, shift)
    arch = FluxArchitecture() if flux else SD3Architecture()
    return FlowBundle(get_family(detected), arch, transformer, vae, encoders, tokenizers, folder.name, shift)
