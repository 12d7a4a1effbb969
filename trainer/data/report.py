"""`check_dataset`: everything a training run would find wrong with a dataset, found without training.

`loraloop check-dataset DIR [--metadata FILE]` is `format_report(check_dataset(options))`, exiting non-zero when
`report.will_fail`.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .buckets import Bucket, bucket_for, buckets_for_options, format_bucket_table
from .captions import top_tags
from .images import load_rgb
from .options import DatasetOptions
from .problems import BadFileError, Problem
from .sources import DatasetScan, scan_dataset

log = logging.getLogger(__name__)


@dataclass
class DatasetReport:
    """What `check_dataset` found.

    Args:
        scan: the full scan (records and problems).
        problems: every problem, fatal first.
        image_count: usable images.
        sample_count: samples per epoch (images × repeats).
        bucket_counts: {(width, height): samples per epoch}.
        caption_coverage: percentage of usable images that have a caption.
        top_tags: the 20 most frequent tags, (tag, images).
        will_fail: True when training would refuse this dataset.
    """

    options: DatasetOptions
    scan: DatasetScan
    problems: list[Problem] = field(default_factory=list)
    image_count: int = 0
    sample_count: int = 0
    bucket_counts: dict[Bucket, int] = field(default_factory=dict)
    caption_coverage: float = 0.0
    top_tags: list[tuple[str, int]] = field(default_factory=list)
    will_fail: bool = False

    @property
    def root(self) -> Path:
        return self.scan.root


def check_dataset(options: DatasetOptions, *, decode: bool = False) -> DatasetReport:
    """Scan the dataset as training would and summarise it.

    Args:
        decode: also decode every usable image (slow: catches corrupt pixel data the header checks cannot see).
    """
    scan = scan_dataset(options)
    if decode:
        usable = []
        for record in scan.records:
            try:
                load_rgb(record.path, options, min_size=(options.resolution, options.resolution))
            except BadFileError as exc:
                scan.problems.append(exc.as_problem(fatal=True))
            else:
                usable.append(record)
        scan.records = usable
    buckets = buckets_for_options(options)
    bucket_counts: Counter[Bucket] = Counter()
    for record in scan.records:
        bucket_counts[bucket_for(record.width, record.height, options, buckets)] += record.repeats
    captioned = sum(1 for r in scan.records if r.caption)
    problems = sorted(scan.problems, key=lambda p: not p.fatal)
    return DatasetReport(
        options=options,
        scan=scan,
        problems=problems,
        image_count=len(scan.records),
        sample_count=sum(r.repeats for r in scan.records),
        bucket_counts=dict(bucket_counts),
        caption_coverage=100.0 * captioned / len(scan.records) if scan.records else 0.0,
        top_tags=top_tags(scan.records, 20),
        will_fail=bool(scan.fatal_problems) or not scan.records,
    )


def format_report(report: DatasetReport) -> str:
    """The report as plain text for a terminal or a host's text widget."""
    scan = report.scan
    lines = [f"Dataset: {report.root}"]
    lines.append(f"  images: {report.image_count} usable of {scan.images_found} found; "
                 f"{report.sample_count} samples per epoch after repeats")
    dirs = scan.dataset_dirs()
    if dirs:
        groups = ", ".join(f"{name} ({d['img_count']} images x {d['n_repeats']})" for name, d in sorted(dirs.items()))
        lines.append(f"  folders: {groups}")
    captioned = sum(1 for r in scan.records if r.caption)
    lines.append(f"  captions: {captioned}/{report.image_count} images ({report.caption_coverage:.1f}%)")
    if scan.metadata_files:
        lines.append("  metadata files (highest precedence first): " + ", ".join(str(p) for p in scan.metadata_files))
    if scan.shadowed_captions:
        lines.append(f"  {scan.shadowed_captions} sidecar caption file(s) ignored: a metadata file takes precedence")
    if report.bucket_counts:
        lines.append("")
        lines.append("Buckets (samples per epoch):")
        lines += ["  " + line for line in format_bucket_table(report.bucket_counts).splitlines()]
    if report.top_tags:
        lines.append("")
        lines.append("Top tags: " + ", ".join(f"{tag} ({n})" for tag, n in report.top_tags))
    fatal = sum(1 for p in report.problems if p.fatal)
    if report.problems:
        lines.append("")
        lines.append(f"Problems: {fatal} error(s), {len(report.problems) - fatal} warning(s)")
        lines += [f"  {'ERROR' if p.fatal else 'warn '} {p}" for p in report.problems]
    lines.append("")
    if report.will_fail:
        lines.append("Result: training would FAIL on this dataset; fix the errors above.")
    else:
        lines.append("Result: OK" + (" (with warnings: skipped files are not trained on)" if report.problems else ""))
    return "\n".join(lines)
