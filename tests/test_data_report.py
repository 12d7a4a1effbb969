"""check_dataset / format_report: the summary and the verdict a `check-dataset` command prints."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from loraloop.trainer.data.options import DatasetOptions
from loraloop.trainer.data.report import check_dataset, format_report


def opts(root: Path, **kw: object) -> DatasetOptions:
    base = {"resolution": 128, "min_bucket_reso": 64, "max_bucket_reso": 256, "bucket_reso_steps": 64}
    base.update(kw)
    return DatasetOptions(train_data_dir=root, **base)  # type: ignore[arg-type]


def test_report_summary_and_warnings(tmp_path: Path) -> None:
    (tmp_path / "4_char").mkdir()
    for i in range(3):
        Image.new("RGB", (128, 128)).save(tmp_path / "4_char" / f"{i}.png")
        (tmp_path / "4_char" / f"{i}.txt").write_text("char, red hair" + (", smile" if i else ""))
    Image.new("RGB", (192, 64)).save(tmp_path / "wide.png")
    (tmp_path / "broken.jpg").write_bytes(b"")
    report = check_dataset(opts(tmp_path))
    assert not report.will_fail
    assert report.image_count == 4 and report.sample_count == 13
    assert report.bucket_counts == {(128, 128): 12, (192, 64): 1}
    assert report.caption_coverage == 75.0
    assert report.top_tags[:2] == [("char", 3), ("red hair", 3)]
    text = format_report(report)
    assert "4 usable of 5 found; 13 samples per epoch" in text
    assert "128x128" in text and "192x64" in text and "3/4 images (75.0%)" in text
    assert "broken.jpg: empty file (0 bytes)" in text and "wide.png: no caption found" in text
    assert text.rstrip().endswith("Result: OK (with warnings: skipped files are not trained on)")


def test_report_will_fail(tmp_path: Path) -> None:
    Image.new("RGB", (128, 128)).save(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text("name,words\na.png,hello\n")
    report = check_dataset(opts(tmp_path))
    assert report.will_fail
    text = format_report(report)
    assert "ERROR" in text and "'name,words'" in text and "FAIL" in text

    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_dataset(opts(empty)).will_fail


def test_decode_check_catches_bad_pixels(tmp_path: Path) -> None:
    Image.new("RGB", (128, 128)).save(tmp_path / "a.png")
    # A PNG whose IDAT is garbage but whose header and IEND are intact: only decoding finds it.
    good = (tmp_path / "a.png").read_bytes()
    start = good.index(b"IDAT") + 4
    (tmp_path / "b.png").write_bytes(good[:start] + b"\x00" * 8 + good[start + 8:])
    quick = check_dataset(opts(tmp_path))
    assert not quick.will_fail and quick.image_count == 2
    deep = check_dataset(opts(tmp_path), decode=True)
    assert deep.will_fail and deep.image_count == 1
    assert any(p.path.name == "b.png" for p in deep.problems)
