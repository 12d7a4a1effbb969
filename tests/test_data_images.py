"""Decoding images to RGB: orientation, transparency, palette, 16-bit, grey, CMYK, truncation, pre-shrinking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from loraloop.trainer.data.images import _to_rgb, load_rgb, load_rgb_with_size, read_header
from loraloop.trainer.data.options import DatasetOptions
from loraloop.trainer.errors import DatasetError


@pytest.fixture
def options(tmp_path: Path) -> DatasetOptions:
    return DatasetOptions(train_data_dir=tmp_path, background=(0, 255, 0))


def pixel(image: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    assert image.mode == "RGB"
    return image.getpixel(xy)  # type: ignore[return-value]


def two_halves(size: tuple[int, int] = (40, 20)) -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", size, (255, 0, 0))
    image.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
    return image


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp"])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation(tmp_path: Path, options: DatasetOptions, suffix: str, orientation: int) -> None:
    path = tmp_path / f"o{orientation}{suffix}"
    exif = Image.Exif()
    exif[0x0112] = orientation
    save_kw = {"quality": 95} if suffix != ".png" else {}
    two_halves().save(path, exif=exif.tobytes(), **save_kw)
    loaded = load_rgb(path, options)
    with Image.open(path) as reference_file:
        reference = ImageOps.exif_transpose(reference_file).convert("RGB")
    assert loaded.size == reference.size == ((40, 20) if orientation == 3 else (20, 40))
    diff = np.abs(np.asarray(loaded, dtype=int) - np.asarray(reference, dtype=int)).max()
    assert diff <= 2
    header = read_header(path, options)
    assert (header.width, header.height) == loaded.size
    if orientation == 6:  # 90° clockwise: the left (red) half ends up on top
        assert pixel(loaded, (10, 2))[0] > 200 and pixel(loaded, (10, 37))[2] > 200


def test_rgba_composited_on_background(tmp_path: Path, options: DatasetOptions) -> None:
    path = tmp_path / "rgba.png"
    image = Image.new("RGBA", (4, 1), (255, 0, 0, 255))
    image.putpixel((1, 0), (255, 0, 0, 0))
    image.putpixel((2, 0), (255, 0, 0, 128))
    image.putpixel((3, 0), (12, 34, 56, 0))  # hidden colour must not leak
    image.save(path)
    loaded = load_rgb(path, options)
    assert pixel(loaded, (0, 0)) == (255, 0, 0)
    assert pixel(loaded, (1, 0)) == (0, 255, 0)
    r, g, b = pixel(loaded, (2, 0))
    assert abs(r - 128) <= 1 and abs(g - 127) <= 1 and b == 0
    assert pixel(loaded, (3, 0)) == (0, 255, 0)


def test_la_and_palette_transparency(tmp_path: Path, options: DatasetOptions) -> None:
    la = Image.new("LA", (2, 1), (90, 255))
    la.putpixel((1, 0), (90, 0))
    la.save(tmp_path / "la.png")
    loaded = load_rgb(tmp_path / "la.png", options)
    assert pixel(loaded, (0, 0)) == (90, 90, 90) and pixel(loaded, (1, 0)) == (0, 255, 0)

    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png", transparency=0)
    loaded = load_rgb(tmp_path / "p.png", options)
    assert pixel(loaded, (0, 0)) == (0, 255, 0)  # transparent index → background
    assert pixel(loaded, (1, 0)) == (200, 100, 50)

    opaque = Image.new("P", (1, 1), 1)
    opaque.putpalette([0, 0, 0, 1, 2, 3] + [0] * (256 * 3 - 6))
    opaque.save(tmp_path / "p_opaque.bmp")
    assert pixel(load_rgb(tmp_path / "p_opaque.bmp", options)) == (1, 2, 3)


def test_sixteen_bit_grey_grey_and_bilevel(tmp_path: Path, options: DatasetOptions) -> None:
    values = np.array([[65535, 0, 32896, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as check:
        assert check.mode.startswith("I")
    loaded = load_rgb(tmp_path / "g16.png", options)
    assert [pixel(loaded, (x, 0)) for x in range(4)] == [(255,) * 3, (0,) * 3, (128,) * 3, (4,) * 3]

    Image.new("L", (1, 1), 77).save(tmp_path / "l.png")
    assert pixel(load_rgb(tmp_path / "l.png", options)) == (77, 77, 77)

    Image.new("1", (2, 1), 1).save(tmp_path / "one.png")
    assert pixel(load_rgb(tmp_path / "one.png", options)) == (255, 255, 255)

    # PNG cannot store mode "I" (some PIL versions open 16-bit files as it): check the conversion itself.
    assert pixel(_to_rgb(Image.new("I", (1, 1), 200), (0, 0, 0), tmp_path)) == (200, 200, 200)
    assert pixel(_to_rgb(Image.new("I", (1, 1), 65535), (0, 0, 0), tmp_path)) == (255, 255, 255)
    assert pixel(_to_rgb(Image.new("F", (1, 1), 0.5), (0, 0, 0), tmp_path)) == (128, 128, 128)


def test_cmyk_jpeg(tmp_path: Path, options: DatasetOptions) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=100)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    r, g, b = pixel(load_rgb(path, options), (8, 8))
    assert r >= 245 and g <= 10 and b <= 10


def test_truncated_image_raises_naming_file(tmp_path: Path, options: DatasetOptions) -> None:
    path = tmp_path / "t.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(DatasetError) as err:
        load_rgb(path, options)
    assert str(path) in str(err.value) and "truncated" in str(err.value)
    assert err.value.path == path
    with pytest.raises(DatasetError, match="truncated"):
        read_header(path, options)


def test_large_image_is_preshrunk_but_not_below_twice_target(tmp_path: Path) -> None:
    options = DatasetOptions(train_data_dir=tmp_path, prefer_downscale_side=512)
    big = two_halves((2400, 1200))
    big.save(tmp_path / "big.jpg", quality=90)
    big.save(tmp_path / "big.png")
    for name in ("big.jpg", "big.png"):
        image, original = load_rgb_with_size(tmp_path / name, options, min_size=(256, 128))
        assert original == (2400, 1200)
        assert image.size[0] >= 512 and image.size[1] >= 256
        assert image.size[0] < 2400  # it did shrink
        assert image.size[0] * 1200 == pytest.approx(image.size[1] * 2400, rel=0.01)  # aspect kept
        assert pixel(image, (5, image.size[1] // 2))[0] > 200  # still red on the left
    full = load_rgb(tmp_path / "big.png", DatasetOptions(train_data_dir=tmp_path, prefer_downscale_side=0),
                    min_size=(256, 128))
    assert full.size == (2400, 1200)
