"""The kohya/ModelSpec metadata of a LoRA file: typed from the config, only real values, every key readers use."""

import json

from loraloop.trainer.config import TrainConfig
from loraloop.trainer.families import get_family
from loraloop.trainer.metadata import RunInfo, build_metadata
from loraloop.trainer.network import network_spec

# What kohya's minimum, A1111's classifier and ComfyUI/info viewers read, which the run always knows.
ALWAYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
          "ss_network_args", "ss_output_name", "ss_session_id", "ss_learning_rate", "ss_unet_lr", "ss_steps",
          "ss_epoch", "ss_num_epochs", "ss_batch_size_per_device", "ss_gradient_accumulation_steps",
          "ss_mixed_precision", "ss_optimizer", "ss_seed", "ss_resolution", "ss_tag_frequency", "ss_dataset_dirs",
          "ss_bucket_info", "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation",
          "modelspec.title", "modelspec.resolution", "modelspec.prediction_type", "loraloop_config")


def meta_for(config: TrainConfig, **run) -> dict[str, str]:
    return build_metadata(family=get_family("sd1"), spec=network_spec(config), run=RunInfo(model_name="m", **run),
                          config=config)


def test_only_real_values_are_written():
    """No key the config lacks (clip_skip, training_comment) and no unset value is written as "None"."""
    meta = meta_for(TrainConfig(output_name="style", max_train_steps=None, min_snr_gamma=None, max_grad_norm=None))
    assert "None" not in meta.values()
    for key in ("ss_clip_skip", "ss_training_comment", "ss_max_train_steps", "ss_min_snr_gamma", "ss_max_grad_norm",
                "modelspec.trigger_phrase"):
        assert key not in meta
    assert all(isinstance(v, str) for v in meta.values())
    assert set(ALWAYS) <= set(meta)


def test_set_values_are_written_from_the_typed_config():
    config = TrainConfig(output_name="char", resolution=768, lora_rank=16, max_train_steps=300, min_snr_gamma=5.0,
                         trigger_word="sks", mixed_precision="bf16")
    meta = build_metadata(family=get_family("sd1"), spec=network_spec(config), run=RunInfo(steps=300),
                          config=config, trigger_words=["sks"])
    assert (meta["ss_network_dim"], meta["ss_max_train_steps"], meta["ss_min_snr_gamma"]) == ("16", "300", "5.0")
    assert (meta["ss_resolution"], meta["modelspec.resolution"]) == ("(768, 768)", "768x768")
    assert (meta["ss_output_name"], meta["modelspec.title"]) == ("char", "char")
    assert meta["modelspec.trigger_phrase"] == "sks"
    assert meta["ss_mixed_precision"] == "bf16" and meta["ss_v2"] == "False"
    saved = json.loads(meta["loraloop_config"])
    assert saved["lora_rank"] == 16 and saved["min_bucket_reso"] == 256  # the effective config, derived values resolved


def test_paths_are_reduced_to_their_last_part():
    meta = meta_for(TrainConfig(train_data_dir="/home/alice/data/char", output_dir="/home/alice/out"))
    saved = json.loads(meta["loraloop_config"])
    assert (saved["train_data_dir"], saved["output_dir"]) == ("char", "out")


def test_quick_model_hash_is_kohyas_short_checkpoint_hash(tmp_path):
    import hashlib

    from loraloop.trainer.metadata import quick_model_hash

    data = bytes(range(256)) * (3 * 4096)  # 3 MiB
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    assert quick_model_hash(path) == hashlib.sha256(data[0x100000 : 0x110000]).hexdigest()[:8]
    assert quick_model_hash(tmp_path / "missing.safetensors") == "" and quick_model_hash(None) == ""
