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


# -- a single-file transformer -----------------------------------------------------------------------------------
_SAME_MODEL = "give the diffusers folder of the same model as components_from"


def _empty_transformer(cls: type, folder: Path) -> torch.nn.Module:
    """The folder's transformer class and config with no weights allocated (meta tensors): a 12 B Flux is built
    without 48 GB of random float32 weights that the file's would replace."""
    try:
        config = cls.load_config(str(folder), subfolder="transformer", local_files_only=True)  # type: ignore[attr-defined]
    except (OSError, ValueError) as e:
        raise LoraLoopError(f"cannot read {folder / 'transformer' / 'config.json'} ({e})") from e
    with torch.device("meta"):
        return cls.from_config(config)  # type: ignore[attr-defined]


def _wrong_layout(path: Path, folder: Path, flux: bool, keys: list[str]) -> LoraLoopError:
    from .flow_keys import FLUX_MARKER, SD3_MARKER, find_prefix

    pipeline = "FluxPipeline" if flux else "StableDiffusion3Pipeline"
    if find_prefix(keys, SD3_MARKER if flux else FLUX_MARKER) is not None:
        other, folder_kind = ("an SD3/3.5 transformer", "StableDiffusion3Pipeline") if flux else \
            ("a Flux.1 transformer", "FluxPipeline")
        msg = (f"{path} is {other}, but components_from {folder} is a {pipeline} folder; give a {folder_kind} "
               "folder as components_from")
        return LoraLoopError(msg)
    what, marker = ("a Flux.1 transformer", FLUX_MARKER) if flux else ("an SD3/3.5 transformer", SD3_MARKER)
    sample = ", ".join(keys[:3])
    return LoraLoopError(f"{path} is not {what} (no {marker}* keys; it has keys like {sample})")


def _check_structure(path: Path, folder: Path, flux: bool, shapes: dict[str, tuple[int, ...]],
                     config: dict) -> None:
    """Depth, width and guidance of the file against the folder's config, checked on the shapes before any weight is
    read: a mismatch there is the common mistake (another model's folder) and is worth a message in its terms."""
    from .flow_keys import block_count

    source = f"{folder / 'transformer' / 'config.json'} says"
    width = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    if flux:
        counts = (("double", "double_blocks.", "num_layers"), ("single", "single_blocks.", "num_single_layers"))
        embedder = "img_in.weight"
    else:
        counts = (("joint", "joint_blocks.", "num_layers"),)
        embedder = "x_embedder.proj.weight"
    for name, marker, field in counts:
        found, expected = block_count(list(shapes), marker), int(config[field])
        if found != expected:
            raise LoraLoopError(f"{path} has {found} {name} blocks but {source} {expected} ({field}); {_SAME_MODEL}")
    if embedder in shapes and shapes[embedder][0] != width:
        msg = (f"{path} is {shapes[embedder][0]} wide ({embedder}) but {source} {width} (num_attention_heads × "
               f"attention_head_dim); {_SAME_MODEL}")
        raise LoraLoopError(msg)
    if flux and ("guidance_in.in_layer.weight" in shapes) != bool(config["guidance_embeds"]):
        has = "has a" if "guidance_in.in_layer.weight" in shapes else "has no"
        msg = (f"{path} {has} guidance input (guidance_in: Flux.1 dev has one, schnell not) but {source} "
               f"guidance_embeds {config['guidance_embeds']}; {_SAME_MODEL}")
        raise LoraLoopError(msg)


