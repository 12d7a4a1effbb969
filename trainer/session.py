"""One training session, the same for every front door (CLI, ComfyUI, A1111/Forge).

A front door prepares a bundle (the model it holds), a config and a dataset, encodes what it caches, and then hands
over to `TrainingSession`, which owns what used to be rebuilt by each host: finding the LoRA to continue, the run's
facts for the metadata (`RunInfo`), intermediate saves and previews (`PeriodicSaver`), the out-of-memory message, and
what a cancel leaves behind (`<name>-cancelled-stepNNNNNN`, the last completed step). What really differs between
hosts comes in as `SessionHooks`: where a LoRA file goes, how a LoRA name is found, what happens around sampling and
after a save. Progress and cancel requests come through the host's `ProgressSink`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .batches import BatchMaker
from .bundle import ModelBundle
from .config import TrainConfig
from .data import TrainDataset, tag_frequency
from .errors import ConfigError, LoraFileError, OutOfMemory, TrainingInterrupted
from .loop import TrainResult, make_schedule, network_spec, train
from .lorafile import load_lora, save_lora
from .metadata import RunInfo
from .network import NetworkSpec, kohya_keys, spec_from_state_dict, stems_of
from .periodic import PeriodicSaver
from .progress import ProgressSink
from .resize import prune_to_energy
from .state import TrainState

OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})


def cancelled_stem(name: str, steps: int) -> str:
    """The file stem of what a cancel saves: the LoRA as of the last completed optimizer step."""
    return f"{name}-cancelled-step{steps:06d}"


def find_lora_file(value: str, folders: list[Path]) -> Path:
    """`resume_lora` as a path, or as a LoRA name (with or without .safetensors) in one of `folders`."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    for folder in folders:
        for candidate in (folder / value, folder / f"{value}.safetensors"):
            if candidate.is_file():
                return candidate
    where = f" nor a LoRA in {', '.join(str(f) for f in folders)}" if folders else ""
    msg = f"resume_lora: {value!r} is neither a file{where}; give the path of a .safetensors LoRA"
    raise ConfigError(msg, key="resume_lora", value=value)


@dataclass
class SessionHooks:
    """What differs between front doors.

    Args:
        lora_path: a LoRA file stem (`<name>-step000100`, `<name>-cancelled-step000042`) → the path it is written to.
        find_lora: a `resume_lora` value → the file (a path, or a name the host resolves in its LoRA folders).
        samples_dir: where sample grids of `sample_every_n_steps` are kept (None: only shown through the sink).
        sampling: a context manager factory around sampling (A1111 brings its offloaded VAE back for it).
        after_save: called after a LoRA is written (ComfyUI and A1111 refresh their LoRA lists).
        write_lora: writes a LoRA (stem, result) → path; default `save_lora` at `lora_path(stem)`. The webui also writes
            its card files beside it.
        save_on_cancel: a cancel writes the last completed step (`cancelled_stem`).
    """

    lora_path: Callable[[str], Path]
    find_lora: Callable[[str], Path] = field(default=lambda value: find_lora_file(value, []))
    samples_dir: Path | None = None
    sampling: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    after_save: Callable[[], None] | None = None
    write_lora: Callable[[str, TrainResult], Path] | None = None
    save_on_cancel: bool = True


def initial_lora(config: TrainConfig,
                 find_lora: Callable[[str], Path]) -> tuple[NetworkSpec, dict[str, torch.Tensor] | None]:
    """The adapters to train: from the config, or shaped like the LoRA named by `resume_lora` (and its tensors)."""
    spec = network_spec(config)
    if not config.resume_lora:
        return spec, None
    path = find_lora(config.resume_lora)
    tensors, metadata = load_lora(path)
    if any(k.startswith("lora_te") for k in tensors) and not config.train_text_encoder:
        msg = (f"{path.name} also holds text-encoder weights; turn on train_text_encoder to continue it (training "
               "the UNet only would drop them)")
        raise LoraFileError(msg, path=path)
    return spec_from_state_dict(tensors, spec, metadata), tensors


def spec_of(state: dict[str, torch.Tensor], base: NetworkSpec, metadata: dict[str, str]) -> NetworkSpec:
    """The spec that loads `state` exactly: its rank and alpha pinned for every module (a module whose rank equals
    the most common one would otherwise take `base`'s conv_rank)."""
    spec = spec_from_state_dict(state, base, metadata)
    stems = stems_of(kohya_keys(state))
    return replace(spec, rank_by_module={s: spec.rank_by_module.get(s, spec.rank) for s in stems},
                   alpha_by_module={s: spec.alpha_by_module.get(s, spec.alpha) for s in stems})


def run_info(dataset: TrainDataset, model_name: str) -> RunInfo:
    """The dataset facts kohya's metadata records (`ss_tag_frequency`, `ss_dataset_dirs`, `ss_bucket_info`)."""
    return RunInfo(model_name=model_name, num_images=len(dataset.records), tag_frequency=tag_frequency(dataset.records),
                   dataset_dirs=dataset.scan.dataset_dirs(),
                   bucket_info={"buckets": {f"{w}x{h}": n for (w, h), n in dataset.bucket_counts().items()}})


