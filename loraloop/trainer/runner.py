"""One training run from a config, as the CLI does it: load, prepare data, train, write every output.

Hosts call the same pieces (`prepare_batches`, `loop.train`, `write_outputs`) with their own bundle and sink.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml

from .batches import BatchMaker, dataset_options
from .bundle import ModelBundle
from .config import TrainConfig
from .data import LatentCache, TrainDataset, format_bucket_table, tag_frequency
from .errors import TrainingInterrupted
from .lorafile import atomic_write, load_lora, save_lora
from .loop import TrainResult, make_schedule, network_spec, train
from .metadata import RunInfo
from .network import Network, NetworkSpec, spec_from_state_dict
from .periodic import PeriodicSaver
from .plot import image_grid, loss_curve, to_pil
from .progress import NullSink, ProgressSink
from .sampling import sample_images
from .state import TrainState

log = logging.getLogger(__name__)


@dataclass
class RunOutputs:
    """Where a run's files went."""

    lora: Path | None
    config: Path | None
    loss_plot: Path | None
    samples: Path | None
    state: Path | None
    result: TrainResult


def load_bundle(config: TrainConfig) -> ModelBundle:
    """The model named by `config.base_model` (a checkpoint, a diffusers folder, or builtin:tiny-*)."""
    from .bundles.checkpoint import resolve_base_model

    dtype = torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and config.mixed_precision in ("fp16", "bf16"):
        dtype = torch.float16 if config.mixed_precision == "fp16" else torch.bfloat16
    return resolve_base_model(config.base_model, family=config.family, prediction_type=config.prediction_type,
                              dtype=dtype, device=device)


def prepare_batches(bundle: ModelBundle, dataset: TrainDataset, config: TrainConfig, sink: ProgressSink,
                    cache_dir: Path | None = None) -> BatchMaker:
    """Encode latents (and text, when it never changes) up front, as the config asks."""
    cache = None
    if config.cache_latents:
        cache = LatentCache(bundle.encode_images, encoder_id=f"{bundle.name}|{bundle.family.name}",
                            options=dataset.options, cache_dir=cache_dir if config.cache_latents_to_disk else None)
        sink.status(f"caching latents of {len(dataset.records)} images")
        cache.prepare(dataset, batch_size=max(1, config.batch_size))
    cache_text = dataset.captions_are_static and not config.train_text_encoder
    if cache_text:
        sink.status("caching text conditioning")
    batches = BatchMaker(bundle, dataset, config, latent_cache=cache, cache_text=cache_text)
    offload = getattr(bundle, "offload", None)
    if offload is not None and bundle.device.type != "cpu":  # free accelerator memory for activations
        offload(vae=cache is not None, text_encoders=cache_text)
    return batches


def _initial_lora(config: TrainConfig) -> tuple[NetworkSpec, dict[str, torch.Tensor] | None]:
    spec = network_spec(config)
    if not config.resume_lora:
        return spec, None
    tensors, _ = load_lora(Path(config.resume_lora))
    return spec_from_state_dict(tensors, spec), tensors


def sample_grid(bundle: ModelBundle, prompts: list[str], config: TrainConfig, lora: dict[str, torch.Tensor] | None,
                spec: NetworkSpec | None) -> list:
    """Sample images for `prompts` without (lora None) or with the LoRA applied; the bundle is restored after."""
    kwargs = {"height": config.resolution, "width": config.resolution, "steps": config.sample_steps,
              "cfg": config.sample_cfg, "seed": config.seed}
    if lora is None or spec is None:
        return to_pil(sample_images(bundle, prompts, **kwargs))
    with Network(bundle, replace(spec, train_unet=True)) as network:
        network.load_state_dict({k: v.float() for k, v in lora.items()})
        return to_pil(sample_images(bundle, prompts, **kwargs))


