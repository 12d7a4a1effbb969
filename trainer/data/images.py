"""Reading image files: header facts without decoding, and decoding to plain 8-bit RGB.

Two rules keep scanning cheap and safe:
* `read_header` opens the file with PIL (which parses only the header), checks the declared size against
  `max_image_pixels` *before* anything is decoded, and looks at the file's last bytes for the end marker so truncated
  files are caught at scan time, even when a host has set PIL's global `LOAD_TRUNCATED_IMAGES`.
* The EXIF orientation is read once, from the header, by `header_orientation`, and both the scan (bucket assignment)
  and `load_rgb` use that same value. `ImageOps.exif_transpose` reads EXIF after decoding, which for a PNG whose eXIf
  chunk follows the pixel data can disagree with the header; applying the same transposition table ourselves keeps
  scan and load consistent.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .options import DatasetOptions
from .problems import BadFileError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Only the decoders we mean to use: a file with an image extension never reaches PIL's rarer (and riskier) plugins.
# (The JPEG opener also returns "MPO" images, the multi-picture JPEGs many cameras write.)
_PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
_EXIF_ORIENTATION = 0x0112
# EXIF orientation → the transposition that makes the image upright (EXIF 2.32, tag 274).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})
_TAIL_BYTES = 4096
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError)


@dataclass(frozen=True)
class ImageHeader:
    """What the header of an image file says. `width`/`height` are after EXIF orientation (what training sees)."""

    width: int
    height: int
    format: str
    mode: str
    orientation: int
    file_size: int


def is_image_name(name: str) -> bool:
    """True for the file extensions the dataset takes (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


@contextmanager
def open_image(path: Path) -> Iterator[Image.Image]:
    """PIL-open `path` (header only) and close it afterwards; every failure becomes a `BadFileError`."""
    try:
        with warnings.catch_warnings():
            # PIL warns between its limit and twice its limit; we apply our own limit (max_image_pixels) instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path, formats=_PIL_FORMATS)
    except Image.DecompressionBombError as exc:
        raise BadFileError(path, f"refused as a possible decompression bomb without decoding it ({exc})") from exc
    except FileNotFoundError as exc:
        raise BadFileError(path, "file not found (moved or deleted after the dataset was scanned?)") from exc
    except PermissionError as exc:
        raise BadFileError(path, "cannot be read (permission denied)") from exc
    except UnidentifiedImageError as exc:
        raise BadFileError(path, "not a readable JPEG, PNG, WebP or BMP image (corrupt, or another format saved "
                                  "under an image extension)") from exc
    except _DECODE_ERRORS as exc:
        raise BadFileError(path, f"corrupt image header ({exc})") from exc
    try:
        yield img
    finally:
        img.close()


def header_orientation(img: Image.Image) -> int:
    """EXIF orientation 1-8 from the already-parsed header (1 when absent or unreadable); decodes no pixels."""
    try:
        if img.format == "PNG":
            # PngImageFile.getexif() decodes the whole image to look for a trailing eXIf chunk; use what the header had.
            raw = img.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = img.getexif()
        value = exif.get(_EXIF_ORIENTATION, 1)
    except Exception as exc:  # a broken EXIF block must not cost the image: treat it as upright
        log.debug("ignoring unreadable EXIF in %s: %s", getattr(img, "filename", "?"), exc)
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def read_header(path: Path, options: DatasetOptions) -> ImageHeader:
    """Size, format and orientation of `path` from its header, after the size, bomb and truncation checks.

    Raises:
        BadFileError: zero-byte, unreadable, over `max_image_pixels`, or truncated file.
    """
    try:
        file_size = path.stat().st_size
    except OSError as exc:
        raise BadFileError(path, f"cannot be read ({exc.strerror or exc})") from exc
    if file_size == 0:
        raise BadFileError(path, "empty file (0 bytes)")
    with open_image(path) as img:
        raw_w, raw_h = img.size
        _check_pixels(path, raw_w, raw_h, options)
        orientation = header_orientation(img)
        fmt, mode = img.format or "?", img.mode
    truncated = _truncation_reason(path, fmt, file_size)
    if truncated:
        raise BadFileError(path, truncated)
    width, height = (raw_h, raw_w) if orientation in _SWAPS_AXES else (raw_w, raw_h)
    return ImageHeader(width, height, fmt, mode, orientation, file_size)


def load_rgb(path: Path, options: DatasetOptions, *, min_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode `path` to an upright 8-bit RGB image.

    Transparency is composited on `options.background`; palette, 1-bit, grey, 16-bit grey and CMYK are converted.
    With `min_size` (width, height after orientation: the size the caller will resize to), a large image may come back
    shrunk by an integer factor, but never below twice `min_size`.

    Raises:
        BadFileError: unreadable, over `max_image_pixels`, truncated or of an unsupported colour mode.
    """
    return load_rgb_with_size(path, options, min_size=min_size)[0]


def load_rgb_with_size(path: Path, options: DatasetOptions, *,
                       min_size: tuple[int, int] | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """`load_rgb`, plus the upright (width, height) of the file itself (before any pre-shrinking)."""
    with open_image(path) as opened:
        img = opened
        raw_w, raw_h = img.size
        _check_pixels(path, raw_w, raw_h, options)
        orientation = header_orientation(img)
        swaps = orientation in _SWAPS_AXES
        need_raw = None
        if min_size is not None and 0 < options.prefer_downscale_side < max(raw_w, raw_h):
            # Twice the final size: the exact resize then still averages over several source pixels (no aliasing).
            need = (2 * min_size[0], 2 * min_size[1])
            need_raw = (need[1], need[0]) if swaps else need
            if img.format in ("JPEG", "MPO"):
                # The DCT can skip detail at 1/2, 1/4 or 1/8 scale while decoding: the cheapest shrink there is.
                img.draft(None, need_raw)
        try:
            img.load()
        except _DECODE_ERRORS as exc:
            reason = f"image data is truncated or corrupt ({exc}); re-export or remove the file"
            raise BadFileError(path, reason) from exc
        if need_raw is not None:
            factor = min(img.size[0] // need_raw[0], img.size[1] // need_raw[1])
            if factor >= 2:
                img = img.reduce(factor)
        if orientation in _TRANSPOSE:
            img = img.transpose(_TRANSPOSE[orientation])
        rgb = _to_rgb(img, options.background, path)
        if rgb is opened:
            # Closing the file invalidates the image object PIL opened; hand back a detached copy instead.
            rgb = rgb.copy()
    upright = (raw_h, raw_w) if swaps else (raw_w, raw_h)
    return rgb, upright


def _check_pixels(path: Path, width: int, height: int, options: DatasetOptions) -> None:
    pixels = width * height
    if pixels > options.max_image_pixels:
        raise BadFileError(
            path,
            f"declares {width}x{height} = {pixels:,} pixels, more than max_image_pixels = {options.max_image_pixels:,} "
            "(decompression-bomb protection; nothing was decoded); downscale the image or raise max_image_pixels",
        )


def _truncation_reason(path: Path, fmt: str, file_size: int) -> str | None:
    """Why the file looks cut off, judged from its last bytes and size fields (no decoding), or None."""
    try:
        with path.open("rb") as fh:
            head = fh.read(16)
            fh.seek(max(0, file_size - _TAIL_BYTES))
            tail = fh.read()
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if fmt in ("JPEG", "MPO") and b"\xff\xd9" not in tail:
        return "JPEG data ends without its end-of-image marker (truncated download or copy?); re-export the file"
    if fmt == "PNG" and b"IEND" not in tail:
        return "PNG data ends without its IEND chunk (truncated download or copy?); re-export the file"
    if fmt == "WEBP" and head[:4] == b"RIFF":
        declared = int.from_bytes(head[4:8], "little") + 8
        if declared > file_size:
            return f"WebP file is {file_size} bytes but declares {declared} (truncated?); re-export the file"
    if fmt == "BMP" and head[:2] == b"BM":
        # Some writers leave bfSize at 0; only a non-zero size larger than the file means bytes are missing.
        declared = int.from_bytes(head[2:6], "little")
        if declared > file_size:
            return f"BMP file is {file_size} bytes but declares {declared} (truncated?); re-export the file"
    return None


def _to_rgb(img: Image.Image, background: tuple[int, int, int], path: Path) -> Image.Image:
    """Plain 8-bit RGB, whatever the file's mode."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return _high_depth_grey_to_rgb(img)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        # Straight RGB conversion would keep whatever colour sits under transparent pixels (often black garbage).
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    try:
        # "1", "L", "P", "CMYK" (PIL undoes Adobe's inverted CMYK when decoding), "YCbCr".
        return img.convert("RGB")
    except ValueError as exc:
        raise BadFileError(path, f"colour mode {mode} is not supported; re-save the image as RGB") from exc


def _high_depth_grey_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit ("I;16*"), 32-bit integer ("I") or float ("F") grey to 8-bit RGB."""
    values = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        scaled = values / 257.0  # 65535 → 255 exactly
    elif img.mode == "I":
        # PIL opens 16-bit PNG/TIFF grey as "I" in some versions: values above 255 mean a 16-bit range.
        scaled = values / 257.0 if values.size and values.max() > 255 else values
    else:
        scaled = values * 255.0 if values.size and values.max() <= 1.0 else values
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of the file's bytes (cache keys: an edited image is a different image)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()

