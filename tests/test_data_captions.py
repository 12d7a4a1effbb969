"""Caption processing (trigger word, dropout, shuffle, keep_tokens, tag dropout) and tag statistics."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from loraloop.trainer.data.captions import contains_trigger, process_caption, tag_frequency, top_tags
from loraloop.trainer.data.options import DatasetOptions
from loraloop.trainer.data.sources import ImageRecord


def opts(tmp_path: Path, **kw: object) -> DatasetOptions:
    return DatasetOptions(train_data_dir=tmp_path, **kw)  # type: ignore[arg-type]


def test_trigger_prepended_once(tmp_path: Path) -> None:
    o = opts(tmp_path, trigger_word="sks")
    rng = random.Random(0)
    assert process_caption("a dog, grass", o, rng) == "sks, a dog, grass"
    assert process_caption("photo of SKS dog", o, rng) == "photo of SKS dog"
    assert process_caption("sks, a dog", o, rng) == "sks, a dog"
    assert process_caption("tasks list", o, rng) == "sks, tasks list"  # not a whole word
    assert process_caption("", o, rng) == "sks"
    assert process_caption(None, o, rng) == "sks"
    assert process_caption("  plain  ", opts(tmp_path), rng) == "plain"
    assert contains_trigger("my c++ thing", "c++")


def test_static_captions_keep_prose_untouched(tmp_path: Path) -> None:
    caption = "A cat,sitting on a mat ,  at dusk"
    assert process_caption(caption, opts(tmp_path), random.Random(1)) == caption


def test_shuffle_keeps_tokens_and_is_seeded(tmp_path: Path) -> None:
    o = opts(tmp_path, shuffle_caption=True, keep_tokens=2, trigger_word="sks")
    caption = "mychar, solo, red hair, smile, outdoors, hat, blue sky, tree"
    results = [process_caption(caption, o, random.Random(seed)) for seed in range(40)]
    for result in results:
        tags = result.split(", ")
        assert tags[:3] == ["sks", "mychar", "solo"]
        assert sorted(tags[3:]) == sorted(["red hair", "smile", "outdoors", "hat", "blue sky", "tree"])
    assert len(set(results)) > 10
    assert process_caption(caption, o, random.Random(7)) == process_caption(caption, o, random.Random(7))


def test_caption_dropout_rate(tmp_path: Path) -> None:
    o = opts(tmp_path, caption_dropout_rate=0.3, trigger_word="sks")
    rng = random.Random(123)
    dropped = sum(process_caption("a, b", o, rng) == "" for _ in range(4000))
    assert 0.27 < dropped / 4000 < 0.33


def test_tag_dropout_spares_kept_tokens_and_trigger(tmp_path: Path) -> None:
    o = opts(tmp_path, caption_tag_dropout_rate=0.5, keep_tokens=1, trigger_word="sks")
    rng = random.Random(99)
    caption = "first, a, b, c, d, sks style, e, f, g, h"
    survivors: Counter[str] = Counter()
    for _ in range(2000):
        tags = process_caption(caption, o, rng).split(", ")
        assert tags[0] == "first" and "sks style" in tags
        survivors.update(tags)
    for tag in "abcdefgh":
        assert 0.45 < survivors[tag] / 2000 < 0.55
    everything = opts(tmp_path, caption_tag_dropout_rate=1.0, keep_tokens=1)
    assert process_caption("keep, x, y", everything, random.Random(0)) == "keep"


def test_tag_frequency_per_group(tmp_path: Path) -> None:
    def rec(caption: str | None, group: str) -> ImageRecord:
        return ImageRecord(tmp_path / "x.png", caption, 10, group, 64, 64)

    records = [rec("Red Hair, smile", "10_mychar"), rec("red hair , hat,", "10_mychar"), rec(None, "10_mychar"),
               rec("sky", "1_bg")]
    assert tag_frequency(records) == {"10_mychar": {"red hair": 2, "smile": 1, "hat": 1}, "1_bg": {"sky": 1}}
    assert top_tags(records, 2) == [("red hair", 2), ("hat", 1)]
