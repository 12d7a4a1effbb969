"""The `ss_*` (kohya) and `modelspec.*` (SAI ModelSpec) metadata written into every LoRA file
(docs/lora-format.md §1.5)."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .config import TrainConfig
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
    model_hash: str = ""  # `quick_model_hash` of the base checkpoint file, when the host knows the file
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    changes: list[str] = field(default_factory=list)  # automatic adjustments made during the run (OOM ladder …)


def quick_model_hash(path: str | Path | None) -> str:
    """The short checkpoint hash kohya writes as `ss_sd_model_hash` and older A1111 showed as the model hash: SHA-256
    of the 64 KiB at offset 1 MiB, first 8 hex digits. Reads 64 KiB, so it costs nothing even for a 20 GB file. Empty
    when there is no such file."""
    if not path:
        return ""
    try:
        with Path(path).open("rb") as fh:
            fh.seek(0x100000)
            return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]
    except OSError:
        return ""


# Config values that are paths on the trainer's machine: a shared LoRA keeps only their last part.
_PATH_KEYS = ("base_model", "train_data_dir", "metadata_path", "output_dir", "logging_dir", "resume_lora")


def shareable_config(config: TrainConfig) -> dict:
    """The effective config without the machine's folder structure (user names, drive layouts)."""
    from pathlib import PurePath

    return {k: (PurePath(v).name if k in _PATH_KEYS and isinstance(v, str) and v else v)
            for k, v in config.to_dict().items()}


def build_metadata(*, family: Family, spec: NetworkSpec, run: RunInfo, config: TrainConfig,
                   output_name: str | None = None, trigger_words: list[str] | None = None,
                   prediction_type: str | None = None) -> dict[str, str]:
    """kohya's metadata for the run, plus ModelSpec and our effective config (all values are strings).

    Only values the run really has are written: a key whose value is unknown or unset (no `clip_skip` setting, no
    step limit, min-SNR off) is left out rather than written as "None", which readers would take for a value.
    """
    v_pred = (prediction_type or config.prediction_type or family.prediction_type) == "v_prediction"
    res = config.resolution or family.resolution
    name = output_name or config.output_name
    finished = time.time()
    values: dict[str, object] = {
        "ss_session_id": run.session_id,
        "ss_training_started_at": run.started_at,
        "ss_training_finished_at": finished,
        "ss_output_name": name,
        "ss_sd_model_name": run.model_name or None,
        "ss_sd_model_hash": run.model_hash or None,
        "ss_base_model_version": family.ss_base_model_version,
        "ss_v2": family.is_v2,
        "ss_v_parameterization": v_pred,
        "ss_network_module": spec.kohya_module,
        "ss_network_dim": spec.rank,
        "ss_network_alpha": spec.alpha,
        "ss_network_dropout": spec.dropout,
        "ss_network_args": json.dumps(spec.kohya_args()),
        "ss_learning_rate": config.learning_rate,
        "ss_unet_lr": config.learning_rate,
        "ss_text_encoder_lr": config.text_encoder_lr or config.learning_rate,
        "ss_num_train_images": run.num_images,
        "ss_num_batches_per_epoch": run.num_batches_per_epoch,
        "ss_num_epochs": config.epochs,
        "ss_epoch": run.epoch,
        "ss_steps": run.steps,
        "ss_max_train_steps": config.max_train_steps,
        "ss_batch_size_per_device": config.batch_size,
        "ss_gradient_accumulation_steps": config.accumulation_steps,
        "ss_gradient_checkpointing": config.gradient_checkpointing,
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": config.lr_warmup_steps,
        "ss_optimizer": config.optimizer,
        "ss_max_grad_norm": config.max_grad_norm,
        "ss_mixed_precision": config.mixed_precision,
        "ss_full_fp16": False,
        "ss_seed": config.seed,
        "ss_min_snr_gamma": config.min_snr_gamma,
        "ss_noise_offset": config.noise_offset,
        "ss_cache_latents": config.cache_latents,
        "ss_caption_dropout_rate": config.caption_dropout_rate,
        "ss_caption_tag_dropout_rate": config.caption_tag_dropout_rate,
        "ss_keep_tokens": config.keep_tokens,
        "ss_shuffle_caption": config.shuffle_caption,
        "ss_flip_aug": config.flip_aug,
        "ss_resolution": f"({res}, {res})",
        "ss_tag_frequency": json.dumps(run.tag_frequency, ensure_ascii=False),
        "ss_dataset_dirs": json.dumps(run.dataset_dirs, ensure_ascii=False),
        "ss_bucket_info": json.dumps(run.bucket_info),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.title": name,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.date": datetime.fromtimestamp(finished, tz=timezone.utc).isoformat(timespec="seconds"),
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
        "modelspec.trigger_phrase": ", ".join(trigger_words) if trigger_words else None,
        "loraloop_config": json.dumps(shareable_config(config), default=str, sort_keys=True),
        "loraloop_changes": json.dumps(run.changes),
    }
    return {k: str(v) for k, v in values.items() if v is not None}
