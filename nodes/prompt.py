"""`<lora:name:0.8>` tags in a prompt: parse them out, apply those LoRAs to MODEL/CLIP clones, encode the rest.

Syntax as in A1111: `<lora:name>` (weight 1), `<lora:name:w>` (UNet and text encoder w), `<lora:name:w_unet:w_te>`.
`name` is a file in models/loras, by its LoraLoader name or its stem; unknown names raise listing close matches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..trainer.errors import ConfigError
from .paths import find_lora

LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::([^:>]*))?>", re.IGNORECASE)


@dataclass(frozen=True)
class LoraTag:
    name: str
    unet: float = 1.0
    te: float = 1.0


def _weight(text: str | None, default: float, tag: str) -> float:
    if text is None or not text.strip():
        return default
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"LoRA weight {text!r} in {tag} is not a number", key="text", value=tag) from None


def parse_lora_tags(text: str) -> tuple[str, list[LoraTag]]:
    """(prompt without the tags, tags in order). Whitespace and commas left behind by a removed tag are tidied."""
    tags = []
    for m in LORA_TAG.finditer(text):
        unet = _weight(m.group(2), 1.0, m.group(0))
        tags.append(LoraTag(m.group(1).strip(), unet, _weight(m.group(3), unet, m.group(0))))
    clean = LORA_TAG.sub("", text)
    clean = re.sub(r"\s*,\s*(,\s*)+", ", ", clean)
    clean = re.sub(r"[ \t]{2,}", " ", clean).strip(" \t,")
    return clean, tags


def apply_lora_tags(model: Any, clip: Any, tags: list[LoraTag]) -> tuple[Any, Any]:
    """MODEL/CLIP clones with each tagged LoRA applied (the inputs are not modified)."""
    import comfy.sd
    import comfy.utils

    for tag in tags:
        lora = comfy.utils.load_torch_file(str(find_lora(tag.name)), safe_load=True)
        model, clip = comfy.sd.load_lora_for_models(model, clip, lora, tag.unet, tag.te)
    return model, clip


def encode(clip: Any, text: str) -> list:
    """CONDITIONING for `text`, as CLIPTextEncode makes it."""
    tokens = clip.tokenize(text)
    if hasattr(clip, "encode_from_tokens_scheduled"):
        return clip.encode_from_tokens_scheduled(tokens)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]
