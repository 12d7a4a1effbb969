"""The CLIP BPE tokenizer, built offline from the vocabulary a PyPI package ships (docs/lora-format.md §4b).

No PyPI package ships CLIP's HF-format `vocab.json`/`merges.txt`, but open-clip-torch (and clip-anytorch) ship the
original `bpe_simple_vocab_16e6.txt.gz`. We rebuild the HF files from it once into a cache folder and load them with
`CLIPTokenizer.from_pretrained` (in transformers 5, `CLIPTokenizer(vocab_file=…)` silently builds a broken tokenizer).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from .errors import MissingDependencyError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# Packages known to ship the file; located with find_spec, never imported (open_clip drags in torchvision).
VOCAB_PACKAGES = ("open_clip", "clip")
VOCAB_SIZE = 49408
# CLIP-L pads with <|endoftext|>; OpenCLIP ViT-H / bigG (SD2, SDXL's second encoder) pad with "!" (id 0).
PAD_TOKENS = {"clip-l": "<|endoftext|>", "open-clip": "!"}


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "loraloop"


def find_bpe_vocab() -> Path:
    """Path of `bpe_simple_vocab_16e6.txt.gz` inside an installed package.

    Raise with the install command if none has it.
    """
    for package in VOCAB_PACKAGES:
        spec = importlib.util.find_spec(package)
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(location) / VOCAB_FILE
            if candidate.is_file():
                return candidate
    msg = (f"the CLIP tokenizer vocabulary ({VOCAB_FILE}) was not found in any of the packages {VOCAB_PACKAGES}; "
           "install it with: pip install --no-deps open-clip-torch")
    raise MissingDependencyError(msg)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def build_vocab(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) exactly as CLIP builds them: 256 bytes, 256 `</w>` bytes, one token per merge, 2 specials."""
    lines = gzip.decompress(bpe_gz.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # CLIP keeps the first 48,894 merges
    pairs = [tuple(m.split()) for m in merges]
    tokens = list(_bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(p) for p in pairs]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer_files(folder: Path, pad: str) -> None:
    """Write vocab.json, merges.txt and tokenizer configs into `folder` (atomically: a temp folder renamed)."""
    vocab, merges = build_vocab(find_bpe_vocab())
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp"))
    try:
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        config = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                  "pad_token": pad, "model_max_length": 77, "do_lower_case": True,
                  "tokenizer_class": "CLIPTokenizer"}
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
        (tmp / "special_tokens_map.json").write_text(json.dumps(
            {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}), encoding="utf-8")
        try:
            tmp.replace(folder)
        except OSError:  # another process won the race, or a stale folder exists: keep the existing one
            if not (folder / "vocab.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tokenizer_dir(kind: str = "clip-l", cache_dir: Path | None = None) -> Path:
    """A folder `CLIPTokenizer.from_pretrained` can load, built on first use. `kind`: `clip-l` or `open-clip`."""
    folder = (cache_dir or default_cache_dir()) / f"tokenizer-{kind}"
    if not (folder / "tokenizer_config.json").is_file():
        write_tokenizer_files(folder, PAD_TOKENS[kind])
    return folder


@lru_cache(maxsize=4)
def load_clip_tokenizer(kind: str = "clip-l", cache_dir: Path | None = None):  # noqa: ANN201 - transformers type
    """An offline `CLIPTokenizer` for CLIP-L (`clip-l`) or OpenCLIP ViT-H/bigG (`open-clip`)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(tokenizer_dir(kind, cache_dir)), local_files_only=True)
