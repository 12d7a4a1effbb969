"""The DATASET value that flows between LoRA Loop nodes, and the Caption node's editing rules.

A `ComfyDataset` is a description, not loaded data: a folder (kept by its relative name, so workflows stay shareable),
the caption-source settings, optional caption overrides made by the Caption node, and the trigger word. The engine's
scanner reads it when the summary or the training run needs it, so what the summary shows is what training uses.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..trainer.batches import dataset_options
from ..trainer.config import TrainConfig, field_help
from ..trainer.data import DatasetReport, TrainDataset, check_dataset, format_report, scan_dataset
from ..trainer.data.captions import contains_trigger
from ..trainer.data.sources import DatasetScan
from ..trainer.errors import ConfigError
from ..trainer.lorafile import atomic_write

CAPTION_SOURCES = ("existing", "strings", "none")
# LoadDataset runs before the config (and the model, whose size resolution 0 follows) is known: its check uses the
# smallest sizes any run allows, so it refuses no image a run could train on, and its summary shows no buckets, which
# would be at a resolution the run may not use. TrainLoRA checks again and prints its buckets with the run's settings.
SUMMARY_CONFIG = TrainConfig(**{k: field_help()[k]["min"] for k in ("resolution", "min_bucket_reso",
                                                                    "bucket_reso_steps")})
BUCKETS_LATER = ("buckets: decided when TrainLoRA runs, from LoRATrainConfig's resolution (0 = the model's native "
                 "size) and bucket settings; TrainLoRA and MemoryPlan show them")
SIZES_SHOWN = 5  # most common image sizes listed in the summary
CAPTION_SOURCE_HELP = ("existing: the dataset's own captions (metadata.csv/.jsonl, then sidecar files); strings: the "
                       "`captions` input, one per image in file-name order (one string is used for every image); none: "
                       "start from empty captions (trigger word, prefix and suffix only)")


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


def caption_dataset(dataset: ComfyDataset, *, source: str, strings: list[str] | None = None, trigger_word: str = "",
                    prefix: str = "", suffix: str = "", find: str = "", replace_with: str = "",
                    write_sidecars: bool = False, overwrite: bool = False) -> tuple[ComfyDataset, list[str]]:
    """Caption every image of `dataset`; returns the new DATASET and the captions in file-name order."""
    if source not in CAPTION_SOURCES:
        raise ConfigError(f"caption source must be one of {list(CAPTION_SOURCES)} (got {source!r})", key="source",
                          value=source, allowed=CAPTION_SOURCES)
    records = dataset.scan().records
    if source == "strings":
        given = [s for s in (strings or []) if s is not None]
        if len(given) == 1 and len(records) > 1:
            given = given * len(records)
        if len(given) != len(records):
            msg = (f"the captions input has {len(given)} strings but the dataset {dataset.name!r} has {len(records)} "
                   "images; give one string per image (in file-name order) or a single string for all")
            raise ConfigError(msg, key="captions", value=len(given))
        base = given
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
