"""The DATASET value that flows between LoRA Loop nodes, the Caption node's editing rules, LoadDataset's IMAGE batch
for captioner nodes, and the local captioning models (`models/captioners`) the Caption node can run itself.

A `ComfyDataset` is a description, not loaded data: a folder (kept by its relative name, so workflows stay shareable),
the caption-source settings, optional caption overrides made by the Caption node, and the trigger word. The engine's
scanner reads it when the summary or the training run needs it, so what the summary shows is what training uses.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..trainer.batches import dataset_options
from ..trainer.captioner import check_style, find_captioners, is_captioner_dir
from ..trainer.config import TrainConfig, field_help
from ..trainer.data import DatasetReport, TrainDataset, check_dataset, format_report, load_rgb, scan_dataset
from ..trainer.data.captions import contains_trigger
from ..trainer.data.sources import DatasetScan, ImageRecord
from ..trainer.errors import ConfigError
from ..trainer.lorafile import atomic_write

CAPTION_SOURCES = ("existing", "strings", "none")
# A local captioning model is a further `source` option: "captioner: <folder under models/captioners>".
CAPTIONER_PREFIX = "captioner: "
CAPTIONERS_FOLDER = "captioners"  # folder_paths name; extra_model_paths.yaml may add roots under this key
# LoadDataset's IMAGE output: every image fitted inside PREVIEW_SIZE² keeping its aspect ratio (scaled up or down)
# and centred on black (letterboxed), so images of any size make one batch and nothing is cropped away from a
# captioner's view.
PREVIEW_SIZE = 512
# LoadDataset runs before the config (and the model, whose size resolution 0 follows) is known: its check uses the
# smallest sizes any run allows, so it refuses no image a run could train on, and its summary shows no buckets, which
# would be at a resolution the run may not use. TrainLoRA checks again and prints its buckets with the run's settings.
SUMMARY_CONFIG = TrainConfig(**{k: field_help()[k]["min"] for k in ("resolution", "min_bucket_reso",
                                                                    "bucket_reso_steps")})
BUCKETS_LATER = ("buckets: decided when TrainLoRA runs, from LoRATrainConfig's resolution (0 = the model's native "
                 "size) and bucket settings; TrainLoRA and MemoryPlan show them")
SIZES_SHOWN = 5  # most common image sizes listed in the summary
CAPTION_SOURCE_HELP = ("existing: the dataset's own captions (metadata.csv/.jsonl, then sidecar files); strings: the "
                       "`captions` input, one per image in file-name order (LoadDataset's IMAGE order; a single string "
                       "with exactly one line per image is split into lines, any other single string is used for "
                       "every image); none: start from empty captions (trigger word, prefix and suffix only); "
                       f"{CAPTIONER_PREFIX}<name>: caption every image with that local model (a transformers "
                       f"BLIP or vision-language model folder under models/{CAPTIONERS_FOLDER}), loaded for this "
                       "node only and released afterwards")


@dataclass(frozen=True)
class ComfyDataset:
    """A training folder and how to caption it.

    Args:
        name: the folder as the user gave it, relative to its root (shown in metadata; no machine path).
        root: the resolved folder.
        recursive, caption_extension, metadata_path: engine dataset options.
        trigger_word: written into captions and the LoRA's metadata/JSON sidecar.
        captions: overrides from the Caption node, keyed by image path relative to `root` (posix), or None.
    """

    name: str
    root: Path
    recursive: bool = False
    caption_extension: str = ".txt"
    metadata_path: Path | None = None
    trigger_word: str = ""
    captions: dict[str, str] | None = field(default=None, compare=False)

    def config_for(self, config: TrainConfig | None = None) -> TrainConfig:
        """`config` (or the defaults) pointed at this dataset."""
        return replace(config or SUMMARY_CONFIG, train_data_dir=str(self.root), recursive=self.recursive,
                       caption_extension=self.caption_extension,
                       metadata_path=str(self.metadata_path) if self.metadata_path else None,
                       trigger_word=self.trigger_word)

    def key(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def scan(self, config: TrainConfig | None = None) -> DatasetScan:
        """The engine's scan with the Caption node's overrides applied."""
        scan = scan_dataset(dataset_options(self.config_for(config)))
        self._apply_captions(scan)
        return scan

    def _apply_captions(self, scan: DatasetScan) -> None:
        for record in scan.records if self.captions is not None else ():
            text = self.captions.get(self.key(record.path))  # type: ignore[union-attr]
            if text is not None:
                record.caption, record.caption_source = text, "Caption node"

    def build(self, config: TrainConfig) -> TrainDataset:
        cfg = self.config_for(config)
        return TrainDataset(self.scan(cfg), dataset_options(cfg), seed=cfg.seed)

    def report(self, config: TrainConfig | None = None) -> DatasetReport:
        """The dataset check (one scan of the folder), with the Caption node's overrides applied."""
        report = check_dataset(dataset_options(self.config_for(config)))
        if self.captions is not None:
            self._apply_captions(report.scan)
            captioned = sum(1 for r in report.scan.records if r.caption)
            total = len(report.scan.records)
            report.caption_coverage = 100.0 * captioned / total if total else 0.0
        return report

    def summary(self, report: DatasetReport | None = None) -> str:
        """The report as text, with the folder shown by its relative name (no machine path), the image sizes instead
        of buckets (see SUMMARY_CONFIG)."""
        report = report or self.report()
        lines = format_report(replace(report, bucket_counts={})).replace(str(self.root), self.name).splitlines()
        head = lines.index("") if "" in lines else len(lines)  # the end of the dataset's overview
        sizes = Counter(f"{r.width}x{r.height}" for r in report.scan.records).most_common()
        shown = ", ".join(f"{size} ({n})" for size, n in sizes[:SIZES_SHOWN])
        more = f", {len(sizes) - SIZES_SHOWN} more" if len(sizes) > SIZES_SHOWN else ""
        extra = ([f"  image sizes: {shown}{more}"] if sizes else []) + [f"  {BUCKETS_LATER}"]
        return "\n".join(lines[:head] + extra + lines[head:])


