"""The training config: one typed dataclass whose field metadata is the single source of help text, ranges and choices.

Keys follow the origin article (`lora_rank`, `accumulation_steps`, …); kohya/lora-scripts names are accepted as aliases.
`validate()` never mutates: it raises one `ConfigError` listing every bad key at once, each with its value, what is
allowed and, for a typo, the nearest valid key. Settings that follow others (the bucket limits follow `resolution`)
default to None and are resolved in `bucket_limits()`; `to_dict()` shows the resolved numbers.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NoReturn

from .errors import ConfigError

log = logging.getLogger(__name__)


def _f(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
       max: float | None = None, group: str = "training") -> Any:
    meta = {"help": help, "choices": choices, "min": min, "max": max, "group": group}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "lion")
SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_restarts")
PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = ("fp16", "bf16", "fp32")
# Keys the memory planner may choose (`auto` lists them). A fact about config keys, so it lives here; the planner and
# the hosts import it from this module.
PLANNABLE = ("batch_size", "accumulation_steps", "lora_rank", "resolution", "gradient_checkpointing",
             "cache_latents", "cache_text_encoder_outputs", "optimizer", "mixed_precision", "blocks_to_swap")
BUCKET_KEYS = ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs. Field metadata (`help`, `choices`, `min`, `max`) feeds CLI help, node tooltips and
    UIs."""

    # model
    base_model: str = _f("builtin:tiny-sd1", "Checkpoint (.safetensors/.ckpt) of SD 1.x/2.x/XL, a diffusers folder "
                         "(also Flux.1 and SD3/3.5), or a built-in model: builtin:demo-base, builtin:tiny-sd1, "
                         "builtin:tiny-sdxl, builtin:tiny-flux1, builtin:tiny-sd3.", group="model")
    components_from: str | None = _f(None, "For a single-file Flux.1/SD3 transformer (flux1-dev.safetensors, a "
                                     "fine-tune): that family's diffusers folder, which supplies the text encoders, "
                                     "their tokenizers and the VAE.", group="model")
    base_weight_dtype: str = _f("model", "Storage of the frozen base weights: model (as loaded / as the host holds "
                                "them), fp8 (the denoiser's adapted Linears stored as float8_e4m3fn and computed in "
                                "the training precision per layer: half the memory of bf16) or auto (fp8 when the "
                                "memory plan then streams fewer blocks or fits where model does not); command line "
                                "only, hosts keep their own dtype.", choices=("model", "fp8", "auto"), group="model")
    family: str | None = _f(None, "Model family when it cannot be detected: sd1, sd2, sd2-v, sdxl, flux1, sd3, ….",
                            choices=(None, "sd1", "sd2", "sd2-v", "sdxl", "flux1", "flux1-schnell", "chroma", "sd3",
                                     "zimage", "lumina2", "qwen-image"), group="model")
    prediction_type: str | None = _f(None, "Override the model's prediction type (SD2 768-v: v_prediction; flow is "
                                     "what Flux/SD3/… families use and cannot be switched).",
                                     choices=(None, "epsilon", "v_prediction", "flow"), group="model")
    # data
    train_data_dir: str | None = _f(None, "Folder of training images (captions as .txt/.caption sidecars, "
                                    "metadata.csv or metadata.jsonl).", group="data")
    metadata_path: str | None = _f(None, "CSV with header filename,prompt (or .jsonl) holding the captions.",
                                   group="data")
    recursive: bool = _f(False, "Also read images in sub-folders.", group="data")
    caption_extension: str = _f(".txt", "Extension of caption sidecar files.", group="data")
    trigger_word: str = _f("", "Word prepended to every caption (e.g. your style or character token).", group="data")
    resolution: int = _f(512, "Training resolution (pixels per side of the target area).", min=64, max=4096,
                         group="data")
    enable_bucket: bool = _f(True, "Aspect-ratio bucketing (kohya-compatible).", group="data")
    min_bucket_reso: int | None = _f(None, "Smallest bucket side; default: from resolution (256 at 256 px and up, "
                                     "half the resolution below).", min=16, max=4096, group="data")
    max_bucket_reso: int | None = _f(None, "Largest bucket side; default: from resolution (max(1024, 2 x "
                                     "resolution)).", min=16, max=8192, group="data")
    bucket_reso_steps: int | None = _f(None, "Bucket side step; default: from resolution (64 at 256 px and up, "
                                       "finer below).", min=8, max=256, group="data")
    random_crop: bool = _f(False, "Random instead of center crops.", group="data")
    flip_aug: bool = _f(False, "Random horizontal flips.", group="data")
    shuffle_caption: bool = _f(False, "Shuffle comma-separated tags (after keep_tokens).", group="data")
    keep_tokens: int = _f(0, "Leading tags kept in place when shuffling.", min=0, max=255, group="data")
    caption_dropout_rate: float = _f(0.0, "Probability of training a sample with an empty caption.", min=0.0, max=1.0,
                                     group="data")
    caption_tag_dropout_rate: float = _f(0.0, "Probability of dropping each tag.", min=0.0, max=1.0, group="data")
    cache_latents: bool = _f(True, "Encode images once with the VAE and keep the latents (the VAE can then leave "
                             "the GPU).", group="data")
    cache_latents_to_disk: bool = _f(False, "Also keep cached latents on disk, keyed by image content.",
                                     group="data")
    cache_text_encoder_outputs: bool = _f(True, "Encode each caption once and keep the text conditioning (the text "
                                          "encoders can then leave the GPU). Needs static captions and a frozen "
                                          "text encoder; otherwise text is encoded every step.", group="data")
    # network
    network_type: str = _f("lora", "lora, locon (LoRA + 3x3 convs), loha or lokr.",
                           choices=("lora", "locon", "loha", "lokr"), group="network")
    lora_rank: int = _f(8, "Adapter rank: 4 for styles, 8-16 for characters.", min=1, max=1024, group="network")
    lora_alpha: float | None = _f(None, "Adapter alpha (update scaled by alpha/rank); default: equal to lora_rank.",
                                  min=0.0, max=4096, group="network")
    lora_dropout: float = _f(0.0, "Dropout on the adapter input.", min=0.0, max=0.9, group="network")
    conv_rank: int | None = _f(None, "Rank of 3x3 ResNet convs (LoCon); default: lora_rank.", min=1, max=1024,
                               group="network")
    conv_alpha: float | None = _f(None, "Alpha of 3x3 ResNet convs; default: lora_alpha.", min=0.0, max=4096,
                                  group="network")
    dynamic_rank: float | None = _f(None, "Rank chosen per module at every save: train at lora_rank, then keep in "
                                    "each module the smallest rank holding this share of its update's singular-value "
                                    "energy (0.9-0.99; lora/locon). Smaller files; resuming continues at lora_rank. "
                                    "None: off.", min=0.1, max=1.0, group="network")
    # RUF009: `_f` returns a dataclasses.field (a default_factory for lists), so no instance is shared.
    target_modules: list[str] | None = _f(None, "Only adapt modules whose names end with these (e.g. [to_q, to_v]); "  # noqa: RUF009
                                          "default: kohya's targets.", group="network")
    train_text_encoder: bool = _f(False, "Also train LoRA on the text encoder(s).", group="network")
    text_encoder_lr: float | None = _f(None, "Learning rate of text-encoder adapters; default: learning_rate.",
                                       min=0.0, max=1.0, group="network")
    resume_lora: str | None = _f(None, "A LoRA file to continue training from.", group="network")
    # optimisation
    batch_size: int = _f(1, "Images per step.", min=1, max=256)
    accumulation_steps: int = _f(1, "Steps whose gradients are summed before an optimizer step "
                                 "(effective batch = batch_size x accumulation_steps).", min=1, max=1024)
    epochs: int = _f(10, "Passes over the dataset (ignored when max_train_steps is set).", min=1, max=100000)
    max_train_steps: int | None = _f(None, "Optimizer steps to train; overrides epochs.", min=1, max=10_000_000)
    learning_rate: float = _f(1e-4, "Base learning rate.", min=0.0, max=1.0)
    lr_scheduler: str = _f("cosine", "Learning-rate schedule after warmup.", choices=SCHEDULERS)
    lr_warmup_steps: int = _f(0, "Linear warmup steps.", min=0, max=10_000_000)
    lr_num_cycles: int = _f(1, "Restarts of cosine_with_restarts.", min=1, max=1000)
    optimizer: str = _f("adamw", "adamw; adamw8bit (8-bit state: bitsandbytes when installed, else LoRA Loop's "
                        "pure-torch one), prodigy (prodigyopt), lion (lion-pytorch).", choices=OPTIMIZERS)
    weight_decay: float = _f(0.01, "AdamW/Lion weight decay.", min=0.0, max=1.0)
    max_grad_norm: float | None = _f(1.0, "Clip the gradient norm (None/0: off).", min=0.0, max=1e6)
    mixed_precision: str = _f("no", "Compute precision of the frozen model: no (fp32), fp16 (with loss scaling), "
                              "bf16.", choices=PRECISIONS)
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward (saves memory, ~20-30% slower).")
    blocks_to_swap: int = _f(0, "Transformer blocks (Flux, SD3.5, Z-Image, Qwen-Image, Chroma, Lumina 2) kept in "
                             "host memory and streamed to the GPU one block ahead of use, so a model bigger than the "
                             "card trains; slower by the transfer. Turns gradient checkpointing on. auto: the planner "
                             "swaps as few as fit.", min=0, max=1000, group="memory")
    min_snr_gamma: float | None = _f(None, "Min-SNR-gamma loss weighting (5 is typical; None: off).", min=0.1,
                                     max=100.0)
    timestep_sampling: str = _f("logit_normal", "Flow models (Flux, SD3.5, Z-Image, Lumina 2, Qwen-Image, Chroma): "
                                "how the noise level is drawn before the model's own time shift: logit_normal "
                                "(SD3 paper, kohya's sigmoid; favours mid noise) or uniform (ComfyUI's trainer). "
                                "SD1/SD2/SDXL ignore it.", choices=("logit_normal", "uniform"))
    target_preset: str = _f("default", "Which layers get adapters: default (what kohya/musubi-tuner train for the "
                            "family: attention and MLP Linears of the blocks) or attention (attention projections "
                            "only: smaller, gentler).", choices=("default", "attention"), group="network")
    noise_offset: float = _f(0.0, "Noise offset (0.05-0.1 helps very dark/bright images).", min=0.0, max=1.0)
    seed: int = _f(42, "Random seed (runs are reproducible for a seed on CPU).", min=0, max=2**32 - 1)
    # output
    output_dir: str = _f("outputs", "Folder for the LoRA, the loss plot and samples.", group="output")
    output_name: str = _f("my_lora", "File name of the LoRA (without .safetensors).", group="output")
    save_precision: str = _f("fp16", "dtype of the saved tensors.", choices=SAVE_PRECISIONS, group="output")
    overwrite: bool = _f(False, "Replace an existing output file of the same name.", group="output")
    save_every_n_steps: int | None = _f(None, "Also save every N steps.", min=1, max=10_000_000, group="output")
    save_every_n_epochs: int | None = _f(None, "Also save every N epochs.", min=1, max=100000, group="output")
    save_last_n: int | None = _f(None, "Keep only the last N intermediate saves.", min=1, max=100000, group="output")
    sample_prompts: list[str] = _f([], "Prompts for sample images.", group="output")  # noqa: RUF009
    sample_every_n_steps: int | None = _f(None, "Make sample images every N steps.", min=1, max=10_000_000,
                                          group="output")
    sample_steps: int = _f(20, "Denoising steps of sample images.", min=1, max=200, group="output")
    sample_cfg: float = _f(7.0, "Classifier-free guidance scale of sample images.", min=0.0, max=50.0,
                           group="output")
    logging_dir: str | None = _f(None, "TensorBoard log folder (needs tensorboard installed).", group="output")
    # memory planning
    auto: list[str] = _f(list(("batch_size", "accumulation_steps", "gradient_checkpointing", "cache_latents",  # noqa: RUF009
                               "cache_text_encoder_outputs", "blocks_to_swap")),
                         "Settings the memory planner may choose so the run fits the free VRAM. Writing `key: auto` "
                         "adds a key; giving a key a value takes it out. The default changes only how the work is "
                         "done, not what is learned (micro-batch chunks keep batch x accumulation).", group="memory")
    vram_budget_gb: float | None = _f(None, "Plan for this much free accelerator memory instead of measuring it.",
                                      min=0.5, max=1024.0, group="memory")
    memory_margin: float = _f(0.1, "Share of the free memory the planner keeps in reserve.", min=0.0, max=0.5,
                              group="memory")

    # -- derived values -----------------------------------------------------------------------------------------
    @property
    def alpha(self) -> float:
        return float(self.lora_rank if self.lora_alpha is None else self.lora_alpha)

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.accumulation_steps

    def can_cache_text(self, captions_static: bool = True) -> bool:
        """Whether text-encoder outputs can be cached: captions never change (no shuffle or dropout here, and
        `captions_static` as the dataset says) and no text encoder is trained (its output changes every step)."""
        return (captions_static and not self.train_text_encoder and not self.shuffle_caption
                and self.caption_dropout_rate == 0 and self.caption_tag_dropout_rate == 0)

    def bucket_limits(self) -> dict[str, int]:
        """min/max_bucket_reso and bucket_reso_steps as the run uses them: the user's values, the unset ones derived
        from `resolution` (and from an explicit bucket_reso_steps)."""
        derived = bucket_defaults(self.resolution, self.bucket_reso_steps)
        return {k: derived[k] if getattr(self, k) is None else getattr(self, k) for k in BUCKET_KEYS}

    def to_dict(self) -> dict[str, Any]:
        """Every key with its effective value (derived settings resolved): the saved YAML, metadata, `--explain`."""
        return {**asdict(self), **self.bucket_limits()}

    def problems(self) -> list[ConfigError]:
        """Every out-of-range or inconsistent value, one `ConfigError` each (empty: the config is valid)."""
        found = [p for f in fields(self) if (p := _check_field(f.name, getattr(self, f.name), f.metadata))]
        bad = {p.key for p in found}
        if self.enable_bucket and "resolution" not in bad:  # without buckets the limits are unused
            step = None if "bucket_reso_steps" in bad else self.bucket_reso_steps
            found += [p for p in bucket_problems(self.resolution, self.min_bucket_reso, self.max_bucket_reso, step)
                      if p.key not in bad]
        unknown = [k for k in self.auto if k not in PLANNABLE]
        if unknown:
            found.append(ConfigError(f"`auto` may only hold {list(PLANNABLE)} (got {unknown}): remove "
                                     f"{', '.join(unknown)} from it", key="auto", value=unknown, allowed=PLANNABLE))
        if self.dynamic_rank is not None and self.network_type in ("loha", "lokr"):
            found.append(ConfigError(f"`dynamic_rank` cuts the rank of lora/locon modules; a {self.network_type} "
                                     "update is no up·down product to cut. Set network_type lora or locon, or remove "
                                     "dynamic_rank", key="dynamic_rank", value=self.dynamic_rank))
        if self.random_crop and self.cache_latents:
            found.append(ConfigError("`random_crop` cannot be combined with `cache_latents` (a cached latent has one "
                                     "fixed crop); set cache_latents: false or random_crop: false", key="random_crop",
                                     value=True))
        return found

    def validate(self) -> TrainConfig:
        """Raise one `ConfigError` listing every out-of-range or inconsistent value; return self."""
        raise_problems(self.problems())
        return self