def write_outputs(result: TrainResult, config: TrainConfig, folder: Path, name: str, *, overwrite: bool) -> dict:
    """LoRA file, effective config (YAML) and loss plot, all atomic. Returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    lora = save_lora(folder / f"{name}.safetensors", result.state_dict, result.metadata, overwrite=overwrite)
    text = yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)
    cfg = atomic_write(folder / f"{name}.yaml", lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=True)
    plot = atomic_write(folder / f"{name}_loss.png", lambda tmp: loss_curve(result.losses, title=f"{name}: loss")
                        .save(tmp, format="PNG"), overwrite=True)
    return {"lora": lora, "config": cfg, "loss_plot": plot}


def plan_memory(config: TrainConfig, dataset: TrainDataset, bundle: ModelBundle | None,
                sink: ProgressSink):  # noqa: ANN201 - memory.planner.Plan | None
    """The memory plan for an accelerator run (or for `vram_budget_gb`); None on a CPU without a budget.

    Raises ConfigError with what would fit when nothing does: the user sees it before training, never a CUDA OOM.
    """
    if not (torch.cuda.is_available() or config.vram_budget_gb):
        return None
    from .errors import ConfigError
    from .memory.autoplan import plan_for_config
    from .memory.devices import GIB

    free = int(config.vram_budget_gb * GIB) if config.vram_budget_gb else None
    try:
        plan = plan_for_config(config, bundle=bundle, dataset=dataset, free=free, auto=set(config.auto),
                               margin=config.memory_margin)
    except ConfigError as err:
        if config.base_model.startswith("builtin:"):  # the tiny test models have no memory profile worth planning
            log.info("no memory plan: %s", err)
            return None
        raise
    sink.status("memory plan:\n" + "\n".join(plan.lines()))
    if not plan.fits:
        msg = f"this run does not fit in the free accelerator memory. {plan.advice}"
        raise ConfigError(msg, key="auto", value=config.auto)
    return plan


def run(config: TrainConfig, sink: ProgressSink | None = None, *, bundle: ModelBundle | None = None,
        resume_state: Path | None = None, samples: bool = True) -> RunOutputs:
    """Train as `config` says and write the outputs into `config.output_dir`."""
    sink = sink or NullSink()
    config.validate()
    folder = Path(config.output_dir)
    name = config.output_name
    final = folder / f"{name}.safetensors"
    if final.exists() and not config.overwrite and resume_state is None:
        from .errors import LoraFileError

        msg = f"{final} already exists; choose another output_name or pass --overwrite"
        raise LoraFileError(msg, path=final)
    dataset = TrainDataset.from_options(dataset_options(config), seed=config.seed)
    sink.status(f"{len(dataset.records)} images, {len(dataset)} samples per epoch; buckets:\n"
                + format_bucket_table(dataset.bucket_counts()))
    plan = plan_memory(config, dataset, bundle, sink)
    if plan is not None:
        config = plan.apply(config)
    if bundle is None:
        sink.status(f"loading {config.base_model}")
        bundle = load_bundle(config)
    spec, initial = _initial_lora(config)
    state = None
    if resume_state is not None:
        state = TrainState.load(resume_state)
        state.check_compatible(config, resume_state)
    batches = prepare_batches(bundle, dataset, config, sink, cache_dir=folder / ".latent_cache")
    if plan is not None:
        batches.chunk_size = plan.chunk_size
    before = sample_grid(bundle, config.sample_prompts, config, None, None) if samples and config.sample_prompts else None
    run_info = RunInfo(model_name=bundle.name, num_images=len(dataset.records),
                       tag_frequency=tag_frequency(dataset.records), dataset_dirs=dataset.scan.dataset_dirs(),
                       bucket_info={"buckets": {f"{w}x{h}": n for (w, h), n in dataset.bucket_counts().items()}})
    schedule = make_schedule(config, batches.batches_per_epoch)
    saver = PeriodicSaver(bundle, config, spec, sink, run_info, steps_per_epoch=schedule.steps_per_epoch,
                          lora_path=lambda stem: folder / f"{stem}.safetensors", samples_dir=folder / "samples")
    try:
        result = train(bundle, batches, config, sink, spec=spec, initial_lora=initial, resume=state, run=run_info,
                       on_step_end=saver)
    except TrainingInterrupted as stop:
        partial = getattr(stop, "result", None)
        if partial is not None and partial.steps > 0:
            path = save_lora(folder / f"{name}-interrupted-step{partial.steps:06d}.safetensors", partial.state_dict,
                             partial.metadata, overwrite=True)
            sink.status(f"cancelled; saved what was trained so far to {path}")
        raise
    paths = write_outputs(result, config, folder, name, overwrite=config.overwrite or resume_state is not None)
    state_path = result.train_state.save(folder / f"{name}-state.pt") if result.train_state else None
    samples_path = None
    if before is not None:
        after = sample_grid(bundle, config.sample_prompts, config, result.state_dict, spec)
        grid = image_grid([before, after], ["before (base model)", f"after ({result.steps} steps)"])
        samples_path = atomic_write(folder / f"{name}_samples.png", lambda tmp: grid.save(tmp, format="PNG"),
                                    overwrite=True)
    return RunOutputs(paths["lora"], paths["config"], paths["loss_plot"], samples_path, state_path, result)