def oom_error(err: BaseException, config: TrainConfig, device: torch.device | str) -> OutOfMemory:
    """What to lower after an OOM the recovery ladder could not absorb: only levers this run still has."""
    levers = []
    if not config.gradient_checkpointing:
        levers.append("turn on gradient_checkpointing")
    levers.append(f"lower resolution (now {config.resolution})")
    if config.batch_size > 1:
        levers.append(f"lower batch_size (now {config.batch_size}; raise accumulation_steps to keep the batch)")
    if config.mixed_precision == "no" and torch.device(device).type == "cuda":
        levers.append("use mixed_precision bf16 (or fp16)")
    if config.lora_rank > 4:
        levers.append(f"lower lora_rank (now {config.lora_rank})")
    return OutOfMemory(f"out of memory on {device} while training at {config.resolution}px, batch "
                       f"{config.batch_size}: {', '.join(levers)} ({err.__class__.__name__})")


class TrainingSession:
    """Train `bundle` on `dataset` as `config` says, with the host's `hooks`; see the module docstring.

    Raises (from `train`):
        TrainingInterrupted: the user cancelled; `.result` is what was trained, `.saved` the file a cancel wrote.
        OutOfMemory: memory ran out and the recovery ladder could not help (message names the levers left).
        LoraFileError / ConfigError: the LoRA to continue is missing or does not fit the settings.
    """

    def __init__(self, bundle: ModelBundle, config: TrainConfig, dataset: TrainDataset, sink: ProgressSink,
                 hooks: SessionHooks, *, model_name: str | None = None) -> None:
        self.bundle, self.config, self.dataset, self.sink, self.hooks = bundle, config, dataset, sink, hooks
        self.spec, self.initial = initial_lora(config, hooks.find_lora)
        self.run = run_info(dataset, model_name or bundle.name)
        self.saver: PeriodicSaver | None = None

    @property
    def saved(self) -> list[Path]:
        """Intermediate LoRAs written so far (after `save_last_n` pruning)."""
        return list(self.saver.saved) if self.saver else []

    def train(self, batches: BatchMaker, *, resume: TrainState | None = None) -> TrainResult:
        config, hooks = self.config, self.hooks
        schedule = make_schedule(config, batches.batches_per_epoch)
        self.saver = PeriodicSaver(self.bundle, config, self.spec, self.sink, self.run,
                                   steps_per_epoch=schedule.steps_per_epoch, lora_path=hooks.lora_path,
                                   samples_dir=hooks.samples_dir, sampling=hooks.sampling, after_save=hooks.after_save)
        try:
            result = train(self.bundle, batches, config, self.sink, spec=self.spec, initial_lora=self.initial,
                           resume=resume, run=self.run, on_step_end=self.saver)
        except TrainingInterrupted as stop:
            stop.saved = self._save_cancelled(self.cut_ranks(getattr(stop, "result", None)))  # type: ignore[attr-defined]
            raise
        except OOM_ERRORS as err:
            raise oom_error(err, config, self.bundle.device) from err
        return self.cut_ranks(result)

    def cut_ranks(self, result: TrainResult | None) -> TrainResult | None:
        """With `dynamic_rank`, the LoRA as saved: each module cut to the rank that holds that share of its energy.

        The result's tensors, metadata and spec (and `self.spec`, which previews load the LoRA with) then describe the
        smaller LoRA; its `train_state` keeps the full-rank adapters, so a resumed run goes on at lora_rank.
        """
        if result is None or not self.config.dynamic_rank:
            return result
        pruned = prune_to_energy(result.state_dict, result.metadata, self.config.dynamic_rank)
        result.state_dict, result.metadata = pruned.tensors, pruned.metadata
        result.spec = self.spec = spec_of(pruned.tensors, result.spec, pruned.metadata)
        self.sink.status(f"dynamic_rank {self.config.dynamic_rank:g}: " + pruned.report.summary().split("\n", 1)[1])
        return result

    def write(self, stem: str, result: TrainResult) -> Path:
        """Write `result` as the LoRA `stem` the host's way, then tell the host."""
        if self.hooks.write_lora is not None:
            path = self.hooks.write_lora(stem, result)
        else:
            path = save_lora(self.hooks.lora_path(stem), result.state_dict, result.metadata, overwrite=True)
        if self.hooks.after_save is not None:
            self.hooks.after_save()
        return path

    def _save_cancelled(self, partial: TrainResult | None) -> Path | None:
        if not self.hooks.save_on_cancel or partial is None or partial.steps <= 0:
            return None
        path = self.write(cancelled_stem(self.config.output_name, partial.steps), partial)
        self.sink.status(f"cancelled after {partial.steps} steps; saved what was trained so far to {path.name}")
        return path
