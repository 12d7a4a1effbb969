"""The one training session every front door runs: finding the LoRA to continue, the OOM advice, cancel names."""

import pytest
import torch

from loraloop.trainer.config import TrainConfig
from loraloop.trainer.errors import ConfigError, LoraFileError
from loraloop.trainer.lorafile import save_lora
from loraloop.trainer.session import cancelled_stem, find_lora_file, initial_lora, oom_error


def test_find_lora_by_path_or_by_name_in_the_host_folders(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    save_lora(folder / "style.safetensors", {"lora_unet_x.alpha": torch.tensor(4.0)}, {})
    assert find_lora_file("style", [folder]) == folder / "style.safetensors"
    assert find_lora_file("style.safetensors", [folder]) == folder / "style.safetensors"
    assert find_lora_file(str(folder / "style.safetensors"), []) == folder / "style.safetensors"
    with pytest.raises(ConfigError, match=r"resume_lora: 'nope' is neither a file nor a LoRA in .*loras") as info:
        find_lora_file("nope", [folder])
    assert info.value.key == "resume_lora"


def test_continuing_a_lora_with_text_encoder_keys_needs_train_text_encoder(tmp_path):
    path = tmp_path / "te.safetensors"
    save_lora(path, {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
                     "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4),
                     "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(4.0)}, {})
    config = TrainConfig(resume_lora=str(path))
    with pytest.raises(LoraFileError, match=r"te\.safetensors also holds text-encoder weights; turn on train_text_enc"):
        initial_lora(config, lambda value: find_lora_file(value, []))


def test_oom_advice_names_only_the_levers_this_run_has():
    err = torch.cuda.OutOfMemoryError("CUDA out of memory")
    lean = TrainConfig(gradient_checkpointing=True, batch_size=1, lora_rank=4, mixed_precision="bf16")
    text = str(oom_error(err, lean, "cuda:0"))
    assert "lower resolution" in text
    for lever in ("gradient_checkpointing", "batch_size", "mixed_precision", "lora_rank"):
        assert lever not in text.split(":", 1)[1].split("(")[0], lever
    heavy = TrainConfig(gradient_checkpointing=False, batch_size=4, lora_rank=32, mixed_precision="no")
    text = str(oom_error(err, heavy, "cuda:0"))
    assert all(lever in text for lever in ("turn on gradient_checkpointing", "lower batch_size (now 4",
                                           "mixed_precision bf16", "lower lora_rank (now 32)"))
    assert "mixed_precision" not in str(oom_error(err, heavy, "cpu"))  # no autocast advice for a CPU run


def test_every_host_names_a_cancel_the_same_way():
    assert cancelled_stem("style", 42) == "style-cancelled-step000042"
