"""Caption files that list many images: the origin article's `metadata.csv` and imagefolder's `metadata.jsonl`.

* CSV: a header row `filename,prompt` (aliases: `file_name`/`file`/`image` and `text`/`caption`), then one row per
  image.
  UTF-8 with or without BOM, CRLF or LF, prompts quoted or not. The article's own example has unquoted commas inside
  the prompt (`img_001.jpg,cyberpunk city at night, neon lights`), so when the prompt is the last column, extra cells
  are joined back into it.
* JSONL: one JSON object per line with `file_name` (or `filename`/`file`) and `text` (or `prompt`/`caption`).

Names are paths relative to a base folder (forward or back slashes). A reader never raises for bad content: it returns
what it could read plus `Problem`s naming the file and line. A file that cannot be read at all (not UTF-8, wrong CSV
header) yields one fatal problem and no entries.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .problems import BadFileError, Problem, decode_utf8

CSV_NAME = "metadata.csv"
JSONL_NAME = "metadata.jsonl"
FILENAME_KEYS = ("filename", "file_name", "file", "image")
CAPTION_KEYS = ("prompt", "text", "caption")
EXPECTED_CSV_HEADER = "filename,prompt"


@dataclass(frozen=True)
class CaptionEntry:
    """One image's caption from a metadata file; `line` is the 1-based line its row starts on."""

    caption: str
    metadata: Path
    line: int
    name: str

    @property
    def source(self) -> str:
        return f"{self.metadata.name} line {self.line}"


@dataclass
class MetadataFile:
    """What a metadata file says: captions keyed by the normalised absolute image path, and what was wrong with it."""

    path: Path
    entries: dict[Path, CaptionEntry] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


def normalise(path: Path) -> Path:
    """Absolute and lexically normalised (`a/./b/../c` → `a/c`), without resolving symlinks: how images are keyed."""
    return Path(os.path.normpath(Path(path).absolute()))


def read_metadata(path: Path, base_dirs: Sequence[Path]) -> MetadataFile:
    """Read a `.csv` or `.jsonl` metadata file; image names are looked up in `base_dirs`, first existing match wins."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_metadata_csv(path, base_dirs)
    if suffix == ".jsonl":
        return read_metadata_jsonl(path, base_dirs)
    result = MetadataFile(path)
    result.problems.append(Problem(path, f"unsupported metadata format {suffix or '(no extension)'!r}; expected a .csv "
                                         f"with header {EXPECTED_CSV_HEADER!r} or an imagefolder-style .jsonl", True))
    return result


def read_metadata_csv(path: Path, base_dirs: Sequence[Path]) -> MetadataFile:
    """Read a `filename,prompt` CSV (see the module docstring for the accepted variations)."""
    result = MetadataFile(path)
    text = _read_text(path, result)
    if text is None:
        return result
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    name_col = caption_col = -1
    last_line = 0
    try:
        for row in reader:
            line, last_line = last_line + 1, reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip().lower() for cell in row]
                name_col = _first_index(header, FILENAME_KEYS)
                caption_col = _first_index(header, CAPTION_KEYS)
                if name_col < 0 or caption_col < 0:
                    result.problems.append(Problem(path, (
                        f"line {line}: header is {','.join(row)!r}, expected {EXPECTED_CSV_HEADER!r} (the first "
                        f"line must name the columns; also accepted: {'/'.join(FILENAME_KEYS)} and "
                        f"{'/'.join(CAPTION_KEYS)})"
                    ), True))
                    return result
                continue
            if len(row) <= max(name_col, caption_col):
                result.problems.append(Problem(path, f"line {line} has {len(row)} field(s), expected "
                                                     f"{len(header)} ({','.join(header)}); row ignored"))
                continue
            if caption_col == len(header) - 1 and len(row) > len(header):
                # An unquoted prompt with commas split into several cells: put it back together.
                caption = ",".join(row[caption_col:])
            else:
                caption = row[caption_col]
            _add(result, row[name_col], caption.strip(), line, base_dirs)
    except csv.Error as exc:
        result.problems.append(Problem(path, f"line {reader.line_num}: malformed CSV ({exc}); the rest of the file is "
                                             "ignored (an unclosed quote?)", True))
        return result
    if header is None:
        result.problems.append(Problem(path, f"file is empty; expected the header {EXPECTED_CSV_HEADER!r} and one row "
                                             "per image", True))
    return result


def read_metadata_jsonl(path: Path, base_dirs: Sequence[Path]) -> MetadataFile:
    """Read an imagefolder-style `metadata.jsonl`."""
    result = MetadataFile(path)
    text = _read_text(path, result)
    if text is None:
        return result
    # Split on "\n" only: str.splitlines() would also split at U+2028 and friends, which JSON allows inside strings.
    for line_no, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            result.problems.append(Problem(path, f"line {line_no} is not valid JSON ({exc.msg} at column {exc.colno}); "
                                                 "line ignored"))
            continue
        if not isinstance(obj, dict):
            result.problems.append(Problem(path, f"line {line_no} is a JSON {type(obj).__name__}, expected an object "
                                                 'like {"file_name": "a.png", "text": "..."}; line ignored'))
            continue
        name = next((obj[k] for k in FILENAME_KEYS if isinstance(obj.get(k), str)), None)
        caption = next((obj[k] for k in CAPTION_KEYS if isinstance(obj.get(k), str)), None)
        if name is None or caption is None:
            missing = "file_name" if name is None else "text (or prompt/caption)"
            result.problems.append(Problem(path, f"line {line_no} has no string {missing} key (keys found: "
                                                 f"{', '.join(map(str, obj)) or 'none'}); line ignored"))
            continue
        _add(result, name, caption.strip(), line_no, base_dirs)
    return result


def _read_text(path: Path, result: MetadataFile) -> str | None:
    try:
        return decode_utf8(path.read_bytes(), path)
    except BadFileError as exc:
        result.problems.append(exc.as_problem(fatal=True))
    except OSError as exc:
        result.problems.append(Problem(path, f"cannot be read ({exc.strerror or exc})", True))
    return None


def _first_index(cells: list[str], keys: Sequence[str]) -> int:
    return next((i for key in keys for i, cell in enumerate(cells) if cell == key), -1)


def _add(result: MetadataFile, name: str, caption: str, line: int, base_dirs: Sequence[Path]) -> None:
    name = name.strip().replace("\\", "/")
    if not name:
        result.problems.append(Problem(result.path, f"line {line} has an empty file name; row ignored"))
        return
    candidates = [normalise(base / name) for base in base_dirs]
    key = next((c for c in candidates if c.exists()), candidates[0])
    earlier = result.entries.get(key)
    if earlier is not None:
        same = "the same prompt" if earlier.caption == caption else "a different prompt; the first one is used"
        result.problems.append(Problem(result.path,
                                       f"line {line} repeats {name!r} from line {earlier.line} with {same}"))
        return
    result.entries[key] = CaptionEntry(caption, result.path, line, name)