def edit_caption(text: str, *, trigger_word: str = "", prefix: str = "", suffix: str = "", find: str = "",
                 replace_with: str = "") -> str:
    """find→replace, then prefix/suffix joined with ', ', then the trigger word first unless already present."""
    if find:
        text = text.replace(find, replace_with)
    parts = [p.strip() for p in (prefix, text, suffix) if p and p.strip()]
    text = ", ".join(parts)
    if trigger_word and not contains_trigger(text, trigger_word):
        text = f"{trigger_word}, {text}" if text else trigger_word
    return text


def strings_for_images(strings: list[str] | None, count: int, name: str) -> list[str]:
    """One caption per image from the `captions` input: a list of `count` strings as given; a single string holding
    exactly `count` lines (a captioner node that joined its answers) split into them; any other single string used
    for every image. Anything else is an error naming both counts. Line breaks inside a caption become spaces: a
    caption file is one line (only its first line is read back)."""
    given = [s for s in (strings or []) if s is not None]
    if len(given) == 1 and count > 1:
        lines = [line.strip() for line in str(given[0]).splitlines() if line.strip()]
        given = lines if len(lines) == count else given * count
    if len(given) != count:
        msg = (f"the captions input has {len(given)} strings but the dataset {name!r} has {count} images; give one "
               "string per image, in LoadDataset's image order (file-name order), or a single string for all")
        raise ConfigError(msg, key="captions", value=len(given))
    return [" ".join(str(s).split()) for s in given]


def caption_dataset(dataset: ComfyDataset, *, source: str, strings: list[str] | None = None, trigger_word: str = "",
                    prefix: str = "", suffix: str = "", find: str = "", replace_with: str = "",
                    write_sidecars: bool = False, overwrite: bool = False,
                    style: str = "sentence") -> tuple[ComfyDataset, list[str]]:
    """Caption every image of `dataset`; returns the new DATASET and the captions in file-name order."""
    if source not in CAPTION_SOURCES and not source.startswith(CAPTIONER_PREFIX):
        allowed = [*CAPTION_SOURCES, f"{CAPTIONER_PREFIX}<model>"]
        raise ConfigError(f"caption source must be one of {allowed} (got {source!r})", key="source",
                          value=source, allowed=allowed)
    records = dataset.scan().records
    if source == "strings":
        base = strings_for_images(strings, len(records), dataset.name)
    elif source.startswith(CAPTIONER_PREFIX):
        base = caption_with_model(dataset, records, source.removeprefix(CAPTIONER_PREFIX), check_style(style))
    elif source == "none":
        base = [""] * len(records)
    else:
        base = [r.caption or "" for r in records]
    captions = [edit_caption(b, trigger_word=trigger_word.strip(), prefix=prefix, suffix=suffix, find=find,
                             replace_with=replace_with) for b in base]
    if write_sidecars:
        existing = [r.path.with_suffix(dataset.caption_extension) for r in records]
        existing = [p for p in existing if p.exists()]
        if existing and not overwrite:
            shown = ", ".join(p.name for p in existing[:3])
            msg = (f"{len(existing)} caption file(s) already exist in {dataset.name!r} (e.g. {shown}); "
                   "turn on overwrite_sidecars to replace them")
            raise ConfigError(msg, key="overwrite_sidecars", value=False)
        for record, text in zip(records, captions, strict=True):
            target = record.path.with_suffix(dataset.caption_extension)
            atomic_write(target, lambda tmp, t=text: tmp.write_text(t + "\n", encoding="utf-8"), overwrite=overwrite)
    overrides = {dataset.key(r.path): c for r, c in zip(records, captions, strict=True)}
    trigger = trigger_word.strip() or dataset.trigger_word
    return replace(dataset, captions=overrides, trigger_word=trigger), captions


