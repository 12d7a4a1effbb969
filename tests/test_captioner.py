"""Automatic captions: a tiny random-weight BLIP captions a folder end to end (order, files, overwrite rules, the
model's release), the pipeline path for other models, tags and trigger words, and `loraloop caption`."""

import gc
import weakref
from pathlib import Path

import pytest
import torch
from helpers.tiny_captioner import build_tiny_blip
from PIL import Image

from loraloop.cli import main
from loraloop.trainer import captioner as cap
from loraloop.trainer.errors import ConfigError


@pytest.fixture(scope="module")
def blip(tmp_path_factory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("captioners") / "tiny-blip")


def make_folder(root: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, size in sizes.items():
        Image.new("RGB", size, (40 * len(name) % 255, 90, 200)).save(root / name)
    return root


class Recorder:
    """A loader that records every captioner it hands out (to check the release) and the images each batch saw."""

    def __init__(self) -> None:
        self.loaded: list[cap.Captioner] = []
        self.refs: list[weakref.ref] = []
        self.batches: list[int] = []

    def __call__(self, path, **kwargs):
        captioner = cap.load_captioner(path, **kwargs)
        real = captioner.caption
        captioner.caption = lambda images, *a, **k: self.batches.append(len(images)) or real(images, *a, **k)
        self.loaded.append(captioner)
        self.refs.append(weakref.ref(captioner.model))
        return captioner


def test_a_folder_is_captioned_in_order_existing_captions_kept_and_the_model_released(blip, tmp_path):
    folder = make_folder(tmp_path / "ds", {"b.png": (64, 48), "a.jpg": (30, 90), "c.webp": (50, 50),
                                           "d.png": (20, 20), "e.png": (70, 40)})
    (folder / "c.txt").write_text("my own caption\n", encoding="utf-8")
    (folder / "e.caption").write_text("kept too\n", encoding="utf-8")
    loader, steps = Recorder(), []
    result = cap.caption_folder(folder, blip, style="sentence", trigger_word="sks", batch_size=2, device="cpu",
                                max_new_tokens=6, loader=loader, progress=lambda done, total: steps.append((done,
                                                                                                          total)))
    assert [p.name for p in result.captions] == ["a.jpg", "b.png", "d.png"]  # file-name order, no caption yet
    assert loader.batches == [2, 1] and steps == [(2, 3), (3, 3)]
    assert sorted(p.name for p in result.written) == ["a.txt", "b.txt", "d.txt"]
    assert {t.image.name for t in result.kept} == {"c.webp", "e.png"} and not result.skipped and not result.problems
    for path, text in result.captions.items():
        written = (folder / f"{path.stem}.txt").read_text(encoding="utf-8")
        assert written == text + "\n" and text.startswith("sks") and "\n" not in text
    assert (folder / "c.txt").read_text(encoding="utf-8") == "my own caption\n"
    assert not (folder / "e.txt").exists() and not list(folder.glob(".*.tmp"))
    (captioner,) = loader.loaded
    assert not captioner.loaded and captioner.processor is None and captioner.pipeline is None
    gc.collect()
    assert loader.refs[0]() is None, "the released model is still referenced somewhere"
    with pytest.raises(RuntimeError, match="released"):
        captioner.caption([Image.new("RGB", (8, 8))])

    again = cap.caption_folder(folder, blip, device="cpu", loader=(second := Recorder()))
    assert not again.captions and not second.loaded, "nothing to caption: the model is not even loaded"
    tags = cap.caption_folder(folder, blip, style="tags", overwrite=True, device="cpu", max_new_tokens=6,
                              loader=Recorder())
    assert len(tags.captions) == 5 and len(tags.written) == 5 and not tags.kept
    assert (folder / "c.txt").read_text(encoding="utf-8") != "my own caption\n"  # --overwrite replaced it


def test_release_uses_the_hosts_cache_emptier_and_a_with_block_releases(blip):
    calls = []
    with cap.load_captioner(blip, device="cpu", empty_cache=lambda: calls.append("empty")) as captioner:
        assert captioner.kind == "blip" and captioner.dtype == torch.float32 and not captioner.model.training
        texts = captioner.caption([Image.new("RGB", (40, 30), "red"), Image.new("RGB", (10, 60), "blue")],
                                  max_new_tokens=5)
        assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
        ref = weakref.ref(captioner.model)
    assert calls == ["empty"] and not captioner.loaded
    gc.collect()
    assert ref() is None


def test_other_models_run_through_the_image_text_to_text_pipeline(blip):
    """A model that is not BLIP's captioning class goes through transformers' pipeline: prompted with the style's
    question, as a chat when its processor has a chat template (vision-language models do)."""
    import transformers

    captioner = cap._load_pipeline(transformers, blip, "blip", torch.device("cpu"), torch.float32, None)
    images = [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (30, 40), "green"), Image.new("RGB", (9, 9))]
    try:
        assert captioner.kind == "image-text-to-text" and captioner.pipeline is not None
        plain = captioner.caption(images, "tags", max_new_tokens=4)
        assert len(plain) == 3 and not any(cap.PROMPTS["tags"] in t for t in plain)  # the answer only
        captioner.pipeline.processor.chat_template = (
            "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
            "{% endif %}{% endfor %}{% endfor %}")
        chat = captioner.caption(images[:2], "sentence", max_new_tokens=4)
        assert len(chat) == 2 and all(isinstance(t, str) for t in chat)
        ref = weakref.ref(captioner.model)
    finally:
        captioner.release()
    gc.collect()
    assert ref() is None


