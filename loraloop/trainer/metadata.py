"""The `ss_*` (kohya) and `modelspec.*` (SAI ModelSpec) metadata written into every LoRA file (lora-format.md §1.5)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .families import Family
from .network import NetworkSpec


@dataclass
class RunInfo:
    """Facts about a run that the metadata records, besides the config."""

    started_at: float = field(default_factory=time.time)
    steps: int = 0
    epoch: int = 0
    num_images: int = 0
    num_batches_per_epoch: int = 0
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    bucket_info: dict = field(default_factory=dict)
    model_name: str = ""
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    changes: list[str] = field(default_factory=list)  # automatic adjustments made during the run (OOM ladder …)


# Config values that are paths on the trainer's machine: a shared LoRA keeps only their last part.
_PATH_KEYS = ("base_model", "train_data_dir", "metadata_path", "output_dir", "logging_dir", "resume_lora")


def shareable_config(config: dict) -> dict:
    """The config without the machine's folder structure (user names, drive layouts)."""
    from pathlib import PurePath

    return {k: (PurePath(v).name if k in _PATH_KEYS and isinstance(v, str) and v else v) for k, v in config.items()}


def _s(value: object) -> str:
    return "None" if value is None else str(value)


def build_metadata(*, family: Family, spec: NetworkSpec, run: RunInfo, config: dict, output_name: str,
                   trigger_words: list[str] | None = None, prediction_type: str | None = None) -> dict[str, str]:
    """kohya's metadata for the run, plus ModelSpec and our effective config (all values are strings)."""
    v_pred = (prediction_type or config.get("prediction_type") or family.prediction_type) == "v_prediction"
    res = int(config.get("resolution", family.resolution))
    finished = time.time()
    meta = {
        "ss_session_id": run.session_id,
        "ss_training_started_at": _s(run.started_at),
        "ss_training_finished_at": _s(finished),
        "ss_output_name": output_name,
        "ss_sd_model_name": run.model_name,
        "ss_base_model_version": family.ss_base_model_version,
        "ss_v2": _s(family.is_v2),
        "ss_v_parameterization": _s(v_pred),
        "ss_network_module": spec.kohya_module,
        "ss_network_dim": _s(spec.rank),
        "ss_network_alpha": _s(spec.alpha),
        "ss_network_dropout": _s(spec.dropout),
        "ss_network_args": json.dumps(spec.kohya_args()),
        "ss_learning_rate": _s(config.get("learning_rate")),
        "ss_unet_lr": _s(config.get("learning_rate")),
        "ss_text_encoder_lr": _s(config.get("text_encoder_lr") or config.get("learning_rate")),
        "ss_num_train_images": _s(run.num_images),
        "ss_num_batches_per_epoch": _s(run.num_batches_per_epoch),
        "ss_num_epochs": _s(config.get("epochs")),
        "ss_epoch": _s(run.epoch),
        "ss_steps": _s(run.steps),
        "ss_max_train_steps": _s(config.get("max_train_steps")),
        "ss_batch_size_per_device": _s(config.get("batch_size")),
        "ss_gradient_accumulation_steps": _s(config.get("accumulation_steps")),
        "ss_gradient_checkpointing": _s(config.get("gradient_checkpointing")),
        "ss_lr_scheduler": _s(config.get("lr_scheduler")),
        "ss_lr_warmup_steps": _s(config.get("lr_warmup_steps")),
        "ss_optimizer": _s(config.get("optimizer")),
        "ss_max_grad_norm": _s(config.get("max_grad_norm")),
        "ss_mixed_precision": _s(config.get("mixed_precision")),
        "ss_full_fp16": "False",
        "ss_seed": _s(config.get("seed")),
        "ss_min_snr_gamma": _s(config.get("min_snr_gamma")),
        "ss_noise_offset": _s(config.get("noise_offset")),
        "ss_cache_latents": _s(config.get("cache_latents")),
        "ss_caption_dropout_rate": _s(config.get("caption_dropout_rate")),
        "ss_caption_tag_dropout_rate": _s(config.get("caption_tag_dropout_rate")),
        "ss_keep_tokens": _s(config.get("keep_tokens")),
        "ss_shuffle_caption": _s(config.get("shuffle_caption")),
        "ss_flip_aug": _s(config.get("flip_aug")),
        "ss_resolution": f"({res}, {res})",
        "ss_clip_skip": _s(config.get("clip_skip")),
        "ss_tag_frequency": json.dumps(run.tag_frequency, ensure_ascii=False),
        "ss_dataset_dirs": json.dumps(run.dataset_dirs, ensure_ascii=False),
        "ss_bucket_info": json.dumps(run.bucket_info),
        "ss_training_comment": _s(config.get("training_comment") or ""),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.title": output_name,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.date": datetime.fromtimestamp(finished, tz=timezone.utc).isoformat(timespec="seconds"),
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
        "loraloop_config": json.dumps(shareable_config(config), default=str, sort_keys=True),
        "loraloop_changes": json.dumps(run.changes),
    }
    if trigger_words:
        meta["modelspec.trigger_phrase"] = ", ".join(trigger_words)
    return meta