# -- LoadDataset's IMAGE output ---------------------------------------------------------------------------------------
def preview_batch(dataset: ComfyDataset, records: list[ImageRecord], size: int = PREVIEW_SIZE) -> Any:
    """The images as one ComfyUI IMAGE batch, [N, size, size, 3] float32 in 0..1, in `records` (file-name) order:
    each decoded as training decodes it (EXIF orientation, transparency on the background colour), fitted inside
    size² with its aspect ratio kept, and centred on black."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    options = dataset_options(dataset.config_for())
    batch = np.zeros((len(records), size, size, 3), dtype=np.float32)
    for i, record in enumerate(records):
        image = ImageOps.contain(load_rgb(record.path, options, min_size=(size, size)), (size, size),
                                 Image.Resampling.LANCZOS)
        top, left = (size - image.height) // 2, (size - image.width) // 2
        batch[i, top : top + image.height, left : left + image.width] = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(batch)


# -- local captioning models ------------------------------------------------------------------------------------------
def _folder_paths() -> Any:
    import folder_paths

    return folder_paths


def register_captioners_folder() -> None:
    """Register `models/captioners` with ComfyUI's folder_paths (kept beside any roots extra_model_paths.yaml gave
    under the same key). Safe to call again; does nothing outside ComfyUI."""
    try:
        fp = _folder_paths()
    except ImportError:
        return
    if getattr(fp, "models_dir", None):
        fp.add_model_folder_path(CAPTIONERS_FOLDER, str(Path(fp.models_dir) / CAPTIONERS_FOLDER))


def captioner_roots() -> list[Path]:
    register_captioners_folder()
    return [Path(p) for p in _folder_paths().get_folder_paths(CAPTIONERS_FOLDER)]


def captioner_names() -> list[str]:
    """Model folders under every captioners root (relative names, as the Caption node lists them); empty outside
    ComfyUI (schemas are also built there, e.g. in tests)."""
    try:
        roots = captioner_roots()
    except (ImportError, KeyError):
        return []
    names: list[str] = []
    for root in roots:
        names += [n for n in find_captioners(root) if n not in names]
    return names


def find_captioner(name: str) -> Path:
    """The model folder called `name` under the first captioners root that has it."""
    from .paths import resolve_under

    roots = captioner_roots()
    for root in roots:
        folder = resolve_under(root, name, "captioner")
        if is_captioner_dir(folder):
            return folder
    searched = ", ".join(str(r) for r in roots)
    msg = (f"no captioner model {name!r} (a folder with config.json) in {searched}; put a transformers "
           "image-to-text model folder there, or pick another source")
    raise ConfigError(msg, key="source", value=name)


def caption_with_model(dataset: ComfyDataset, records: list[ImageRecord], name: str, style: str) -> list[str]:
    """Raw captions of `records` (in order) from the local model `name`, on ComfyUI's device. The model is loaded
    for this call only: room is made for it first, the progress bar and Cancel work per batch, and it is released
    (off the GPU, references dropped, `soft_empty_cache`) whatever happens."""
    import comfy.model_management as mm
    import comfy.utils

    from ..trainer.captioner import caption_images, load_captioner, weights_bytes

    path = find_captioner(name)
    device = mm.get_torch_device()
    if device.type != "cpu":  # unload what ComfyUI keeps loaded, as far as needed; its models come back on demand
        mm.free_memory(int(weights_bytes(path) * 1.3), device)
    bar = comfy.utils.ProgressBar(len(records))
    with load_captioner(path, device=device, empty_cache=mm.soft_empty_cache) as captioner:
        return caption_images(captioner, [r.path for r in records], dataset_options(dataset.config_for()),
                              style=style, progress=lambda done, total: bar.update_absolute(done, total),
                              check_stop=mm.throw_exception_if_processing_interrupted)


register_captioners_folder()
