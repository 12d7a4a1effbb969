"""Caption tools of the tab: preview an edit of every caption, and write sidecar files only when asked.

An edit is applied in a fixed order: find/replace (plain text or a regular expression), then prefix and suffix
(inserted verbatim: type the ", " you want), then, if asked, the trigger word as the first tag (skipped when the
caption already contains it; training adds it anyway, see `trainer.data.captions`). Images whose caption comes from a
metadata file (metadata.csv/.jsonl) are not written: a sidecar would be ignored there, so edit that file instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..trainer.data import DatasetOptions, scan_dataset
from ..trainer.data.captions import contains_trigger
from ..trainer.errors import ConfigError
from ..trainer.lorafile import atomic_write

PREVIEW_ROWS = 30


@dataclass(frozen=True)
class CaptionEdit:
    prefix: str = ""
    suffix: str = ""
    find: str = ""
    replace: str = ""
    regex: bool = False
    add_trigger: bool = False

    def apply(self, caption: str | None, trigger: str = "") -> str:
        text = caption or ""
        if self.find:
            if self.regex:
                try:
                    text = re.sub(self.find, self.replace, text)
                except re.error as err:
                    raise ConfigError(f"find: {self.find!r} is not a valid regular expression ({err})", key="find",
                                      value=self.find) from err
            else:
                text = text.replace(self.find, self.replace)
        text = f"{self.prefix}{text}{self.suffix}".strip(" ,")  # an empty caption leaves no dangling ", "
        if self.add_trigger and trigger and not contains_trigger(text, trigger):
            text = f"{trigger}, {text}" if text else trigger
        return text


@dataclass(frozen=True)
class CaptionChange:
    """One image: its caption now, after the edit, and whether (and where) a sidecar can be written."""

    image: Path
    before: str | None
    after: str
    sidecar: Path | None
    reason: str = ""  # why no sidecar is written

    @property
    def changed(self) -> bool:
        return (self.before or "") != self.after


def plan_captions(options: DatasetOptions, edit: CaptionEdit) -> list[CaptionChange]:
    """The edit applied to every usable image of the dataset (nothing is written)."""
    scan = scan_dataset(options)
    extension = options.caption_extensions[0]
    sidecar_names = set(options.caption_extensions)
    changes = []
    for record in scan.records:
        after = edit.apply(record.caption, options.trigger_word)
        source = record.caption_source
        from_sidecar = source is not None and any(source == record.path.stem + ext for ext in sidecar_names)
        if source is not None and not from_sidecar:
            changes.append(CaptionChange(record.path, record.caption, after, None,
                                         f"its caption comes from {source}; edit that file"))
        elif source is None and scan.metadata_files:
            changes.append(CaptionChange(record.path, record.caption, after, None,
                                         f"a metadata file ({scan.metadata_files[0].name}) is in use; edit it"))
        else:
            changes.append(CaptionChange(record.path, record.caption, after,
                                         record.path.with_name(record.path.stem + extension)))
    return changes


def preview_text(changes: list[CaptionChange], root: Path | None = None, limit: int = PREVIEW_ROWS) -> str:
    if not changes:
        return "No usable images found."
    changed = [c for c in changes if c.changed]
    lines = [f"{len(changed)} of {len(changes)} captions change; {sum(1 for c in changed if c.sidecar)} sidecar "
             "file(s) would be written."]
    for c in changed[:limit]:
        name = c.image.relative_to(root) if root and c.image.is_relative_to(root) else c.image.name
        lines.append(f"{name}:\n  before: {c.before or '(none)'}\n  after:  {c.after or '(empty)'}"
                     + (f"\n  not written: {c.reason}" if not c.sidecar else ""))
    if len(changed) > limit:
        lines.append(f"… and {len(changed) - limit} more")
    return "\n".join(lines)


def write_captions(changes: list[CaptionChange]) -> tuple[list[Path], list[CaptionChange]]:
    """Write the changed captions to their sidecars (atomically, UTF-8). Returns (written files, skipped changes)."""
    written, skipped = [], []
    for change in changes:
        if not change.changed:
            continue
        if change.sidecar is None:
            skipped.append(change)
            continue
        text = change.after + "\n"
        written.append(atomic_write(change.sidecar, lambda tmp, t=text: tmp.write_text(t, encoding="utf-8"),
                                    overwrite=True))
    return written, skipped
