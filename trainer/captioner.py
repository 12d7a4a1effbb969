"""Automatic captions from a local image-to-text model: load it for one job, caption images, release it.

A captioner is a transformers model folder on disk (its `config.json`, weights and processor); nothing is downloaded.
BLIP (`BlipForConditionalGeneration`) runs directly: it captions without a prompt. Any other model goes through
transformers' `image-text-to-text` pipeline (transformers 4 also has `image-to-text`), which is asked for a sentence
or for tags (`PROMPTS`). The model lives for one job only: `Captioner.release()` (also on leaving a `with` block)
moves it off the accelerator, drops every reference and empties the CUDA cache, or calls the host's own cache
emptier (ComfyUI's `soft_empty_cache`), so training and sampling get the memory back.

Which images get a caption and where it goes is one rule for every front door (`plan_targets`): a sidecar
`<stem><ext>` next to the image; an image that already has a caption (a sidecar, or the target file exists) is kept
unless overwrite is asked; an image of a dataset that reads a metadata file is not written (its sidecar would be
ignored, see `data.sources`). Files are written atomically (`write_caption`).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .caption_settings import BATCH_SIZE, MAX_NEW_TOKENS, STYLES
from .data.captions import contains_trigger
from .data.images import IMAGE_EXTENSIONS, load_rgb
from .data.options import DatasetOptions
from .data.sources import DatasetScan, ImageRecord, scan_dataset
from .errors import ConfigError, MissingDependencyError, UnsupportedModelError
from .lorafile import atomic_write

log = logging.getLogger(__name__)

# What a prompted model (a VLM) is asked; BLIP takes no prompt and its sentence is turned into tags by `as_tags`.
PROMPTS = {"sentence": "Describe this image in one sentence.",
           "tags": "List the subject, its attributes, the setting and the style of this image as short "
                   "comma-separated tags."}
# Images are decoded at no less than twice this side before the model's processor resizes them (every captioner we
# know of looks at 224-768 px); a 6000 px JPEG is then cheap to decode.
DECODE_SIDE = 768
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Words a caption sentence is split at to make tags ("a dog with a red ball on grass" → dog, red ball, grass).
_LINKS = re.compile(r"\s*(?:[,;.\n]|\b(?:and|with|on|in|at|of|near|next to|under|over|while|wearing|holding|"
                    r"standing|sitting|lying)\b)\s*", re.IGNORECASE)
_ARTICLE = re.compile(r"^(?:a|an|the|this|that|there is|there are|it is|image of|picture of|photo of)\s+",
                      re.IGNORECASE)


# -- folders ----------------------------------------------------------------------------------------------------------
def is_captioner_dir(path: Path) -> bool:
    """A transformers model folder: it holds a config.json."""
    return (Path(path) / "config.json").is_file()


def find_captioners(root: Path, depth: int = 3) -> list[str]:
    """Model folders under `root` (at most `depth` levels down), as posix paths relative to it, sorted.

    A model folder is not searched further: its sub-folders are its own parts, not other models.
    """
    root = Path(root)
    found: list[str] = []

    def walk(folder: Path, level: int) -> None:
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            if is_captioner_dir(child):
                found.append(child.relative_to(root).as_posix())
            elif level < depth:
                walk(child, level + 1)

    if root.is_dir():
        walk(root, 1)
    return found


def weights_bytes(path: Path) -> int:
    """The size of a model folder's weight files: what loading it will take on the device (before activations)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


# -- the model --------------------------------------------------------------------------------------------------------
def pick_device(device: str | torch.device | None = None) -> torch.device:
    """`None`/"auto": the CUDA GPU when there is one, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(device: torch.device) -> torch.dtype:
    """Half precision on a GPU (bf16 where supported: some VLMs overflow in fp16), float32 elsewhere."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        msg = "captioning needs the transformers package: pip install transformers"
        raise MissingDependencyError(msg) from err
    return transformers


def _model_type(path: Path) -> tuple[str, list[str]]:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path / 'config.json'} cannot be read ({err}); is {path} a transformers model folder?",
                          key="model", value=str(path)) from err
    return str(config.get("model_type", "")), list(config.get("architectures") or [])


