"""A tiny random-weight BLIP captioner written to a folder, built offline from configs (no download).

Its text is gibberish (random weights over a made-up vocabulary), but it is a real `BlipForConditionalGeneration`
with a real `BlipProcessor`, saved and loaded the way a downloaded captioning model is. The tokenizer is a BERT
WordPiece one read from a small vocab.txt written here: in transformers 5 `BertTokenizer(vocab_file=…)` ignores the
file (the argument is now `vocab`) and `CLIPTokenizer(vocab_file=…)` builds a broken tokenizer, while
`from_pretrained` on a folder holding vocab.txt works in transformers 4 and 5 alike.
"""

from __future__ import annotations

from pathlib import Path

WORDS = ["a", "an", "the", "with", "on", "cat", "dog", "red", "blue", "ball", "grass", "photo", "of", "and"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
IMAGE_SIZE = 32


def build_tiny_blip(folder: Path, *, seed: int = 0) -> Path:
    """Write a tiny BLIP captioning model (config, weights, processor, tokenizer) into `folder`; returns it."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = Path(folder)
    vocab_dir = folder.parent / f".{folder.name}-vocab"
    vocab_dir.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + WORDS + [f"w{i}" for i in range(34)]
    (vocab_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer.from_pretrained(vocab_dir)
    assert tokenizer("a red cat").input_ids[1:-1] == [vocab.index(w) for w in ("a", "red", "cat")], \
        "the tokenizer did not read vocab.txt"
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
                              tokenizer=tokenizer)
    config = BlipConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": IMAGE_SIZE, "patch_size": 16},
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 64, "pad_token_id": 0,
                     "bos_token_id": vocab.index("[CLS]"), "sep_token_id": vocab.index("[SEP]"),
                     "eos_token_id": vocab.index("[SEP]")},
        projection_dim=32)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