class ConfigProblems(ConfigError):
    """Several bad values found together. `problems` holds one `ConfigError` per bad key, in the order found;
    `key`, `value` and `allowed` are the first one's, so a front end that highlights one field still can."""

    def __init__(self, problems: list[ConfigError], source: str | None = None) -> None:
        first = problems[0]
        if len(problems) == 1:
            text = str(first)
        else:
            where = f" in {source}" if source else ""
            text = f"{len(problems)} settings{where} need fixing:\n" + "\n".join(f"  - {p}" for p in problems)
        super().__init__(text, key=first.key, value=first.value, allowed=first.allowed)
        self.problems = problems


def raise_problems(problems: list[ConfigError], source: str | None = None) -> None:
    """Raise every problem at once (nothing when the list is empty)."""
    if problems:
        raise ConfigProblems(problems, source)


def bucket_defaults(resolution: int, step: int | None = None) -> dict[str, int]:
    """The bucket settings a resolution implies: kohya's for 256 px and up (64-px steps, sides 256..max(1024, 2·res)),
    finer ones for the tiny sizes tests use (a step of 1/8 of the side, sides res/2..2·res). With `step` (the user's
    bucket_reso_steps) the sides are rounded onto it, so derived values always fit the ones the user set."""
    if step is None or step < 1:  # no step, or one the range check rejects: derive it
        step = 64 if resolution >= 256 else max(8, resolution // 64 * 8)
    low, high = (256, max(1024, 2 * resolution)) if resolution >= 256 else (resolution // 2, 2 * resolution)
    return {"resolution": resolution, "bucket_reso_steps": step, "min_bucket_reso": max(step, low // step * step),
            "max_bucket_reso": -(-high // step) * step}


def bucket_problems(resolution: int, min_reso: int | None, max_reso: int | None,
                    step: int | None) -> list[ConfigError]:
    """What contradicts `resolution` among the bucket limits the user set (None: derived, which always fits). Each
    message names the value to change, to what, and what leaving it unset would give."""
    found: list[ConfigError] = []
    derived = bucket_defaults(resolution, step)
    unset = {**derived, "bucket_reso_steps": bucket_defaults(resolution)["bucket_reso_steps"]}

    def add(key: str, value: int, wrong: str, fix: str) -> None:
        found.append(ConfigError(f"`{key}` {value} {wrong}: set {key} to {fix}, or leave it unset (then {unset[key]})",
                                 key=key, value=value, allowed=fix))

    def nearest(value: int, unit: int, low: int, high: int) -> str:
        below, above = value // unit * unit, -(-value // unit) * unit
        options = [v for v in (below, above) if low <= v <= high]
        return " or ".join(map(str, options)) if options else f"a multiple of {unit} from {low} to {high}"

    if step is not None:
        if step % 8:
            add("bucket_reso_steps", step, "is not a multiple of 8 (the VAE's pixels per latent)",
                nearest(step, 8, 8, 256))
            return found  # the other limits are measured in steps: judge them once the step is right
        if step > resolution:
            add("bucket_reso_steps", step, f"is above `resolution` {resolution}", f"{resolution // 8 * 8} or less")
            return found
    of_step = f"`bucket_reso_steps` {derived['bucket_reso_steps']}" + (
        "" if step is not None else f" (derived from `resolution` {resolution})")
    step = derived["bucket_reso_steps"]
    if min_reso is not None:
        if min_reso > resolution:
            add("min_bucket_reso", min_reso, f"is above `resolution` {resolution}",
                f"{max(step, resolution // step * step)} or less")
        elif min_reso < step:
            add("min_bucket_reso", min_reso, f"is below {of_step}", f"{step} or more")
        elif min_reso % step:
            add("min_bucket_reso", min_reso, f"is not a multiple of {of_step}",
                nearest(min_reso, step, step, resolution))
    if max_reso is not None:
        if max_reso < resolution:
            add("max_bucket_reso", max_reso, f"is below `resolution` {resolution}",
                f"{-(-resolution // step) * step} or more")
        elif max_reso % step:
            add("max_bucket_reso", max_reso, f"is not a multiple of {of_step}",
                nearest(max_reso, step, resolution, 8192))
    return found


AUTO = "auto"
# A plannable switch whose host default is AUTO is shown by both hosts as one choice of auto / on / off.
SWITCH_CHOICES = (AUTO, "on", "off")
SWITCH_VALUES = {"on": True, "off": False}
# Where a host (ComfyUI node, A1111 tab) holds the model, these defaults differ from the CLI's. Both front ends use
# this one table so they cannot drift.
HOST_DEFAULTS: dict[str, Any] = {
    "resolution": 0,  # 0 = the family's native size: 512 SD1/SD2, 768 SD2-v, 1024 SDXL
    "mixed_precision": AUTO,  # follow the loaded model's dtype (hosts load fp16/bf16 on GPUs)
    "gradient_checkpointing": AUTO,  # the memory planner decides: off (faster) when the free memory allows
    "max_train_steps": 500,  # a run started from a UI should end; 0 trains `epochs` instead
}


# kohya sd-scripts / lora-scripts names → ours. A value of None means "known, not used by LoRA Loop" (listed once).
ALIASES: dict[str, str | None] = {
    "pretrained_model_name_or_path": "base_model", "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "accumulation_steps", "network_dim": "lora_rank", "network_alpha": "lora_alpha",
    "network_dropout": "lora_dropout", "max_train_epochs": "epochs", "optimizer_type": "optimizer",
    "unet_lr": "learning_rate", "lr": "learning_rate", "conv_dim": "conv_rank", "save_model_as": None,
    "save_last_n_epochs": "save_last_n", "save_last_n_steps": "save_last_n", "xformers": None, "sdpa": None,
    "mem_eff_attn": None, "persistent_data_loader_workers": None, "max_data_loader_n_workers": None,
    "caption_extention": "caption_extension", "save_every_n_epochs": "save_every_n_epochs",
    "logging_dir": "logging_dir", "network_train_unet_only": None, "lowram": None, "log_with": None,
}


def _fail(key: str, value: object, msg: str, allowed: object = None) -> NoReturn:
    """A problem that stops reading at once (the file is missing or not a mapping): nothing else can be checked."""
    raise ConfigError(msg, key=key, value=value, allowed=allowed)


def _check_field(name: str, value: Any, meta: Any) -> ConfigError | None:
    """The problem with one field's value against its metadata (choices, range), or None."""
    choices, lo, hi = meta.get("choices"), meta.get("min"), meta.get("max")
    if value is None:
        if choices is not None and None not in choices:
            return ConfigError(f"`{name}` must be one of {list(choices)} (got None)", key=name, value=value,
                               allowed=choices)
        return None
    if choices is not None and value not in choices:
        shown = [c for c in choices if c is not None]
        near = difflib.get_close_matches(str(value), [str(c) for c in shown], n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        return ConfigError(f"`{name}` must be one of {shown} (got {value!r}){hint}", key=name, value=value,
                           allowed=choices)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and lo is not None and not lo <= value <= hi:
        return ConfigError(f"`{name}` must be between {lo:g} and {hi:g} (got {value!r}): set it within that range"
                           f"{_default_hint(name)}", key=name, value=value, allowed=(lo, hi))
    return None


def _default_hint(name: str) -> str:
    value = field_default(name)
    return "" if value is None else f" (default {value})"


def _field_types() -> dict[str, str]:
    return {f.name: str(f.type) for f in fields(TrainConfig)}


def _coerce(key: str, value: Any, type_name: str, source: str) -> Any:
    """YAML/TOML/CLI value → the field's type; raises a `ConfigError` naming key, value, source and what to write."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
        if "None" not in type_name:
            msg = f"`{key}` in {source} may not be empty: give it a value{_default_hint(key)} or remove the line"
            raise ConfigError(msg, key=key, value=value)
        return None
    base = type_name.replace(" | None", "")
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "on"):
                return True
            if str(value).lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if base == "int":
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, bool) or float(number) != int(number):
                raise ValueError
            return int(number)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base == "list[str]":
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return [str(v) for v in value]
        if base == "str":
            return str(value)
    except (TypeError, ValueError, OverflowError):
        kind = {"list[str]": "a list of strings"}.get(base, f"a {base}")
        example = {"bool": "true or false", "int": "a whole number", "float": "a number",
                   "list[str]": "a list like [a, b]"}.get(base, "a value")
        msg = f"`{key}` in {source} must be {kind} (got {value!r}): write {example}{_default_hint(key)}"
        raise ConfigError(msg, key=key, value=value) from None
    return value


def _read_mapping(values: dict[str, Any], source: str, base: TrainConfig | None, sources: dict[str, str] | None,
                  problems: list[ConfigError]) -> TrainConfig:
    """`base` (default: the defaults) updated from a flat mapping; every key that cannot be read is appended to
    `problems` (and keeps its previous value) so that all of them are reported together."""
    types = _field_types()
    updates: dict[str, Any] = {}
    ignored = []
    auto = list((base or TrainConfig()).auto)
    for raw_key, value in values.items():
        key = raw_key.strip().replace("-", "_")
        if key not in types and key in ALIASES:
            if ALIASES[key] is None:
                ignored.append(raw_key)
                continue
            key = ALIASES[key]  # type: ignore[assignment]
        is_auto = isinstance(value, str) and value.strip().lower() == "auto"
        if is_auto and key not in PLANNABLE and key in types:
            problems.append(ConfigError(f"`{raw_key}` in {source} cannot be auto; `auto` is allowed for "
                                        f"{', '.join(PLANNABLE)}", key=raw_key, value=value, allowed=PLANNABLE))
            continue
        if key in PLANNABLE and is_auto:
            auto = [*auto, key] if key not in auto else auto  # `key: auto` hands the key to the planner
            if sources is not None:
                sources[key] = f"{source} (auto)"
            continue
        if key not in types:
            near = difflib.get_close_matches(key, list(types) + list(ALIASES), n=1, cutoff=0.6)
            hint = f"; did you mean `{near[0]}`?" if near else "; run `loraloop config --explain` to list the keys"
            problems.append(ConfigError(f"unknown key `{raw_key}` in {source}{hint}", key=raw_key, value=value))
            continue
        try:
            updates[key] = _coerce(key, value, types[key], source)
        except ConfigError as err:
            problems.append(err)
            continue
        if key in PLANNABLE:
            auto = [k for k in auto if k != key]  # an explicit value is the user's decision
        if sources is not None:
            sources[key] = source
    if ignored:
        log.warning("%s: these keys are not used by LoRA Loop and were ignored: %s", source, ", ".join(sorted(ignored)))
    if "auto" not in updates:
        updates["auto"] = auto
    return replace(base or TrainConfig(), **updates)


def from_mapping(values: dict[str, Any], source: str = "config", base: TrainConfig | None = None,
                 sources: dict[str, str] | None = None) -> TrainConfig:
    """A config from a flat mapping (our keys or kohya aliases). Unknown keys (with the nearest valid key) and values
    of the wrong type are raised together in one `ConfigError`; ranges are checked by `validate()`.

    `sources`, when given, is filled with key → where its value came from (for `config --explain`).
    """
    problems: list[ConfigError] = []
    config = _read_mapping(values, source, base, sources, problems)
    raise_problems(problems, source)
    return config


def load_config(path: str | Path, overrides: dict[str, Any] | None = None,
                sources: dict[str, str] | None = None) -> TrainConfig:
    """Read a config file, apply `overrides` (e.g. CLI flags), validate; every bad value is reported in one error.

    `.yaml`/`.yml`: our format (the origin article's keys, kohya aliases). `.toml`: lora-scripts (both dialects) or
    sd-scripts `--config_file`, translated; foreign keys we do not use are listed in one warning.
    """
    path = Path(path)
    if not path.is_file():
        _fail("config", str(path), f"config file {path} does not exist")
    problems: list[ConfigError] = []
    if path.suffix.lower() == ".toml":
        from .config_formats import from_kohya_toml

        data, ignored, problems = from_kohya_toml(path)
        if ignored:
            log.warning("%s: %d keys are not used by LoRA Loop and were ignored: %s", path, len(ignored),
                        ", ".join(ignored))
    else:
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            _fail("config", str(path), f"{path} is not valid YAML: {err}")
        if not isinstance(data, dict):
            _fail("config", str(path), f"{path} must hold a mapping of key: value pairs (got {type(data).__name__})")
    config = _resolve_relative_paths(_read_mapping(data, str(path), None, sources, problems), path.parent)
    if overrides:
        config = _read_mapping(overrides, "command line", config, sources, problems)
    # A key that could not be read kept its default: its range and consistency checks would only repeat it.
    unreadable = {p.key for p in problems}
    problems += [p for p in config.problems() if p.key not in unreadable]
    raise_problems(sorted(problems, key=_in_order_of(data)), str(path))
    if sources is not None:
        sources.update({k: "derived from resolution" for k in BUCKET_KEYS if getattr(config, k) is None})
    return config


def _in_order_of(data: dict[str, Any]) -> Callable[[ConfigError], int]:
    """Sort key putting problems in the order their keys appear in the file (aliases too); the rest after."""
    order: dict[str, int] = {}
    for i, raw in enumerate(data):
        key = str(raw).strip().replace("-", "_")
        for name in (raw, key, ALIASES.get(key)):
            if name is not None:
                order.setdefault(name, i)
    return lambda problem: order.get(problem.key, len(order))


def _resolve_relative_paths(config: TrainConfig, folder: Path) -> TrainConfig:
    """Paths in a config file are relative to the file's folder when that is where they exist."""
    changes = {}
    for key in ("train_data_dir", "metadata_path", "resume_lora"):
        value = getattr(config, key)
        if value and not Path(value).is_absolute() and not Path(value).exists() and (folder / value).exists():
            changes[key] = str(folder / value)
    base = config.base_model
    if base and not base.startswith("builtin:") and not Path(base).exists() and (folder / base).exists():
        changes["base_model"] = str(folder / base)
    return replace(config, **changes)


def field_default(key: str) -> Any:
    """The default of one config key, as declared on `TrainConfig` (the one place each default is written)."""
    f = TrainConfig.__dataclass_fields__[key]
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]


def field_help() -> dict[str, dict[str, Any]]:
    """key → {default, help, choices, min, max, group}: what CLI help, node tooltips and UIs are built from."""
    out = {}
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        out[f.name] = {"default": default, **f.metadata}
    return out