@dataclass
class Captioner:
    """A loaded image-to-text model. Use it in a `with` block, or call `release()` when done.

    Args:
        path: the model folder.
        device, dtype: where it runs.
        kind: "blip" (run directly) or the pipeline task that runs it.
        empty_cache: the host's cache emptier, called by `release()` instead of `torch.cuda.empty_cache()`.
    """

    path: Path
    device: torch.device
    dtype: torch.dtype
    kind: str
    model: Any = field(default=None, repr=False)
    processor: Any = field(default=None, repr=False)
    pipeline: Any = field(default=None, repr=False)
    empty_cache: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def caption(self, images: Sequence[Image.Image], style: str = "sentence", *, prompt: str | None = None,
                max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
        """The model's raw text for each image, in order (see `format_caption` for the finished caption)."""
        if not self.loaded:
            raise RuntimeError(f"the captioner {self.path.name} was released; load it again")
        check_style(style)
        if not images:
            return []
        with torch.no_grad():
            if self.kind == "blip":
                return self._blip(images, max_new_tokens)
            return self._pipeline(images, prompt or PROMPTS[style], max_new_tokens)

    def _blip(self, images: Sequence[Image.Image], max_new_tokens: int) -> list[str]:
        inputs = self.processor(images=list(images), return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        out = self.model.generate(pixel_values=pixels, max_new_tokens=max_new_tokens)
        return [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]

    def _pipeline(self, images: Sequence[Image.Image], prompt: str, max_new_tokens: int) -> list[str]:
        batch = len(images)
        if self.kind == "image-to-text":  # transformers 4: captioning models take no prompt
            results = self.pipeline(list(images), max_new_tokens=max_new_tokens, batch_size=batch)
        elif getattr(self.pipeline.processor, "chat_template", None):  # a chat VLM: one conversation per image
            chats = [[{"role": "user", "content": [{"type": "image", "image": image},
                                                   {"type": "text", "text": prompt}]}] for image in images]
            results = self.pipeline(text=chats, max_new_tokens=max_new_tokens, return_full_text=False,
                                    batch_size=batch)
        else:
            results = self.pipeline(images=list(images), text=[prompt] * batch, max_new_tokens=max_new_tokens,
                                    return_full_text=False, batch_size=batch)
        return [_generated_text(r) for r in results]

    def release(self) -> None:
        """Move the model off the accelerator, drop every reference to it and give the cached memory back."""
        model, self.model, self.processor, self.pipeline = self.model, None, None, None
        if model is not None:
            with contextlib.suppress(Exception):  # a quantized or offloaded model may refuse; it is dropped anyway
                model.to("cpu")
        del model
        gc.collect()
        if self.empty_cache is not None:
            self.empty_cache()
        elif torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        log.info("captioner %s released", self.path.name)

    def __enter__(self) -> Captioner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _generated_text(result: Any) -> str:
    """The text of one pipeline result: `[{"generated_text": …}]`, `{"generated_text": …}`, or chat messages."""
    if isinstance(result, list):
        result = result[0] if result else {}
    text = result.get("generated_text", "") if isinstance(result, dict) else result
    if isinstance(text, list):  # the whole conversation: the answer is the last message
        text = text[-1].get("content", "") if text and isinstance(text[-1], dict) else ""
    return str(text).strip()


def check_captioner_dir(path: str | Path) -> Path:
    """`path` as a Path when it is a model folder, else a ConfigError saying what is expected."""
    path = Path(path).expanduser()
    if not path.is_dir() or not is_captioner_dir(path):
        msg = (f"captioner model {path} not found: give a folder holding a transformers image-to-text model "
               "(config.json, weights, processor files), e.g. a downloaded Salesforce/blip-image-captioning-large")
        raise ConfigError(msg, key="model", value=str(path))
    return path


def load_captioner(path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                   empty_cache: Callable[[], None] | None = None) -> Captioner:
    """Load the image-to-text model in the folder `path` (local files only) onto `device`."""
    path = check_captioner_dir(path)
    transformers = _transformers()
    device = pick_device(device)
    dtype = dtype or pick_dtype(device)
    model_type, architectures = _model_type(path)
    try:
        if model_type == "blip" and (not architectures or "BlipForConditionalGeneration" in architectures):
            processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
            model = transformers.BlipForConditionalGeneration.from_pretrained(path, local_files_only=True,
                                                                              **_dtype_kwarg(transformers, dtype))
            model.to(device).eval()
            captioner = Captioner(path, device, dtype, "blip", model, processor, empty_cache=empty_cache)
        else:
            captioner = _load_pipeline(transformers, path, model_type, device, dtype, empty_cache)
    except ImportError as err:  # some models need a further package (timm, einops, a newer transformers …)
        msg = f"loading the captioner in {path} needs a package that is not installed ({err}); pip install it"
        raise MissingDependencyError(msg) from err
    except (OSError, ValueError, KeyError) as err:
        msg = (f"cannot load the captioner in {path} ({type(err).__name__}: {err}); it must be a complete "
               "transformers image-to-text model folder (config, weights, processor/tokenizer files)")
        raise UnsupportedModelError(msg) from err
    log.info("captioner %s loaded (%s) on %s as %s", path.name, captioner.kind, device, dtype)
    return captioner


def _dtype_kwarg(transformers: Any, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers 5 calls it `dtype`, 4 `torch_dtype` (5 still accepts the old name, with a warning)."""
    major = int(str(transformers.__version__).split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def _load_pipeline(transformers: Any, path: Path, model_type: str, device: torch.device, dtype: torch.dtype,
                   empty_cache: Callable[[], None] | None) -> Captioner:
    from transformers.pipelines import SUPPORTED_TASKS

    task = None
    if "image-text-to-text" in SUPPORTED_TASKS:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as vlm

        if model_type in vlm:
            task = "image-text-to-text"
    if task is None and "image-to-text" in SUPPORTED_TASKS:
        task = "image-to-text"
    if task is None:
        msg = (f"{path}: transformers {transformers.__version__} has no image-to-text pipeline for model type "
               f"{model_type!r}; use a BLIP captioning model or a vision-language model transformers supports")
        raise UnsupportedModelError(msg)
    kwargs: dict[str, Any] = {"device": device}
    params = inspect.signature(transformers.pipeline).parameters
    kwargs["dtype" if "dtype" in params else "torch_dtype"] = dtype
    pipe = transformers.pipeline(task, model=str(path), **kwargs)
    pipe.model.eval()
    return Captioner(path, device, dtype, task, pipe.model, getattr(pipe, "processor", None), pipe,
                     empty_cache=empty_cache)


# -- captions ---------------------------------------------------------------------------------------------------------
def check_style(style: str) -> str:
    if style not in STYLES:
        raise ConfigError(f"caption style must be one of {list(STYLES)} (got {style!r})", key="style", value=style,
                          allowed=STYLES)
    return style


def as_tags(text: str) -> str:
    """Comma-separated tags from a model's text: text that already has commas is split there only; a sentence is also
    split at linking words, with leading articles dropped. Duplicates (any case) are dropped, order kept."""
    parts = re.split(r"\s*[,;\n]\s*", text) if "," in text else _LINKS.split(text)
    tags, seen = [], set()
    for part in parts:
        tag = _ARTICLE.sub("", (part or "").strip(" .")).strip()
        if tag and tag.lower() not in seen:
            seen.add(tag.lower())
            tags.append(tag)
    return ", ".join(tags)


def format_caption(text: str, style: str = "sentence", trigger_word: str = "") -> str:
    """One line of caption: whitespace collapsed, tags when asked, the trigger word first unless already there."""
    text = " ".join(text.split())
    if style == "tags":
        text = as_tags(text)
    trigger = trigger_word.strip()
    if trigger and not contains_trigger(text, trigger):
        text = f"{trigger}, {text}" if text else trigger
    return text


def caption_images(captioner: Captioner, paths: Sequence[Path], options: DatasetOptions, *, style: str = "sentence",
                   trigger_word: str = "", batch_size: int = BATCH_SIZE, prompt: str | None = None,
                   max_new_tokens: int = MAX_NEW_TOKENS, progress: Callable[[int, int], None] | None = None,
                   check_stop: Callable[[], None] | None = None,
                   on_batch: Callable[[list[Path], list[str]], None] | None = None) -> list[str]:
    """Finished captions (`format_caption`) for `paths`, in order, `batch_size` images at a time.

    Images are decoded as training decodes them (`load_rgb`: EXIF orientation, transparency on `options.background`).
    `check_stop()` runs before every batch (a host raises there to cancel), `progress(done, total)` and
    `on_batch(paths, captions)` after it: a caller that writes there keeps what was done when a later batch stops.
    """
    check_style(style)
    total, out = len(paths), []
    for start in range(0, total, max(1, int(batch_size))):
        if check_stop is not None:
            check_stop()
        chunk = list(paths[start : start + max(1, int(batch_size))])
        images = [load_rgb(p, options, min_size=(DECODE_SIDE, DECODE_SIDE)) for p in chunk]
        texts = captioner.caption(images, style, prompt=prompt, max_new_tokens=max_new_tokens)
        captions = [format_caption(t, style, trigger_word) for t in texts]
        out += captions
        if on_batch is not None:
            on_batch(chunk, captions)
        if progress is not None:
            progress(len(out), total)
    return out


# -- which files ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaptionTarget:
    """One image of a dataset and where its caption would be written.

    Args:
        record: the image as the dataset scan found it.
        sidecar: the caption file to write, or None when one would be ignored (see `note`).
        exists: the image already has a caption file (the sidecar itself, or another caption extension).
        note: why nothing is written for it.
    """

    record: ImageRecord
    sidecar: Path | None
    exists: bool
    note: str = ""

    @property
    def image(self) -> Path:
        return self.record.path

    def wanted(self, overwrite: bool) -> bool:
        """Caption this image: it can be written, and it has no caption or overwriting was asked."""
        return self.sidecar is not None and (overwrite or not self.exists)


def sidecar_path(image: Path, extension: str) -> Path:
    return image.with_name(image.stem + extension)


def plan_targets(scan: DatasetScan, options: DatasetOptions) -> list[CaptionTarget]:
    """Every usable image of `scan` with its sidecar `<stem><first caption extension>`, in the scan's (file-name)
    order."""
    targets = []
    for record in scan.records:
        source = record.caption_source
        from_sidecar = source in {record.path.stem + ext for ext in options.caption_extensions}
        sidecar = sidecar_path(record.path, options.caption_extensions[0])
        if (source is not None and not from_sidecar) or (source is None and scan.metadata_files):
            where = source or scan.metadata_files[0].name
            targets.append(CaptionTarget(record, None, True, f"its caption comes from {where}, which wins over "
                                                             "sidecar files; edit that file instead"))
        else:
            targets.append(CaptionTarget(record, sidecar, from_sidecar or sidecar.exists()))
    return targets


def write_caption(path: Path, text: str, *, overwrite: bool = False) -> bool:
    """Write `text` (one line, UTF-8) to `path` atomically. An existing file is kept (False) unless `overwrite`."""
    if path.exists() and not overwrite:
        return False
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"), overwrite=True)
    return True


@dataclass
class FolderCaptions:
    """What `caption_folder` did: captions by image, files written, images kept or skipped (with why)."""

    root: Path
    captions: dict[Path, str] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)
    kept: list[CaptionTarget] = field(default_factory=list)
    skipped: list[CaptionTarget] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"captioned {len(self.captions)} image(s) in {self.root}; wrote {len(self.written)} caption file(s)"]
        if self.kept:
            lines.append(f"kept {len(self.kept)} existing caption(s) (--overwrite replaces them)")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} image(s): {self.skipped[0].note}")
        lines += [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)


def caption_options(folder: Path, *, recursive: bool = False, extension: str = ".txt") -> DatasetOptions:
    """Dataset options that list every image of `folder` (no bucket minimum: small images get captions too)."""
    others = tuple(e for e in DatasetOptions.__dataclass_fields__["caption_extensions"].default if e != extension)
    return DatasetOptions(Path(folder), recursive=recursive, caption_extensions=(extension, *others),
                          enable_bucket=False)


def caption_folder(folder: Path, model: Path, *, style: str = "sentence", trigger_word: str = "",
                   overwrite: bool = False, recursive: bool = False, extension: str = ".txt",
                   batch_size: int = BATCH_SIZE, device: str | None = None, prompt: str | None = None,
                   max_new_tokens: int = MAX_NEW_TOKENS, progress: Callable[[int, int], None] | None = None,
                   loader: Callable[..., Captioner] = load_captioner) -> FolderCaptions:
    """Caption the images of `folder` that have none (all with `overwrite`) with the model in `model`, writing each
    sidecar as soon as its batch is done. The model is loaded only when there is something to caption, and released
    afterwards, also on error or Ctrl-C."""
    check_style(style)
    check_captioner_dir(model)  # a mistyped model path is an error even when every image has a caption already
    options = caption_options(folder, recursive=recursive, extension=extension)
    scan = scan_dataset(options)
    if scan.fatal_problems and not scan.records:
        scan.raise_for_fatal()
    usable = {r.path for r in scan.records}
    unusable = [p for p in scan.problems  # images that cannot be read get no caption: say so (not missing captions)
                if p.fatal or (p.path.suffix.lower() in IMAGE_EXTENSIONS and p.path not in usable)]
    result = FolderCaptions(scan.root, problems=[str(p) for p in unusable])
    targets = plan_targets(scan, options)
    todo = [t for t in targets if t.wanted(overwrite)]
    result.kept = [t for t in targets if t.sidecar is not None and not t.wanted(overwrite)]
    result.skipped = [t for t in targets if t.sidecar is None]
    if not todo:
        return result
    sidecars = {t.image: t.sidecar for t in todo}

    def write(paths: list[Path], captions: list[str]) -> None:
        for path, text in zip(paths, captions, strict=True):
            result.captions[path] = text
            if write_caption(sidecars[path], text, overwrite=overwrite):  # type: ignore[arg-type]
                result.written.append(sidecars[path])  # type: ignore[arg-type]

    with loader(model, device=device) as captioner:
        caption_images(captioner, [t.image for t in todo], options, style=style, trigger_word=trigger_word,
                       batch_size=batch_size, prompt=prompt, max_new_tokens=max_new_tokens, progress=progress,
                       on_batch=write)
    return result

