"""Reading configs users already have: our YAML, lora-scripts' two TOML dialects, sd-scripts' `--config_file` TOML.

* YAML (ours, the origin article's keys): strict — an unknown key is an error with the nearest valid key.
* lora-scripts sectioned TOML (`[model] [dataset] [additional_network] [optimizer] [training] [sample_prompt] [saving]
  [others]`, sd-scripts argument names inside) and sd-scripts `--config_file` TOML (any sections, or none): flattened.
* lora-scripts GUI autosave (flat sd-scripts keys plus `model_train_type`, `positive_prompts`, `sample_width` …).
* sd-scripts `dataset_config` TOML, referenced by `dataset_config = "…"`: the first dataset/subset is used.

Foreign keys we do not use are collected and reported in ONE warning, never silently dropped. Values we cannot
translate are collected too and returned, so that `load_config` reports them with every other bad value at once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .errors import ConfigError

log = logging.getLogger(__name__)

# sd-scripts value spellings → ours
_OPTIMIZERS = {"adamw": "adamw", "adamw8bit": "adamw8bit", "pagedadamw8bit": "adamw8bit", "prodigy": "prodigy",
               "lion": "lion", "lion8bit": "lion"}
_SCHEDULERS = {"constant": "constant", "constant_with_warmup": "constant", "linear": "linear", "cosine": "cosine",
               "cosine_with_restarts": "cosine_with_restarts"}
_PRECISION = {"no": "no", "fp16": "fp16", "bf16": "bf16", "float": "fp32", "fp32": "fp32"}
_DIRECT = {  # sd-scripts key → our key, value kept
    "pretrained_model_name_or_path": "base_model", "train_data_dir": "train_data_dir", "output_dir": "output_dir",
    "output_name": "output_name", "enable_bucket": "enable_bucket", "min_bucket_reso": "min_bucket_reso",
    "max_bucket_reso": "max_bucket_reso", "bucket_reso_steps": "bucket_reso_steps",
    "caption_extension": "caption_extension", "shuffle_caption": "shuffle_caption", "keep_tokens": "keep_tokens",
    "flip_aug": "flip_aug", "random_crop": "random_crop",
    "caption_dropout_rate": "caption_dropout_rate", "caption_tag_dropout_rate": "caption_tag_dropout_rate",
    "cache_latents": "cache_latents", "cache_latents_to_disk": "cache_latents_to_disk",
    "cache_text_encoder_outputs": "cache_text_encoder_outputs", "network_dim": "lora_rank",
    "network_alpha": "lora_alpha", "network_dropout": "lora_dropout", "text_encoder_lr": "text_encoder_lr",
    "learning_rate": "learning_rate", "unet_lr": "learning_rate", "lr_warmup_steps": "lr_warmup_steps",
    "lr_scheduler_num_cycles": "lr_num_cycles", "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "accumulation_steps", "max_train_epochs": "epochs",
    "max_train_steps": "max_train_steps",
    "gradient_checkpointing": "gradient_checkpointing", "seed": "seed", "min_snr_gamma": "min_snr_gamma",
    "noise_offset": "noise_offset", "max_grad_norm": "max_grad_norm", "save_every_n_epochs": "save_every_n_epochs",
    "save_every_n_steps": "save_every_n_steps", "save_last_n_epochs": "save_last_n", "save_last_n_steps": "save_last_n",
    "logging_dir": "logging_dir", "sample_every_n_steps": "sample_every_n_steps", "weight_decay": "weight_decay",
    "resume": None, "training_comment": None, "trigger_word": "trigger_word",
}


def read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10 (A1111's): the same parser is on PyPI as tomli
        try:
            import tomli as tomllib
        except ModuleNotFoundError as err:
            msg = f"reading {path} needs Python 3.11+ or the package tomli (pip install tomli)"
            raise ConfigError(msg, key="config", value=str(path)) from err
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        msg = f"{path} is not valid TOML: {err}"
        raise ConfigError(msg, key="config", value=str(path)) from err


def flatten_sections(data: dict[str, Any]) -> dict[str, Any]:
    """sd-scripts' rule: every table's keys move to the top level (later sections win on a clash)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _network(flat: dict[str, Any], out: dict[str, Any], ignored: list[str], problems: list[ConfigError]) -> None:
    module = str(flat.pop("network_module", "networks.lora"))
    args = flat.pop("network_args", []) or []
    kwargs = dict(str(a).split("=", 1) for a in (args if isinstance(args, list) else [args]) if "=" in str(a))
    algo = kwargs.pop("algo", "lora" if module == "networks.lora" else "locon").lower()
    if module not in ("networks.lora", "lycoris.kohya"):
        ignored.append(f"network_module={module}")
    if algo not in ("lora", "locon", "loha", "lokr"):
        msg = f"network_args algo={algo!r} is not supported; LoRA Loop trains lora, locon, loha and lokr"
        problems.append(ConfigError(msg, key="network_args", value=algo))
        return
    if "conv_dim" in kwargs:
        out["conv_rank"] = int(kwargs.pop("conv_dim"))
        algo = "locon" if algo == "lora" else algo
    if "conv_alpha" in kwargs:
        out["conv_alpha"] = float(kwargs.pop("conv_alpha"))
    if "dropout" in kwargs:
        out["lora_dropout"] = float(kwargs.pop("dropout"))
    out["network_type"] = algo
    ignored += [f"network_args {k}" for k in kwargs]