def test_tags_and_trigger_word():
    assert cap.as_tags("a dog with a red ball on the grass") == "dog, red ball, grass"
    assert cap.as_tags("1girl, Red hair,  smile, red hair\nsmile") == "1girl, Red hair, smile"
    assert cap.format_caption("a cat\nsitting  on a mat", "sentence", "sks") == "sks, a cat sitting on a mat"
    assert cap.format_caption("sks cat on a mat", "tags", "sks") == "sks cat, mat"  # has the trigger already
    assert cap.format_caption("", "tags", "sks") == "sks"
    with pytest.raises(ConfigError, match="style"):
        cap.check_style("prose")


def test_images_captioned_by_a_metadata_file_are_not_given_sidecars(blip, tmp_path):
    folder = make_folder(tmp_path / "ds", {"a.png": (32, 32), "b.png": (32, 32)})
    (folder / "metadata.csv").write_text("filename,prompt\na.png,a square\n", encoding="utf-8")
    result = cap.caption_folder(folder, blip, device="cpu", loader=(loader := Recorder()))
    assert not result.written and not loader.loaded and len(result.skipped) == 2
    assert "metadata.csv" in result.skipped[0].note and "metadata.csv" in result.summary()
    assert not (folder / "a.txt").exists() and not (folder / "b.txt").exists()


def test_a_missing_model_folder_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"captioner model .* not found"):
        cap.load_captioner(tmp_path / "nope")
    (tmp_path / "models" / "blip" / "vision").mkdir(parents=True)
    (tmp_path / "models" / "blip" / "config.json").write_text("{}", encoding="utf-8")
    (tmp_path / "models" / "sub" / "vlm").mkdir(parents=True)
    (tmp_path / "models" / "sub" / "vlm" / "config.json").write_text("{}", encoding="utf-8")
    (tmp_path / "models" / "empty").mkdir()
    assert cap.find_captioners(tmp_path / "models") == ["blip", "sub/vlm"]
    assert cap.find_captioners(tmp_path / "missing") == []


def test_cli_caption(blip, tmp_path, capsys):
    folder = make_folder(tmp_path / "ds", {"x.png": (40, 40), "y.png": (40, 60)})
    (folder / "y.txt").write_text("keep me\n", encoding="utf-8")
    code = main(["caption", str(folder), "--model", str(blip), "--style", "tags", "--trigger-word", "sks",
                 "--device", "cpu", "--max-new-tokens", "5"])
    out = capsys.readouterr()
    assert code == 0 and "wrote 1 caption file(s)" in out.out and "kept 1 existing" in out.out
    assert (folder / "x.txt").read_text(encoding="utf-8").startswith("sks")
    assert (folder / "y.txt").read_text(encoding="utf-8") == "keep me\n"
    assert "captioning" in out.err  # the progress bar
    code = main(["caption", str(folder), "--model", str(blip), "--overwrite", "--device", "cpu",
                 "--max-new-tokens", "5"])
    assert code == 0 and (folder / "y.txt").read_text(encoding="utf-8") != "keep me\n"
    assert main(["caption", str(folder), "--model", str(tmp_path / "none")]) == 2
    assert "error: captioner model" in capsys.readouterr().err
    assert main(["caption", str(tmp_path / "nothing"), "--model", str(blip)]) == 2
