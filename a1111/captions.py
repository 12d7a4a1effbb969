"""Caption tools of the tab: preview an edit of every caption, and write sidecar files only when asked.

An edit is applied in a fixed order: find/replace (plain text or a regular expression), then prefix and suffix
(inserted verbatim: type the ", " you want), then, if asked, the trigger word as the first tag (skipped when the
caption already contains it; training adds it anyway, see `trainer.data.captions`). Images whose caption comes from a
metadata file (metadata.csv/.jsonl) are not written: a sidecar would be ignored there, so edit that file instead.

Automatic captions come from the webui's own interrogators (`propose_captions`, given the interrogate call): the
proposals are shown as editable text, one `<image>: <caption>` line per image, and only `write_proposals` writes
them, after the user has read and edited them. Images that already have a caption are left out unless overwrite is
asked, and an existing file is never replaced without it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..trainer.captioner import CaptionTarget, format_caption, plan_targets, write_caption
from ..trainer.data import DatasetOptions, load_rgb, scan_dataset
from ..trainer.data.captions import contains_trigger
from ..trainer.errors import ConfigError

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
    """The edit applied to every usable image of the dataset (nothing is written). Which images get a sidecar is the
    engine's one rule (`captioner.plan_targets`): not those whose caption comes from a metadata file."""
    return [CaptionChange(t.image, t.record.caption, edit.apply(t.record.caption, options.trigger_word), t.sidecar,
                          t.note)
            for t in plan_targets(scan_dataset(options), options)]


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
        write_caption(change.sidecar, change.after, overwrite=True)
        written.append(change.sidecar)
    return written, skipped


# -- automatic captions from the webui's interrogators ----------------------------------------------------------------
# The "Caption with" choices: label → interrogator id (actions.py maps the id to the webui call).
INTERROGATORS = {"CLIP interrogator (BLIP sentence + CLIP terms)": "clip", "DeepBooru (danbooru tags)": "deepbooru"}
WEBUI_ERROR = "<error>"  # what InterrogateModels.interrogate appends instead of raising


@dataclass(frozen=True)
class Proposal:
    """A caption proposed for one image: `key` is the image's path relative to the dataset folder."""

    target: CaptionTarget
    key: str
    text: str


@dataclass
class ProposalRun:
    """What `propose_captions` did: the proposals in file-name order, and the images it left out (and why)."""

    root: Path
    proposals: list[Proposal] = field(default_factory=list)
    kept: list[CaptionTarget] = field(default_factory=list)
    skipped: list[CaptionTarget] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    stopped: bool = False

    def text(self) -> str:
        return "\n".join(f"{p.key}: {p.text}" for p in self.proposals)

    def status(self) -> str:
        lines = [f"{len(self.proposals)} caption(s) proposed below: read and edit them, then press Write (nothing "
                 "is written before)." if self.proposals else "No caption proposed."]
        if self.kept:
            lines.append(f"{len(self.kept)} image(s) already have a caption file and were left out (tick overwrite "
                         "to caption them again).")
        if self.skipped:
            lines.append(f"{len(self.skipped)} image(s) left out: {self.skipped[0].note}.")
        lines += self.failed
        if self.stopped:
            lines.append("Interrupted: the captions so far are shown.")
        return "\n".join(lines)


def dataset_targets(options: DatasetOptions) -> tuple[Path, list[CaptionTarget]]:
    """The dataset folder and every usable image with the sidecar its caption goes to (file-name order)."""
    scan = scan_dataset(options)
    scan.raise_for_fatal()
    return scan.root, plan_targets(scan, options)


def propose_captions(options: DatasetOptions, edit: CaptionEdit, interrogate: Callable[[Image.Image], str], *,
                     overwrite: bool = False, stopped: Callable[[], bool] = lambda: False) -> ProposalRun:
    """Interrogate every image that needs a caption (all writable ones with `overwrite`) and apply `edit` to the
    result. Nothing is written. An image the interrogator fails on is reported and left out; an exception (the
    interrogator missing, its model not loadable) stops the run with what was proposed so far."""
    root, targets = dataset_targets(options)
    run = ProposalRun(root, kept=[t for t in targets if t.sidecar is not None and not t.wanted(overwrite)],
                      skipped=[t for t in targets if t.sidecar is None])
    for target in (t for t in targets if t.wanted(overwrite)):
        if stopped():
            run.stopped = True
            break
        key = target.image.relative_to(root).as_posix()
        try:
            text = interrogate(load_rgb(target.image, options))
        except Exception as err:  # the webui's own call: anything may come out of it
            run.failed.append(f"ERROR: the interrogator failed on {key} ({type(err).__name__}: {err}); stopped.")
            break
        if WEBUI_ERROR in text:
            run.failed.append(f"The interrogator failed on {key} (see the webui console); it was left out.")
            continue
        run.proposals.append(Proposal(target, key, edit.apply(format_caption(text), options.trigger_word)))
    return run


def parse_proposals(text: str, root: Path, targets: list[CaptionTarget]) -> list[tuple[CaptionTarget, str]]:
    """The edited proposals: one `<image>: <caption>` line per image (blank lines ignored). A line naming no image of
    the dataset, or an image named twice, is an error naming the line."""
    by_key = {t.image.relative_to(root).as_posix(): t for t in targets}
    keys = sorted(by_key, key=len, reverse=True)  # "a b.png" before "b.png" when both could start a line
    out: list[tuple[CaptionTarget, str]] = []
    seen: dict[str, int] = {}
    for number, line in enumerate((text or "").splitlines(), start=1):
        if not line.strip():
            continue
        key = next((k for k in keys if line.strip().startswith(k + ":")), None)
        if key is None:
            head = line.strip()[:60]
            msg = (f"line {number} ({head!r}) names no image of {root}; keep each line as '<image>: <caption>' with "
                   "the image name the proposals showed")
            raise ConfigError(msg, key="captions", value=head)
        if key in seen:
            msg = f"{key} is listed twice (lines {seen[key]} and {number}); keep one line per image"
            raise ConfigError(msg, key="captions", value=key)
        seen[key] = number
        out.append((by_key[key], line.strip()[len(key) + 1 :].strip()))
    return out


def write_proposals(pairs: list[tuple[CaptionTarget, str]], *, overwrite: bool = False) -> tuple[list[Path], list[str]]:
    """Write each caption to its image's sidecar (atomically). Returns (files written, why others were not)."""
    written: list[Path] = []
    notes: list[str] = []
    for target, text in pairs:
        name = target.image.name
        if target.sidecar is None:
            notes.append(f"{name}: not written, {target.note}")
        elif not text:
            notes.append(f"{name}: empty caption, not written")
        elif write_caption(target.sidecar, " ".join(text.split()), overwrite=overwrite):
            written.append(target.sidecar)
        else:
            notes.append(f"{name}: {target.sidecar.name} exists and was kept (tick overwrite to replace it)")
    return written, notes