def _resolution(value: Any) -> int:
    """sd-scripts allows "512", "512,768" or [512, 768]; we train on a square area of the same size."""
    parts = [int(float(p)) for p in (value if isinstance(value, list) else str(value).split(","))]
    width, height = (parts * 2)[:2]
    return int(round((width * height) ** 0.5 / 8) * 8)


def _dataset_config(path: Path, out: dict[str, Any], ignored: list[str], problems: list[ConfigError]) -> None:
    data = read_toml(path)
    general = data.get("general", {})
    datasets = data.get("datasets", [])
    if not datasets:
        return
    first = {**general, **{k: v for k, v in datasets[0].items() if k != "subsets"}}
    subsets = datasets[0].get("subsets", [])
    if subsets:
        first.update(subsets[0])
    if len(datasets) > 1 or len(subsets) > 1:
        ignored.append(f"{path.name}: datasets/subsets after the first")
    if "image_dir" in first:
        out["train_data_dir"] = first.pop("image_dir")
    if "batch_size" in first:
        out["batch_size"] = first.pop("batch_size")
    if "num_repeats" in first and int(first["num_repeats"]) != 1:
        ignored.append(f"num_repeats={first['num_repeats']} (name the folder N_name to repeat its images)")
    first.pop("num_repeats", None)
    _translate(first, out, ignored, path.parent, problems)


def _translate(flat: dict[str, Any], out: dict[str, Any], ignored: list[str], folder: Path,
               problems: list[ConfigError]) -> None:
    flat = dict(flat)
    if "network_module" in flat or "network_args" in flat:
        _network(flat, out, ignored, problems)
    if "unet_lr" in flat:  # sd-scripts: unet_lr overrides learning_rate for the UNet, whatever the order
        flat.pop("learning_rate", None)
    for key, value in flat.items():
        if key in _DIRECT:
            if _DIRECT[key] is not None:
                out[_DIRECT[key]] = value
            else:
                ignored.append(key)
        elif key == "resolution":
            try:
                out["resolution"] = _resolution(value)
            except (TypeError, ValueError):
                msg = f"resolution={value!r} is not a size; write 512, \"512,768\" or [512, 768]"
                problems.append(ConfigError(msg, key="resolution", value=value))
        elif key == "optimizer_type":
            name = _OPTIMIZERS.get(str(value).lower())
            if name is None:
                msg = f"optimizer_type={value!r} is not supported; use one of AdamW, AdamW8bit, Prodigy, Lion"
                problems.append(ConfigError(msg, key="optimizer_type", value=value, allowed=tuple(_OPTIMIZERS)))
            else:
                out["optimizer"] = name
        elif key == "lr_scheduler":
            if str(value) not in _SCHEDULERS:
                ignored.append(f"lr_scheduler={value} (using cosine)")
            out["lr_scheduler"] = _SCHEDULERS.get(str(value), "cosine")
        elif key in ("mixed_precision", "save_precision"):
            out[key] = _PRECISION.get(str(value).lower(), value)
        elif key == "v_parameterization":
            if value:
                out["prediction_type"] = "v_prediction"
        elif key == "v2":
            if value:
                out.setdefault("family", "sd2")
        elif key == "model_train_type":
            kind = str(value).split("-")[0]
            family = {"sd": None, "sdxl": "sdxl"}.get(kind, "?")
            if family == "?":
                msg = f"model_train_type={value!r} is not supported; LoRA Loop trains sd-lora and sdxl-lora"
                problems.append(ConfigError(msg, key="model_train_type", value=value))
            elif family:
                out["family"] = family
        elif key == "network_train_unet_only":
            out["train_text_encoder"] = not bool(value)
        elif key == "positive_prompts" and value:
            out["sample_prompts"] = [p.strip() for p in str(value).split("\n") if p.strip()]
        elif key == "dataset_config" and value:
            _dataset_config(_relative(Path(str(value)), folder), out, ignored, problems)
        else:
            ignored.append(key)


def _relative(path: Path, folder: Path) -> Path:
    return path if path.is_absolute() or path.exists() else folder / path


def from_kohya_toml(path: Path) -> tuple[dict[str, Any], list[str], list[ConfigError]]:
    """(our key → value, ignored foreign keys, values that cannot be translated) from any of the three TOML dialects.
    A file that cannot be parsed at all raises `ConfigError`."""
    out: dict[str, Any] = {}
    ignored: list[str] = []
    problems: list[ConfigError] = []
    _translate(flatten_sections(read_toml(path)), out, ignored, path.parent, problems)
    return out, sorted(set(ignored)), problems
