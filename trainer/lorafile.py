"""Reading and writing LoRA `.safetensors` files: atomic, never silently overwriting, never writing NaNs."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import LoraFileError

log = logging.getLogger(__name__)


def atomic_write(path: Path, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Call `write(tmp)` on a temp file beside `path`, then rename it over `path` in one step.

    A crash or kill mid-write leaves the previous file (if any) untouched and no half-written `path`.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        msg = f"{path} already exists; choose another output_name or allow overwriting (--overwrite / overwrite: true)"
        raise LoraFileError(msg, path=path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        tmp.chmod(0o644)  # mkstemp creates 0600; a LoRA is shared with the host's other users like any model file
        tmp.replace(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """Raise naming the first tensor holding NaN/inf: a broken LoRA is never written."""
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            msg = f"refusing to save: tensor {key!r} contains NaN or inf (training diverged; lower the learning rate)"
            raise LoraFileError(msg)


def save_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *,
              overwrite: bool = False) -> Path:
    """Write a LoRA file atomically. Metadata values must be strings (safetensors' rule)."""
    from safetensors.torch import save_file

    check_finite(tensors)
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        msg = f"metadata values must be strings; not: {bad}"
        raise TypeError(msg)
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata), overwrite=overwrite)
    log.info("saved %s (%d tensors)", path, len(tensors))
    return Path(path)


def load_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a LoRA file, with an error that names the file when it cannot be read."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        msg = f"LoRA file {path} does not exist"
        raise LoraFileError(msg, path=path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is not a dict
    except (SafetensorError, OSError, ValueError) as err:
        msg = f"{path} is not a readable .safetensors LoRA file ({err})"
        raise LoraFileError(msg, path=path) from err
    return tensors, metadata


_UNSAFE = re.compile(r"[^A-Za-z0-9._\- ]+")


def sanitize_name(name: str, default: str = "lora") -> str:
    """A file-name-safe stem: no separators, no leading dots, no reserved characters, at most 100 chars."""
    clean = _UNSAFE.sub("_", name).strip(" ._")[:100]
    return clean or default


def unique_path(folder: Path, stem: str, suffix: str = ".safetensors") -> Path:
    """`folder/stem.suffix`, or `stem_2`, `stem_3`, … when taken, so nothing is overwritten."""
    candidate = Path(folder) / f"{stem}{suffix}"
    n = 2
    while candidate.exists():
        candidate = Path(folder) / f"{stem}_{n}{suffix}"
        n += 1
    return candidate
