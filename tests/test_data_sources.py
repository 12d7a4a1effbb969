"""Scanning a dataset folder: layouts, caption sources and their precedence, and every kind of bad input."""

from __future__ import annotations

import os
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from loraloop.trainer.data.options import DatasetOptions
from loraloop.trainer.data.sources import DatasetScan, scan_dataset
from loraloop.trainer.errors import DatasetError


def opts(root: Path, **kw: object) -> DatasetOptions:
    # Small buckets so tiny test images are usable.
    base = {"resolution": 128, "min_bucket_reso": 64, "max_bucket_reso": 256}
    base.update(kw)
    return DatasetOptions(train_data_dir=root, **base)  # type: ignore[arg-type]


def img(path: Path, size: tuple[int, int] = (96, 64), color: tuple[int, int, int] = (200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def noisy(path: Path, size: tuple[int, int] = (96, 96)) -> Path:
    """An image that does not compress to almost nothing (so truncating it cuts real data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def text(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width×height but carries almost no pixel data: opening it reads only the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def problems_for(scan: DatasetScan, name: str) -> list[str]:
    return [str(p) for p in scan.problems if p.path.name == name]


def by_name(scan: DatasetScan) -> dict[str, object]:
    return {r.path.name: r for r in scan.records}


# ---------------------------------------------------------------------------------------------------------- layouts

def test_plain_folder_with_sidecars(tmp_path: Path) -> None:
    img(tmp_path / "a.png")
    img(tmp_path / "B.JPG", (64, 128))
    img(tmp_path / "c.webp")
    img(tmp_path / "d.bmp")
    text(tmp_path / "a.txt", "red square, simple\n")
    text(tmp_path / "B.caption", "tall")
    text(tmp_path / "c.txt", "\ufeffwith bom")
    text(tmp_path / "notes.md", "not an image")
    text(tmp_path / ".hidden.png", "ignored entirely")
    scan = scan_dataset(opts(tmp_path, missing_caption="trigger", trigger_word="zzz"))
    records = by_name(scan)
    assert sorted(records) == ["B.JPG", "a.png", "c.webp", "d.bmp"]
    assert records["a.png"].caption == "red square, simple"
    assert records["a.png"].caption_source == "a.txt"
    assert records["B.JPG"].caption == "tall"
    assert (records["B.JPG"].width, records["B.JPG"].height) == (64, 128)
    assert records["c.webp"].caption == "with bom"
    assert records["d.bmp"].caption is None
    assert all(r.repeats == 1 and r.group == tmp_path.name for r in scan.records)
    assert not scan.problems  # "trigger" policy: no warning for d.bmp


def test_repeat_folders_and_recursion(tmp_path: Path) -> None:
    img(tmp_path / "10_mychar" / "a.png")
    img(tmp_path / "3_bg" / "b.png")
    img(tmp_path / "c.png")
    img(tmp_path / "other" / "d.png")
    img(tmp_path / "10_mychar" / "deeper" / "e.png")
    img(tmp_path / "0_nothing" / "f.png")

    flat = scan_dataset(opts(tmp_path, missing_caption="trigger", trigger_word="t"))
    records = by_name(flat)
    assert sorted(records) == ["a.png", "b.png", "c.png"]
    assert (records["a.png"].repeats, records["a.png"].group) == (10, "10_mychar")
    assert (records["b.png"].repeats, records["b.png"].group) == (3, "3_bg")
    assert (records["c.png"].repeats, records["c.png"].group) == (1, tmp_path.name)
    assert [p.name for p in flat.ignored_dirs] == ["other"]
    assert any("0 repeats" in s for s in problems_for(flat, "0_nothing"))
    assert flat.dataset_dirs()["10_mychar"] == {"n_repeats": 10, "img_count": 1}

    deep = scan_dataset(opts(tmp_path, recursive=True, missing_caption="trigger", trigger_word="t"))
    records = by_name(deep)
    assert sorted(records) == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    assert (records["e.png"].repeats, records["e.png"].group) == (10, "10_mychar")  # nearest N_name ancestor
    assert (records["d.png"].repeats, records["d.png"].group) == (1, tmp_path.name)


# ------------------------------------------------------------------------------------------- metadata CSV / JSONL

def test_csv_bom_crlf_quoted_and_unquoted_commas(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "img_001.jpg", "d.png"):
        img(tmp_path / name)
    text(tmp_path / "metadata.csv", (
        b"\xef\xbb\xbffilename,prompt\r\n"
        b'a.png,"red, blue, green"\r\n'
        b"b.png,plain prompt\r\n"
        b"img_001.jpg,cyberpunk city at night, neon lights, raining streets\r\n"
        b'd.png,"a ""quoted"" word,\r\nand a second line"\r\n'
    ))
    scan = scan_dataset(opts(tmp_path))
    records = by_name(scan)
    assert records["a.png"].caption == "red, blue, green"
    assert records["b.png"].caption == "plain prompt"
    assert records["img_001.jpg"].caption == "cyberpunk city at night, neon lights, raining streets"
    assert records["d.png"].caption == 'a "quoted" word,\r\nand a second line'
    assert records["b.png"].caption_source == "metadata.csv line 3"
    assert not scan.problems


def test_csv_wrong_header_names_found_and_expected(tmp_path: Path) -> None:
    img(tmp_path / "a.png")
    csv_path = text(tmp_path / "metadata.csv", "image_name,description\na.png,hello\n")
    scan = scan_dataset(opts(tmp_path))
    fatal = scan.fatal_problems
    assert len(fatal) == 1 and fatal[0].path == csv_path
    assert "'image_name,description'" in fatal[0].reason and "'filename,prompt'" in fatal[0].reason
    with pytest.raises(DatasetError) as err:
        scan.raise_for_fatal()
    assert "metadata.csv" in str(err.value) and err.value.path == csv_path


def test_csv_row_for_missing_file_names_csv_and_line(tmp_path: Path) -> None:
    img(tmp_path / "a.png")
    img(tmp_path / "sub" / "x.png")
    csv_path = text(tmp_path / "metadata.csv", "filename,prompt\na.png,ok\n\nimg_009.jpg,typo\nsub/x.png,elsewhere\n")
    scan = scan_dataset(opts(tmp_path))
    messages = problems_for(scan, "metadata.csv")
    assert any(m.startswith(str(csv_path)) and "line 4" in m and "'img_009.jpg'" in m and "does not exist" in m
               for m in messages)
    assert any("line 5" in m and "not one of the scanned images" in m for m in messages)
    assert by_name(scan)["a.png"].caption == "ok"
    assert not scan.fatal_problems


def test_csv_duplicate_rows(tmp_path: Path) -> None:
    img(tmp_path / "a.png")
    text(tmp_path / "metadata.csv", "filename,prompt\na.png,first\nb.png,x\na.png,second\n")
    img(tmp_path / "b.png")
    scan = scan_dataset(opts(tmp_path))
    messages = problems_for(scan, "metadata.csv")
    assert any("line 4 repeats 'a.png' from line 2" in m and "different prompt" in m for m in messages)
    assert by_name(scan)["a.png"].caption == "first"


def test_csv_not_utf8_names_offset(tmp_path: Path) -> None:
    img(tmp_path / "a.png")
    text(tmp_path / "metadata.csv", b"filename,prompt\na.png,caf\xe9\n")
    scan = scan_dataset(opts(tmp_path))
    (problem,) = scan.fatal_problems
    assert problem.path.name == "metadata.csv"
    assert "UTF-8" in problem.reason and "offset 25" in problem.reason and "0xE9" in problem.reason


def test_jsonl_imagefolder_style(tmp_path: Path) -> None:
    img(tmp_path / "a.png")
    img(tmp_path / "b.png")
    img(tmp_path / "sub" / "c.png")
    text(tmp_path / "metadata.jsonl", (
        '{"file_name": "a.png", "text": "from text"}\r\n'
        '{"file_name": "b.png", "prompt": "from prompt"}\n'
        "not json\n"
        '{"file_name": "zz.png"}\n'
        '{"file_name": "sub/c.png", "caption": "deep"}\n'
    ))
    scan = scan_dataset(opts(tmp_path, recursive=True))
    records = by_name(scan)
    assert records["a.png"].caption == "from text"
    assert records["b.png"].caption == "from prompt"
    assert records["c.png"].caption == "deep"  # names are relative to the metadata file's folder
    messages = problems_for(scan, "metadata.jsonl")
    assert any("line 3 is not valid JSON" in m for m in messages)
    assert any("line 4 has no string text" in m for m in messages)


def test_explicit_metadata_path_article_layout(tmp_path: Path) -> None:
    images = tmp_path / "data" / "style_train" / "images"
    img(images / "img_001.jpg")
    img(images / "img_002.jpg")
    meta = text(tmp_path / "data" / "style_train" / "metadata.csv",
                "filename,prompt\nimg_001.jpg,cyberpunk city at night, neon lights\nimg_002.jpg,quiet street\n")
    scan = scan_dataset(opts(images, metadata_path=meta))
    records = by_name(scan)
    assert records["img_001.jpg"].caption == "cyberpunk city at night, neon lights"
    assert records["img_002.jpg"].caption == "quiet street"
    assert scan.metadata_files == [meta]

    missing = scan_dataset(opts(images, metadata_path=tmp_path / "nope.csv"))
    assert any("metadata_path does not exist" in p.reason for p in missing.fatal_problems)


def test_caption_precedence_rule(tmp_path: Path) -> None:
    img(tmp_path / "a.png")
    text(tmp_path / "a.caption", "from caption")
    o = opts(tmp_path)
    assert by_name(scan_dataset(o))["a.png"].caption == "from caption"
    text(tmp_path / "a.txt", "from txt")
    assert by_name(scan_dataset(o))["a.png"].caption == "from txt"
    text(tmp_path / "metadata.jsonl", '{"file_name": "a.png", "text": "from jsonl"}\n')
    scan = scan_dataset(o)
    assert by_name(scan)["a.png"].caption == "from jsonl"
    assert scan.shadowed_captions == 1
    text(tmp_path / "metadata.csv", "filename,prompt\na.png,from csv\n")
    assert by_name(scan_dataset(o))["a.png"].caption == "from csv"
    explicit = text(tmp_path.parent / f"{tmp_path.name}-captions.csv", "filename,prompt\na.png,from explicit\n")
    assert by_name(scan_dataset(opts(tmp_path, metadata_path=explicit)))["a.png"].caption == "from explicit"
    # caption_extensions order decides between sidecars
    (tmp_path / "metadata.csv").unlink()
    (tmp_path / "metadata.jsonl").unlink()
    assert by_name(scan_dataset(opts(tmp_path, caption_extensions=(".caption", ".txt"))))["a.png"].caption == \
        "from caption"


def test_two_images_claiming_one_caption(tmp_path: Path) -> None:
    img(tmp_path / "a.png")
    img(tmp_path / "a.jpg")
    text(tmp_path / "a.txt", "shared")
    scan = scan_dataset(opts(tmp_path))
    (message,) = problems_for(scan, "a.txt")
    assert "a.jpg" in message and "a.png" in message and "several images" in message
    assert [r.caption for r in scan.records] == ["shared", "shared"]


# ------------------------------------------------------------------------------------------------- missing captions

def test_missing_caption_policies(tmp_path: Path) -> None:
    img(tmp_path / "a.png")
    text(tmp_path / "b.txt", "  \n")
    img(tmp_path / "b.png")
    warn = scan_dataset(opts(tmp_path, trigger_word="sks"))
    assert {r.path.name: r.caption for r in warn.records} == {"a.png": None, "b.png": None}
    assert any("no caption found" in m and "a.txt" in m and "'sks'" in m for m in problems_for(warn, "a.png"))
    assert any("b.txt is empty" in m for m in problems_for(warn, "b.png"))
    assert not warn.fatal_problems

    error = scan_dataset(opts(tmp_path, missing_caption="error"))
    assert {p.path.name for p in error.fatal_problems} == {"a.png", "b.png"}
    assert all("missing_caption = 'error'" in p.reason for p in error.fatal_problems)

    silent = scan_dataset(opts(tmp_path, missing_caption="trigger", trigger_word="sks"))
    assert not silent.problems and len(silent.records) == 2


def test_multiline_caption_uses_first_line(tmp_path: Path) -> None:
    img(tmp_path / "a.png")
    text(tmp_path / "a.txt", "\nfirst line\nsecond line\n")
    scan = scan_dataset(opts(tmp_path))
    assert by_name(scan)["a.png"].caption == "first line"
    assert any("2 non-empty lines" in m for m in problems_for(scan, "a.txt"))


def test_non_utf8_caption_names_file_and_offset(tmp_path: Path) -> None:
    img(tmp_path / "a.png")
    caption = text(tmp_path / "a.txt", b"hello caf\xe9 world")
    scan = scan_dataset(opts(tmp_path))
    (problem,) = scan.fatal_problems
    assert problem.path == caption
    assert "not valid UTF-8" in problem.reason and "byte offset 9" in problem.reason
    with pytest.raises(DatasetError, match=r"a\.txt.*offset 9"):
        scan.raise_for_fatal()


# ------------------------------------------------------------------------------------------------------ bad images

def test_bad_images_are_skipped_with_reasons(tmp_path: Path) -> None:
    img(tmp_path / "good.png")
    (tmp_path / "zero.jpg").write_bytes(b"")
    text(tmp_path / "corrupt.png", "this is not an image")
    trunc_png = noisy(tmp_path / "trunc.png")
    trunc_png.write_bytes(trunc_png.read_bytes()[: trunc_png.stat().st_size // 2])
    trunc_jpg = tmp_path / "trunc.jpg"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(trunc_jpg, quality=90)
    trunc_jpg.write_bytes(trunc_jpg.read_bytes()[:-300])
    img(tmp_path / "small.png", (40, 300))
    img(tmp_path / "dot.png", (1, 1))
    scan = scan_dataset(opts(tmp_path, missing_caption="trigger", trigger_word="t"))
    assert [r.path.name for r in scan.records] == ["good.png"]
    assert scan.images_found == 7
    reasons = {p.path.name: p.reason for p in scan.problems}
    assert "empty file (0 bytes)" in reasons["zero.jpg"]
    assert "not a readable" in reasons["corrupt.png"]
    assert "truncated" in reasons["trunc.png"] and "IEND" in reasons["trunc.png"]
    assert "truncated" in reasons["trunc.jpg"]
    assert "smaller than the smallest bucket" in reasons["small.png"] and "40x300" in reasons["small.png"]
    assert "1-pixel" in reasons["dot.png"]
    assert not scan.fatal_problems
    assert all(str(p).startswith(str(tmp_path)) for p in scan.problems)


def test_decompression_bomb_rejected_from_header_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img(tmp_path / "good.png")
    png_header(tmp_path / "bomb.png", 20000, 20000)  # over PIL's own hard limit
    png_header(tmp_path / "big.png", 1200, 1000)  # under PIL's limit, over ours below

    def no_decoding(self: object) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    start = time.perf_counter()
    scan = scan_dataset(opts(tmp_path, max_image_pixels=1_000_000, missing_caption="trigger", trigger_word="t"))
    assert time.perf_counter() - start < 1.0
    reasons = {p.path.name: p.reason for p in scan.problems}
    assert "decompression bomb" in reasons["bomb.png"] and "400000000" in reasons["bomb.png"]
    assert "1200x1000" in reasons["big.png"] and "max_image_pixels" in reasons["big.png"]
    assert [r.path.name for r in scan.records] == ["good.png"]


def test_exif_rotated_size_comes_from_header(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (128, 64)).save(tmp_path / "rot.jpg", exif=exif.tobytes())
    Image.new("RGB", (128, 64)).save(tmp_path / "rot.png", exif=exif.tobytes())
    scan = scan_dataset(opts(tmp_path, missing_caption="trigger", trigger_word="t"))
    assert {(r.path.name, r.width, r.height) for r in scan.records} == {("rot.jpg", 64, 128), ("rot.png", 64, 128)}


# ------------------------------------------------------------------------------------------------- folder problems

def test_missing_empty_and_imageless_folders(tmp_path: Path) -> None:
    missing = scan_dataset(opts(tmp_path / "nope"))
    assert missing.fatal_problems[0].reason == "train_data_dir does not exist"

    empty = tmp_path / "empty"
    empty.mkdir()
    scan = scan_dataset(opts(empty))
    assert scan.fatal_problems[0].path == empty and "is empty" in scan.fatal_problems[0].reason

    no_images = tmp_path / "noimg"
    text(no_images / "readme.md", "hello")
    img(no_images / "photos" / "a.png")
    scan = scan_dataset(opts(no_images))
    (problem,) = scan.fatal_problems
    assert "no images" in problem.reason and "photos" in problem.reason and "recursive" in problem.reason
    with pytest.raises(DatasetError, match="no images"):
        scan.raise_for_fatal()

    all_bad = tmp_path / "allbad"
    (all_bad).mkdir()
    (all_bad / "a.png").write_bytes(b"")
    scan = scan_dataset(opts(all_bad))
    assert any("none of the 1 image(s) can be used" in p.reason for p in scan.fatal_problems)


@pytest.mark.skipif(os.name == "nt", reason="symlinks need privileges on Windows")
def test_symlink_loops_do_not_hang(tmp_path: Path) -> None:
    img(tmp_path / "a.png")
    img(tmp_path / "5_x" / "b.png")
    (tmp_path / "5_x" / "up").symlink_to(tmp_path, target_is_directory=True)  # loops back to the root
    (tmp_path / "5_x" / "self").symlink_to(tmp_path / "5_x" / "self")  # a link to itself
    (tmp_path / "alias").symlink_to(tmp_path / "5_x", target_is_directory=True)  # the same folder twice
    (tmp_path / "ghost.png").symlink_to(tmp_path / "missing.png")
    result: list[DatasetScan] = []
    worker = threading.Thread(target=lambda: result.append(
        scan_dataset(opts(tmp_path, recursive=True, missing_caption="trigger", trigger_word="t"))), daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert result, "scan hung on a symlink loop"
    scan = result[0]
    assert sorted(r.path.name for r in scan.records) == ["a.png", "b.png"]
    reasons = {p.path.name: p.reason for p in scan.problems}
    assert "symlink loop" in reasons["up"]
    assert "symlink loop" in reasons["self"]
    assert "already scanned" in reasons["alias"]
    assert "broken symbolic link" in reasons["ghost.png"]


def test_root_named_like_repeat_folder_and_orphan_captions(tmp_path: Path) -> None:
    root = tmp_path / "5_solo"
    img(root / "a.png")
    text(root / "a.txt", "a")
    text(root / "gone.txt", "its image was deleted")
    scan = scan_dataset(opts(root))
    (record,) = scan.records
    assert (record.repeats, record.group) == (5, "5_solo")
    (problem,) = scan.problems
    assert problem.path.name == "gone.txt" and "no image named gone" in problem.reason and not problem.fatal


def test_small_images_are_kept_without_buckets(tmp_path: Path) -> None:
    """min_bucket_reso only skips images when buckets are on; without, every image is resized to the square."""
    img(tmp_path / "small.png", (40, 300))
    flat = scan_dataset(opts(tmp_path, enable_bucket=False, min_bucket_reso=256, missing_caption="trigger",
                             trigger_word="t"))
    assert [r.path.name for r in flat.records] == ["small.png"]
    bucketed = scan_dataset(opts(tmp_path, missing_caption="trigger", trigger_word="t"))
    assert bucketed.records == []