def _listed(names: list[str], limit: int = 4) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _convert(path: Path, flux: bool, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors in diffusers' layout; every tensor must be used (one left over means another model)."""
    from .flow_keys import flux_to_diffusers, sd3_to_diffusers

    what = "Flux.1 (BFL layout)" if flux else "SD3/3.5 (SAI MMDiT layout)"
    try:
        converted = flux_to_diffusers(tensors) if flux else sd3_to_diffusers(tensors)
    except KeyError as e:
        msg = f"{path} lacks {e.args[0]}, which a {what} transformer has; is the file complete?"
        raise LoraLoopError(msg) from e
    except ValueError as e:
        raise LoraLoopError(f"{path} does not have the shapes of a {what} transformer ({e})") from e
    if tensors:  # what the converter did not take
        msg = (f"{path} has weights that a {what} transformer does not have: {_listed(sorted(tensors))}; LoRA Loop "
               "reads plain Flux.1 dev/schnell and SD3/3.5 transformers and their fine-tunes, not variants with "
               "other modules")
        raise LoraLoopError(msg)
    return converted


def _check_against(path: Path, folder: Path, converted: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    config = folder / "transformer" / "config.json"
    missing = sorted(set(expected) - set(converted))
    extra = sorted(set(converted) - set(expected))
    if missing or extra:
        parts = [f"lacks {_listed(missing)}" if missing else "",
                 f"has {_listed(extra)}, which that transformer does not" if extra else ""]
        msg = (f"{path} does not fit the transformer that {config} describes (in diffusers' names, it "
               f"{' and '.join(p for p in parts if p)}); {_SAME_MODEL}")
        raise LoraLoopError(msg)
    wrong = [f"{k} {tuple(v.shape)} vs {expected[k]}" for k, v in converted.items() if tuple(v.shape) != expected[k]]
    if wrong:
        msg = (f"{path} has other shapes than {config} describes (file vs folder: {_listed(wrong)}); "
               f"{_SAME_MODEL}")
        raise LoraLoopError(msg)


def load_transformer_file(cls: type, path: Path, folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """A single-file Flux.1 (BFL layout) or SD3/3.5 (SAI layout) transformer as the diffusers `cls` that `folder`'s
    transformer config describes, in `dtype`.

    The file may carry ComfyUI's `model.diffusion_model.` prefix and other components (all-in-one files: only the
    transformer's keys are read), and fp8 weights (ComfyUI's fp8_scaled scales applied), widened to `dtype`:
    `base_weight_dtype: fp8` stores the adapted Linears in fp8 again after loading (trainer/fp8.py).

    Raises:
        LoraLoopError: the file is not that family's transformer, or not the size the folder's config describes.
    """
    from diffusers import FluxTransformer2DModel

    from .checkpoint import SingleFile
    from .flow_keys import FLUX_MARKER, SD3_MARKER, find_prefix, read_transformer, transformer_keys

    flux = issubclass(cls, FluxTransformer2DModel)
    ckpt = SingleFile(path)
    keys = list(ckpt.shapes)
    prefix = find_prefix(keys, FLUX_MARKER if flux else SD3_MARKER)
    if prefix is None:
        raise _wrong_layout(path, folder, flux, keys)
    model = _empty_transformer(cls, folder)
    shapes = {k.removeprefix(prefix): ckpt.shapes[k] for k in transformer_keys(keys, prefix)}
    _check_structure(path, folder, flux, shapes, dict(model.config))
    converted = _convert(path, flux, read_transformer(ckpt, prefix, dtype))
    _check_against(path, folder, converted, model)
    # assign: the parameters become the converted tensors (no second copy); q/k/v are views of the fused tensor
    model.load_state_dict(converted, strict=True, assign=True)
    # a non-persistent buffer would still be a meta tensor (none in diffusers' Flux/SD3 today; this guards updates)
    empty = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise LoraLoopError(f"{cls.__name__} has tensors that no file provides ({_listed(empty)}); LoRA Loop cannot "
                            "load single files with this diffusers version: use the diffusers folder as base_model")
    log.info("loaded %s (%d tensors%s) as the transformer of %s", path, len(converted),
             f" under {prefix!r}" if prefix else "", folder)
    return model.eval()


def load_flow_folder(folder: Path, index: dict, family: str | None, dtype: torch.dtype,
                     transformer_file: Path | None = None) -> FlowBundle:
    """The folder's model; with `transformer_file` (a single-file Flux.1/SD3 transformer in BFL/SAI/ComfyUI layout, as
    flux1-dev.safetensors or a fine-tune is published) that file replaces the folder's transformer, built from the
    folder's transformer config (`load_transformer_file`; everything else comes from the folder)."""
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
        transformer = load_transformer_file(cls, transformer_file, folder, dtype)
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
