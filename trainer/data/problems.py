"""What goes wrong with a dataset, as data: `Problem` (one finding about one file) and `BadFileError` (the exception
the readers raise, carrying the reason apart from the path so a scan can turn it into a `Problem`)."""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from pathlib import Path

from ..errors import DatasetError


@dataclass(frozen=True)
class Problem:
    """One finding of a scan.

    Args:
        path: the file or folder at fault.
        reason: what is wrong and what to do about it (does not repeat the path).
        fatal: True when training cannot start until it is fixed; False when the file is skipped (or used as is) with
            a warning.
    """

    path: Path
    reason: str
    fatal: bool = False

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class BadFileError(DatasetError):
    """A dataset file that cannot be used; `reason` says why without repeating the path."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}", path=path)
        self.reason = reason

    def as_problem(self, fatal: bool = False) -> Problem:
        return Problem(Path(self.path or ""), self.reason, fatal)


def decode_utf8(data: bytes, path: Path) -> str:
    """`data` as UTF-8 text (a leading BOM is dropped).

    Raises:
        BadFileError: naming the byte offset, line and value of the first byte that is not UTF-8.
    """
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        line = data.count(b"\n", 0, offset) + 1
        raise BadFileError(
            path,
            f"not valid UTF-8: byte 0x{data[offset]:02X} at byte offset {offset} (line {line}) cannot be decoded; "
            "re-save the file as UTF-8",
        ) from exc
