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


def load_flow_folder(folder: Path, index: dict, family: str | None, dtype: torch.dtype,
                     transformer_file: Path | None = None) -> FlowBundle:
    """The folder's model; with `transformer_file` (a single-file Flux.1/SD3 transformer in BFL/SAI/ComfyUI layout, as
    flux1-dev.safetensors or a fine-tune is published) that file replaces the folder's transformer, converted by
    diffusers' `from_single_file` with the folder's transformer config (everything else comes from the folder)."""
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
    cls = FluxTransformer2DModel if flux else SD3Transformer2DModel
    if transformer_file is None:
        transformer = _load(cls, folder, "transformer", torch_dtype=dtype)
    else:
        try:
            transformer = cls.from_single_file(str(transformer_file), config=str(folder), subfolder="transformer",
                                               torch_dtype=dtype, local_files_only=True)
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            msg = (f"cannot load {transformer_file} as the transformer of {folder} ({e}); is it a {pipeline} "
                   "transformer of the same size?")
            raise LoraLoopError(msg) from e
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
    name = transformer_file.name if transformer_file is not None else folder.name
    return FlowBundle(get_family(detected), arch, transformer, vae, encoders, tokenizers, name, shift)


def load_flow_single_file(path: Path, components_from: str | None, family: str | None,
                          dtype: torch.dtype) -> FlowBundle:
    """A single-file Flux.1/SD3 transformer, with the text encoders, tokenizers and VAE of `components_from` (the
    family's diffusers folder: T5's tokenizer ships with no package, so it has to come from a model folder)."""
    if not components_from:
        msg = (f"{path} holds a Flux.1/SD3 transformer only; set components_from to that family's diffusers folder "
               "(FluxPipeline / StableDiffusion3Pipeline, with model_index.json) for its text encoders, tokenizers "
               "and VAE, or train it inside ComfyUI (TrainLoRA on the loaded MODEL)")
        raise LoraLoopError(msg)
    folder = Path(components_from).expanduser()
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise LoraLoopError(f"components_from {folder} is not a diffusers folder (no model_index.json)")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    if not is_flow_folder(index):
        msg = (f"components_from {folder} is a {index.get('_class_name')}; a Flux.1/SD3 transformer needs a "
               "FluxPipeline or StableDiffusion3Pipeline folder")
        raise LoraLoopError(msg)
    return load_flow_folder(folder, index, family, dtype, transformer_file=path)
