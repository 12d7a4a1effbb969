"""Caption augmentation per sample (kohya's `process_caption` rules, docs/lora-format.md §5) and tag statistics.

Order of operations in `process_caption`, each drawing from the caller's rng only when its setting is on, so a given
(seed, settings) always yields the same captions:
  1. caption dropout: with p = `caption_dropout_rate` the sample trains on "" (unconditional; the trigger word is
     dropped too, as in kohya);
  2. tags: the caption is split on commas; the first `keep_tokens` tags stay in place; the rest are shuffled
     (`shuffle_caption`) and each is dropped with p = `caption_tag_dropout_rate`, except tags containing the trigger
     word. With neither setting on, the caption text is left exactly as written (prose captions stay intact);
  3. trigger word: prepended as its own first tag unless the caption already contains it as a whole word (any case).
     It is not counted in `keep_tokens`, which refers to the caption's own tags.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable

from .options import DatasetOptions
from .sources import ImageRecord


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empty ones dropped."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def contains_trigger(text: str, trigger: str) -> bool:
    """True when `trigger` occurs in `text` as a whole word or phrase, ignoring case (`sks` is not in `tasks`)."""
    if not trigger:
        return False
    return re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", text, flags=re.IGNORECASE) is not None


def process_caption(caption: str | None, options: DatasetOptions, rng: random.Random) -> str:
    """The caption one training sample sees (see the module docstring for the rules and their order)."""
    text = (caption or "").strip()
    if options.caption_dropout_rate > 0 and rng.random() < options.caption_dropout_rate:
        return ""
    trigger = options.trigger_word
    needs_trigger = bool(trigger) and not contains_trigger(text, trigger)
    if options.shuffle_caption or options.caption_tag_dropout_rate > 0:
        tags = split_tags(text)
        kept, rest = tags[: options.keep_tokens], tags[options.keep_tokens :]
        if options.shuffle_caption:
            rng.shuffle(rest)
        if options.caption_tag_dropout_rate > 0:
            rate = options.caption_tag_dropout_rate
            rest = [tag for tag in rest if contains_trigger(tag, trigger) or rng.random() >= rate]
        text = ", ".join(kept + rest)
    if needs_trigger:
        text = f"{trigger}, {text}" if text else trigger
    return text


def captions_are_static(options: DatasetOptions) -> bool:
    """True when `process_caption` is a pure function of the caption, so text-encoder outputs can be cached."""
    return (options.caption_dropout_rate == 0 and not options.shuffle_caption
            and options.caption_tag_dropout_rate == 0)


def tag_frequency(records: Iterable[ImageRecord]) -> dict[str, dict[str, int]]:
    """kohya's `ss_tag_frequency`: {group: {tag: count}}, tags split on ',', stripped and lowercased, once per image."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for record in records:
        if record.caption:
            counts[record.group].update(tag.strip().lower() for tag in record.caption.split(",") if tag.strip())
    return {group: dict(counter) for group, counter in counts.items()}


def top_tags(records: Iterable[ImageRecord], n: int = 20) -> list[tuple[str, int]]:
    """The `n` most frequent tags over all groups (ties by name, so the list is stable)."""
    total: Counter[str] = Counter()
    for tags in tag_frequency(records).values():
        total.update(tags)
    return sorted(total.items(), key=lambda item: (-item[1], item[0]))[:n]
