"""Finding a dataset's images and their captions: `scan_dataset(options) -> DatasetScan`.

Layout. Images (.jpg .jpeg .png .webp .bmp, any case) directly in `train_data_dir` are used once per epoch (N times
when `train_data_dir` is itself named `N_name`). Sub-folders named like kohya's DreamBooth folders, `N_name`
(`10_mychar/`), are always scanned; their images repeat N times per epoch and count under the group `N_name` in
`ss_tag_frequency`. Other sub-folders are scanned only with `recursive=True` (at any depth; an image then takes
repeats and group from its nearest `N_name` ancestor, else those of `train_data_dir`). Names starting with "." are
ignored (`.ipynb_checkpoints`, macOS `._a.jpg` files). A folder reached twice through symlinks is scanned once, so
symlink loops cannot hang the scan.

Caption precedence: ONE rule, applied per image. The first of these sources that has an entry for the image gives its
caption; the sources below it are not read for that image:
  1. `options.metadata_path` (a `filename,prompt` CSV or a `.jsonl`), names relative to `train_data_dir`, or to the
     metadata file's own folder when they are not found there;
  2. a `metadata.csv`, then a `metadata.jsonl`, inside the scanned folders, names relative to that file's folder;
     when several such files list the same image, the one in the deepest folder wins;
  3. sidecar files next to the image, in `caption_extensions` order (default `<stem>.txt`, then `<stem>.caption`).
An entry with an empty caption is a missing caption (it does not fall through to lower sources); what happens then
is `options.missing_caption`.

Everything wrong is collected as a `Problem` (file, reason, fatal or not) rather than raised, so `check-dataset` can
list all of them at once; `DatasetScan.raise_for_fatal()` turns fatal ones into a `DatasetError`. Image sizes come
from the file headers only: the scan decodes no pixels.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DatasetError
from .images import IMAGE_EXTENSIONS, is_image_name, read_header
from .metadata import CSV_NAME, JSONL_NAME, CaptionEntry, MetadataFile, normalise, read_metadata
from .options import DatasetOptions
from .problems import BadFileError, Problem, decode_utf8

log = logging.getLogger(__name__)

_REPEAT_DIR = re.compile(r"^(\d+)_(.+)$")


@dataclass
class ImageRecord:
    """One usable image.

    Args:
        path: the image file.
        caption: its raw caption, or None when it has none (then training uses the trigger word or "").
        repeats: times per epoch (kohya `N_name` folders).
        group: the kohya image-folder name it belongs to (`ss_tag_frequency` key).
        width, height: size after EXIF orientation, from the header.
        caption_source: where the caption came from (`metadata.csv line 3`, `a.txt`), None without one.
    """

    path: Path
    caption: str | None
    repeats: int
    group: str
    width: int
    height: int
    caption_source: str | None = None


@dataclass
class DatasetScan:
    """Result of `scan_dataset`: the usable images and every problem found.

    Args:
        root: `train_data_dir`, absolute.
        records: usable images, sorted by path.
        problems: every finding, in discovery order.
        images_found: image files seen, usable or not.
        shadowed_captions: images whose sidecar caption file was ignored because a metadata file lists them.
        ignored_dirs: sub-folders not scanned (not `N_name` and `recursive` off).
        metadata_files: metadata files read, in precedence order.
    """

    root: Path
    records: list[ImageRecord] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    images_found: int = 0
    shadowed_captions: int = 0
    ignored_dirs: list[Path] = field(default_factory=list)
    metadata_files: list[Path] = field(default_factory=list)

    @property
    def fatal_problems(self) -> list[Problem]:
        return [p for p in self.problems if p.fatal]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if not p.fatal]

    def raise_for_fatal(self) -> None:
        """Raise `DatasetError` listing every fatal problem (the first one's path as `path`); no-op without any."""
        fatal = self.fatal_problems
        if not fatal:
            return
        lines = "\n".join(f"  - {p}" for p in fatal)
        raise DatasetError(f"the dataset in {self.root} cannot be used ({len(fatal)} problem(s)):\n{lines}",
                           path=fatal[0].path)

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """kohya's `ss_dataset_dirs`: {group: {"n_repeats": N, "img_count": images}}."""
        dirs: dict[str, dict[str, int]] = {}
        for record in self.records:
            entry = dirs.setdefault(record.group, {"n_repeats": record.repeats, "img_count": 0})
            entry["img_count"] += 1
        return dirs


@dataclass
class _Folder:
    path: Path
    repeats: int
    group: str
    depth: int
    files: dict[str, Path] = field(default_factory=dict)


def scan_dataset(options: DatasetOptions) -> DatasetScan:
    """Find every image and caption under `options.train_data_dir`; never raises for bad content (see `Problem`)."""
    root = normalise(options.train_data_dir)
    scan = DatasetScan(root=root)
    if not root.exists():
        scan.problems.append(Problem(root, "train_data_dir does not exist", True))
        return scan
    if not root.is_dir():
        scan.problems.append(Problem(root, "train_data_dir is a file, not a folder", True))
        return scan

    folders, entries_in_root = _walk(root, options.recursive, scan)
    found = [(path, folder) for folder in folders for name, path in folder.files.items() if is_image_name(name)]
    images = sorted(found, key=lambda item: str(item[0]))
    images = _drop_duplicate_files(images, scan)
    scan.images_found = len(images)
    if entries_in_root == 0:
        scan.problems.append(Problem(root, "train_data_dir is empty; put the training images (and captions) in it",
                                     True))
        return scan
    if not images:
        scan.problems.append(Problem(root, _no_images_reason(scan), True))
        return scan

    metadata = _read_metadata_files(root, folders, options, scan)
    image_keys = {path for path, _ in images}
    for meta in metadata:
        _report_unmatched_entries(meta, image_keys, scan)

    sidecar_users: dict[Path, list[Path]] = defaultdict(list)
    for path, folder in images:
        record = _make_record(path, folder, options, metadata, sidecar_users, scan)
        if record is not None:
            scan.records.append(record)
    _report_orphan_captions(folders, images, options, scan)
    for sidecar, users in sidecar_users.items():
        if len(users) > 1:
            names = ", ".join(p.name for p in users)
            scan.problems.append(Problem(sidecar, f"is the caption of several images ({names}); each of them uses it. "
                                                  "Rename one image and give it its own caption file if they differ"))
    if not scan.records and not scan.fatal_problems:
        scan.problems.append(Problem(root, f"none of the {len(images)} image(s) can be used; see the problems above",
                                     True))
    if scan.shadowed_captions:
        log.info("%d sidecar caption file(s) ignored: a metadata file lists those images and takes precedence",
                 scan.shadowed_captions)
    log.info("scanned %s: %d usable image(s) of %d, %d problem(s) (%d fatal)", root, len(scan.records),
             scan.images_found, len(scan.problems), len(scan.fatal_problems))
    for problem in scan.problems:
        log.debug("dataset problem: %s", problem)
    return scan


def read_caption_file(path: Path) -> tuple[str, int]:
    """(caption, number of further non-empty lines) of a sidecar file: the first non-empty line, stripped, as kohya.

    Raises:
        BadFileError: unreadable or not UTF-8 (naming the byte offset).
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadFileError(path, f"cannot be read ({exc.strerror or exc})") from exc
    lines = [line.strip() for line in decode_utf8(data, path).splitlines()]
    lines = [line for line in lines if line]
    return (lines[0], len(lines) - 1) if lines else ("", 0)


def _walk(root: Path, recursive: bool, scan: DatasetScan) -> tuple[list[_Folder], int]:
    """The folders to take images from (with their files), and how many visible entries `root` holds."""
    folders: list[_Folder] = []
    entries_in_root = 0
    visited = {os.path.realpath(root)}
    # train_data_dir may itself be an N_name folder (pointing straight at `10_mychar/` means 10 repeats).
    match = _REPEAT_DIR.match(root.name)
    repeats = int(match.group(1)) if match and int(match.group(1)) > 0 else 1
    stack = [_Folder(root, repeats, root.name, 0)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder.path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            scan.problems.append(Problem(folder.path, f"folder cannot be listed ({exc.strerror or exc})",
                                         folder.depth == 0))
            continue
        folders.append(folder)
        children: list[_Folder] = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if folder.depth == 0:
                entries_in_root += 1
            path = folder.path / entry.name
            try:
                is_dir = entry.is_dir()  # follows symlinks
                is_file = not is_dir and entry.is_file()
            except OSError as exc:
                scan.problems.append(Problem(path, f"cannot be followed ({exc.strerror or exc}; a symlink loop?); "
                                                   "skipped"))
                continue
            if is_file:
                folder.files[entry.name] = path
            elif is_dir:
                child = _child_folder(folder, path, recursive, visited, scan)
                if child is not None:
                    children.append(child)
            elif entry.is_symlink() and is_image_name(entry.name):
                scan.problems.append(Problem(path, "broken symbolic link (its target does not exist); skipped"))
        stack.extend(reversed(children))
    return folders, entries_in_root


def _child_folder(parent: _Folder, path: Path, recursive: bool, visited: set[str], scan: DatasetScan) -> _Folder | None:
    match = _REPEAT_DIR.match(path.name)
    if match is None and not recursive:
        if parent.depth == 0:
            scan.ignored_dirs.append(path)
        return None
    if match is not None and parent.depth > 0 and not recursive:
        return None
    repeats, group = parent.repeats, parent.group
    if match is not None:
        repeats, group = int(match.group(1)), path.name
        if repeats < 1:
            scan.problems.append(Problem(path, f"folder name asks for {repeats} repeats; its images are skipped "
                                               f"(name it 1_{match.group(2)} to train them once per epoch)"))
            return None
    real = os.path.realpath(path)
    if real in visited:
        parent_real = os.path.realpath(parent.path)
        if parent_real == real or parent_real.startswith(real.rstrip(os.sep) + os.sep):
            reason = f"symlink loop: leads back to {real}, a folder above it; not followed"
        else:
            reason = f"leads to {real}, which is already scanned; skipped so its images are not used twice"
        scan.problems.append(Problem(path, reason))
        return None
    visited.add(real)
    return _Folder(path, repeats, group, parent.depth + 1)


def _drop_duplicate_files(images: list[tuple[Path, _Folder]], scan: DatasetScan) -> list[tuple[Path, _Folder]]:
    """Keep one of several paths (symlinks) to the same file, so it is not trained twice by accident."""
    seen: dict[str, Path] = {}
    kept = []
    for path, folder in images:
        real = os.path.realpath(path)
        if real in seen:
            scan.problems.append(Problem(path, f"is the same file as {seen[real]} (a symlink); skipped"))
            continue
        seen[real] = path
        kept.append((path, folder))
    return kept


def _report_orphan_captions(folders: list[_Folder], images: list[tuple[Path, _Folder]], options: DatasetOptions,
                            scan: DatasetScan) -> None:
    """Caption files no image claims: usually a renamed or deleted image, or a typo in a name."""
    stems = {(folder.path, path.stem) for path, folder in images}
    for folder in folders:
        for name, path in folder.files.items():
            ext = next((e for e in options.caption_extensions if name.endswith(e)), None)
            if ext is not None and (folder.path, name[: -len(ext)]) not in stems:
                scan.problems.append(Problem(path, f"no image named {name[: -len(ext)]}.* next to it; file ignored"))


def _no_images_reason(scan: DatasetScan) -> str:
    reason = f"no images ({' '.join(IMAGE_EXTENSIONS)}) found"
    if scan.ignored_dirs:
        names = ", ".join(p.name for p in scan.ignored_dirs[:5])
        reason += (f"; sub-folders not named like N_name ({names}) are only searched with recursive = true, or "
                   "rename them e.g. 10_mychar to repeat their images 10 times")
    return reason


def _read_metadata_files(root: Path, folders: list[_Folder], options: DatasetOptions,
                         scan: DatasetScan) -> list[MetadataFile]:
    """Every metadata file that applies, highest precedence first."""
    found: list[MetadataFile] = []
    if options.metadata_path is not None:
        explicit = normalise(options.metadata_path)
        if not explicit.is_file():
            scan.problems.append(Problem(explicit, "metadata_path does not exist (or is not a file)", True))
        else:
            found.append(read_metadata(explicit, [root, explicit.parent]))
    # Deepest folder first: a file closer to the images is the more specific one.
    for folder in sorted(folders, key=lambda f: -f.depth):
        names = [n for n in (CSV_NAME, JSONL_NAME) if n in folder.files]
        if len(names) == 2:
            scan.problems.append(Problem(folder.path, f"has both {CSV_NAME} and {JSONL_NAME}; for images listed in "
                                                      f"both, {CSV_NAME} wins"))
        for name in names:
            path = normalise(folder.files[name])
            if options.metadata_path is not None and path == normalise(options.metadata_path):
                continue
            found.append(read_metadata(path, [folder.path]))
    for meta in found:
        scan.problems.extend(meta.problems)
        scan.metadata_files.append(meta.path)
    return found


def _report_unmatched_entries(meta: MetadataFile, image_keys: set[Path], scan: DatasetScan) -> None:
    for key, entry in meta.entries.items():
        if key in image_keys:
            continue
        if key.exists():
            why = ("exists but is not one of the scanned images (not an image extension, hidden, or in a sub-folder "
                   "that is not scanned: set recursive = true)")
        else:
            why = f"does not exist (looked for {key})"
        scan.problems.append(Problem(meta.path, f"line {entry.line} names {entry.name!r}, which {why}; row ignored"))


def _make_record(path: Path, folder: _Folder, options: DatasetOptions, metadata: list[MetadataFile],
                 sidecar_users: dict[Path, list[Path]], scan: DatasetScan) -> ImageRecord | None:
    try:
        header = read_header(path, options)
    except BadFileError as exc:
        scan.problems.append(exc.as_problem())
        return None
    small = min(header.width, header.height)
    if small <= 1:
        scan.problems.append(Problem(path, f"is {header.width}x{header.height}: a 1-pixel image (placeholder or broken "
                                           "export?); skipped"))
        return None
    if options.enable_bucket and small < options.min_bucket_reso:  # without buckets, images are resized to fit
        scan.problems.append(Problem(path, f"is {header.width}x{header.height}, smaller than the smallest bucket side "
                                           f"(min_bucket_reso = {options.min_bucket_reso}); skipped. Use a larger "
                                           "image or lower min_bucket_reso"))
        return None

    caption: str | None = None
    source: str | None = None
    missing_why = ""
    entry = _metadata_entry(path, metadata)
    sidecars = [folder.files[path.stem + ext] for ext in options.caption_extensions if path.stem + ext in folder.files]
    if entry is not None:
        caption, source = entry.caption, entry.source
        if sidecars:
            scan.shadowed_captions += 1
        missing_why = f"its entry at {entry.metadata} line {entry.line} has an empty prompt"
    elif sidecars:
        sidecar = sidecars[0]
        sidecar_users[sidecar].append(path)
        try:
            caption, extra = read_caption_file(sidecar)
        except BadFileError as exc:
            # Guessing another encoding could train on mojibake; the user must fix the file.
            scan.problems.append(exc.as_problem(fatal=True))
            return None
        source = sidecar.name
        missing_why = f"its caption file {sidecar.name} is empty"
        if extra:
            scan.problems.append(Problem(sidecar, f"has {extra + 1} non-empty lines; only the first is used (as kohya "
                                                  "does). Join them with commas to use all"))
    else:
        looked = ", ".join(path.stem + ext for ext in options.caption_extensions)
        missing_why = f"no caption found (no metadata entry, no {looked})"

    if not caption:
        caption = None
        if options.missing_caption == "error":
            scan.problems.append(Problem(path, f"{missing_why} and missing_caption = 'error'", True))
            return None
        if options.missing_caption == "warn_empty":
            fallback = f"the trigger word {options.trigger_word!r}" if options.trigger_word else "an empty caption"
            scan.problems.append(Problem(path, f"{missing_why}; training it on {fallback}"))
    return ImageRecord(path, caption, folder.repeats, folder.group, header.width, header.height,
                       source if caption else None)


def _metadata_entry(path: Path, metadata: list[MetadataFile]) -> CaptionEntry | None:
    for meta in metadata:
        entry = meta.entries.get(path)
        if entry is not None:
            return entry
    return None
