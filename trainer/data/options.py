"""`DatasetOptions`: every setting that decides which images are used and how they are captioned, bucketed and turned
into pixels.

Names follow kohya sd-scripts where one exists (`min_bucket_reso`, `keep_tokens`, …) so that settings and advice carry
over. Values are checked once, here, so the rest of the package can trust them; a bad value raises `ConfigError` naming
the key, the value and what is allowed. Bucket limits left None are derived from the resolution by the same rule the
config uses (`config.bucket_defaults`), so a small resolution never meets a default made for 512 px.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from ..config import bucket_defaults, bucket_problems
from ..errors import ConfigError

MISSING_CAPTION_POLICIES = ("warn_empty", "trigger", "error")
CROP_MODES = ("center", "random")

# Sizes must stay multiples of the VAE's downsampling factor, or latents would not line up with pixels.
_VAE_FACTOR = 8
_MAX_RESOLUTION = 8192


@dataclass
class DatasetOptions:
    """How to read and prepare a training folder.

    Args:
        train_data_dir: folder with the images (and optionally kohya `N_name` repeat sub-folders).
        metadata_path: a `filename,prompt` CSV or an imagefolder-style `metadata.jsonl` with captions; its entries win
            over every other caption source (see `sources` for the full precedence rule).
        recursive: also take images from sub-folders at any depth (not only `N_name` ones).
        caption_extensions: sidecar caption files looked for next to each image, first match wins.
        trigger_word: prepended to every caption unless the caption already contains it.
        missing_caption: what to do when an image has no caption: "warn_empty" (warn, train on the trigger word or an
            empty caption), "trigger" (silently train on the trigger word), "error" (refuse the dataset).
        resolution: training side length; max bucket area is resolution².
        enable_bucket: aspect-ratio buckets; off puts every image in one `resolution`² square.
        min_bucket_reso, max_bucket_reso, bucket_reso_steps: bucket side limits and step; None derives them from
            the resolution (kohya's 256 / max(1024, 2·resolution) / 64 from 256 px up, finer below).
        bucket_no_upscale: bucket = the image's own size (downscaled to the max area), never upscaled.
        crop: "center" or "random" crop of the part that overflows the bucket. Random crops rule out latent caching.
        flip_aug: random horizontal flips.
        caption_dropout_rate: probability of training a sample on the empty caption.
        shuffle_caption: shuffle the comma-separated tags after the first `keep_tokens`.
        keep_tokens: how many leading tags shuffling and tag dropout never touch.
        caption_tag_dropout_rate: probability of dropping each (non-kept) tag.
        background: RGB colour transparent pixels are composited on.
        max_image_pixels: images declaring more pixels than this are refused from their header alone (decompression
            bombs). PIL's own hard limit (2 × `Image.MAX_IMAGE_PIXELS`, about 179 million) applies as well.
        prefer_downscale_side: images whose longer side exceeds this are first shrunk by an integer factor (JPEG draft
            or `Image.reduce`: cheap) before the exact resize, never below twice the training size; 0 turns that off.
    """

    train_data_dir: Path
    metadata_path: Path | None = None
    recursive: bool = False
    caption_extensions: tuple[str, ...] = (".txt", ".caption")
    trigger_word: str = ""
    missing_caption: str = "warn_empty"
    resolution: int = 512
    enable_bucket: bool = True
    min_bucket_reso: int | None = None
    max_bucket_reso: int | None = None
    bucket_reso_steps: int | None = None
    bucket_no_upscale: bool = False
    crop: str = "center"
    flip_aug: bool = False
    caption_dropout_rate: float = 0.0
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_tag_dropout_rate: float = 0.0
    background: tuple[int, int, int] = (255, 255, 255)
    max_image_pixels: int = 100_000_000
    prefer_downscale_side: int = 2048

    def __post_init__(self) -> None:
        # Front ends hand over strings and lists (YAML, JSON, widgets); normalise before checking.
        self.train_data_dir = Path(self.train_data_dir).expanduser()
        if self.metadata_path is not None and str(self.metadata_path) != "":
            self.metadata_path = Path(self.metadata_path).expanduser()
        else:
            self.metadata_path = None
        if isinstance(self.caption_extensions, str):
            self.caption_extensions = (self.caption_extensions,)
        self.caption_extensions = tuple(self.caption_extensions)
        self.background = tuple(self.background)  # type: ignore[assignment]
        self.trigger_word = (self.trigger_word or "").strip()
        self._validate()

    @property
    def max_area(self) -> int:
        """Largest bucket area, in pixels (kohya: W·H of `--resolution`)."""
        return self.resolution * self.resolution

    def _validate(self) -> None:
        for key in ("recursive", "enable_bucket", "bucket_no_upscale", "flip_aug", "shuffle_caption"):
            value = getattr(self, key)
            if not isinstance(value, bool):
                _fail(key, value, "true or false")
        for ext in self.caption_extensions:
            if not isinstance(ext, str) or not ext.startswith(".") or len(ext) < 2 or "/" in ext or "\\" in ext:
                _fail("caption_extensions", self.caption_extensions,
                      "extensions starting with a dot, e.g. ('.txt', '.caption')")
        _choice("missing_caption", self.missing_caption, MISSING_CAPTION_POLICIES)
        if self.missing_caption == "trigger" and not self.trigger_word:
            raise ConfigError(
                'missing_caption = "trigger" needs a trigger_word; set trigger_word or use "warn_empty"',
                key="trigger_word", value=self.trigger_word, allowed="a non-empty word or phrase",
            )
        _choice("crop", self.crop, CROP_MODES)

        if self.bucket_reso_steps is not None:
            _int_range("bucket_reso_steps", self.bucket_reso_steps, _VAE_FACTOR, 1024)
            if self.bucket_reso_steps % _VAE_FACTOR:
                _fail("bucket_reso_steps", self.bucket_reso_steps,
                      f"a multiple of {_VAE_FACTOR} (64 is kohya's default)")
        _int_range("resolution", self.resolution, 64, _MAX_RESOLUTION)
        if self.resolution % _VAE_FACTOR:
            _fail("resolution", self.resolution, f"a multiple of {_VAE_FACTOR}")
        self._resolve_bucket_limits()

        for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                _fail(key, value, "a number from 0.0 to 1.0")
            setattr(self, key, float(value))
        _int_range("keep_tokens", self.keep_tokens, 0, 10_000)

        if len(self.background) != 3 or not all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in self.background
        ):
            _fail("background", self.background, "three integers 0-255, e.g. (255, 255, 255)")
        _int_range("max_image_pixels", self.max_image_pixels, 64 * 64, 10**12)
        _int_range("prefer_downscale_side", self.prefer_downscale_side, 0, 10**6)

    def _resolve_bucket_limits(self) -> None:
        """Check the limits the caller set against the resolution, then fill in the unset ones."""
        for key in ("min_bucket_reso", "max_bucket_reso"):
            if getattr(self, key) is not None:
                _int_range(key, getattr(self, key), _VAE_FACTOR, _MAX_RESOLUTION)
        # Without buckets every image is one resolution² square: the limits are unused, so never wrong.
        problems = bucket_problems(self.resolution, self.min_bucket_reso, self.max_bucket_reso,
                                   self.bucket_reso_steps) if self.enable_bucket else []
        if problems:
            raise problems[0]
        derived = bucket_defaults(self.resolution, self.bucket_reso_steps)
        for key in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
            if getattr(self, key) is None:
                setattr(self, key, derived[key])


def _fail(key: str, value: object, allowed: str) -> NoReturn:
    raise ConfigError(f"dataset option {key} = {value!r} is not allowed; expected {allowed}", key=key, value=value,
                      allowed=allowed)


def _choice(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _fail(key, value, "one of " + ", ".join(repr(a) for a in allowed))


def _int_range(key: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        _fail(key, value, f"an integer from {low} to {high}")
