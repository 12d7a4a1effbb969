"""One training run from a config, as the CLI does it: load, prepare data, train, write every output.

Hosts call the same pieces (`prepare_batches`, `loop.train`, `write_outputs`) with their own bundle and sink.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from .batches import BatchMaker, caches_text, dataset_options
from .bundle import ModelBundle
from .bundles.diffusers_bundle import DiffusersBundle
from .config import TrainConfig
from .data import LatentCache, TrainDataset, format_bucket_table
from .distributed import SINGLE, World, process_group
from .errors import ConfigError
from .fp8 import store_fp8
from .loop import TrainResult
from .lorafile import atomic_write, save_lora
from .memory import release_memory
from .metadata import quick_model_hash
from .network import NetworkSpec, applied_lora
from .plot import image_grid, loss_curve, to_pil
from .progress import NullSink, ProgressSink
from .sampling import sample_images, sample_settings
from .session import SessionHooks, TrainingSession, find_lora_file
from .state import TrainState

if TYPE_CHECKING:
    from .memory import Plan

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


def training_device() -> torch.device:
    """Where a standalone run trains: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_bundle(config: TrainConfig, device: torch.device | str | None = None) -> ModelBundle:
    """The model named by `config.base_model` (a checkpoint, a diffusers folder, or builtin:tiny-*).

    The weights get the dtype that training on `training_device()` needs; `device` says where they are put (default:
    that device; `run` loads onto the CPU so that the encoders can cache before the UNet takes the GPU).
    """
    from .bundles.checkpoint import resolve_base_model

    target = training_device()
    dtype = torch.float32
    if target.type == "cuda" and config.mixed_precision in ("fp16", "bf16"):
        dtype = torch.float16 if config.mixed_precision == "fp16" else torch.bfloat16
    return resolve_base_model(config.base_model, family=config.family, prediction_type=config.prediction_type,
                              dtype=dtype, device=device or target, components_from=config.components_from)


def prepare_batches(bundle: ModelBundle, dataset: TrainDataset, config: TrainConfig, sink: ProgressSink,
                    cache_dir: Path | None = None, *, cache_batch_size: int | None = None,
                    offload_encoders: bool = True, world: World = SINGLE) -> BatchMaker:
    """Encode latents (and text, when `caches_text` allows) up front, as the config asks.

    Args:
        cache_batch_size: images the VAE encodes at once (default: `batch_size`; the memory plan says 1).
        offload_encoders: afterwards move the encoders the caches made idle off an accelerator (bundles that can).
        world: the training processes (`distributed.py`); this one trains its slice of every global micro-batch.

    Raises:
        TrainingInterrupted: the sink asked to stop while latents were being cached.
    """
    cache = None
    if config.cache_latents:
        cache = LatentCache(bundle.encode_images, encoder_id=f"{bundle.name}|{bundle.family.name}",
                            options=dataset.options, cache_dir=cache_dir if config.cache_latents_to_disk else None)
        sink.status(f"caching latents of {len(dataset.records)} images")
        cache.prepare(dataset, batch_size=cache_batch_size or max(1, config.batch_size),
                      should_stop=getattr(sink, "should_stop", None))
    cache_text = caches_text(config, dataset)
    if cache_text:
        sink.status("caching text conditioning")
    batches = BatchMaker(bundle, dataset, config, latent_cache=cache, cache_text=cache_text, world=world)
    offload = getattr(bundle, "offload", None)
    if offload_encoders and offload is not None and bundle.device.type != "cpu":  # room for activations
        offload(vae=cache is not None, text_encoders=cache_text)
    return batches


def encode_then_load_unet(bundle: DiffusersBundle, dataset: TrainDataset, config: TrainConfig, sink: ProgressSink,
                          device: torch.device, cache_dir: Path | None = None, *, cache_batch_size: int = 1,
                          offload_encoders: bool = True, text_on_cpu: bool = False,
                          world: World = SINGLE) -> BatchMaker:
    """A standalone run on an accelerator: cache with only the encoders on `device`, then bring in the UNet.

    The memory plan assumes this order (`RunShape.cache_with_unet_resident` is False): at SDXL 1024 the fp16 UNet
    (~5.1 GB) beside the encoders (~1.7 GB) and the VAE's encode transient would not fit 8 GB; each phase alone does.
    `bundle` comes in with every module on the CPU.

    Args:
        cache_batch_size: images the VAE encodes at once (the plan's `cache_batch_size`).
        offload_encoders: encoders whose outputs are cached stay on the CPU while training (the plan's
            `offload_encoders`); False moves them to `device` with the UNet.
        text_on_cpu: the text encoders cache on the CPU (the plan's `text_on_cpu`: they do not fit the device).
    """
    bundle.place(device, vae=config.cache_latents, text_encoders=caches_text(config, dataset) and not text_on_cpu)
    batches = prepare_batches(bundle, dataset, config, sink, cache_dir, cache_batch_size=cache_batch_size,
                              offload_encoders=False, world=world)
    # The loop runs an encoder every step when its outputs are not cached (or a text encoder is trained).
    vae_on_device = batches.latent_cache is None or not offload_encoders
    text_on_device = not batches.text_cached or config.train_text_encoder or not offload_encoders
    bundle.place("cpu", vae=not vae_on_device, text_encoders=not text_on_device)
    release_memory()  # hand the encoders' blocks back to the driver before the UNet arrives
    sink.status(f"moving the UNet to {device}")
    bundle.place(device, unet=True, vae=vae_on_device, text_encoders=text_on_device,
                 swapped_blocks=config.blocks_to_swap)
    return batches


def apply_plan(plan: Plan, config: TrainConfig, dataset: TrainDataset,
               rebuild: Callable[[TrainConfig], TrainDataset] | None = None) -> tuple[TrainConfig, TrainDataset]:
    """`config` with the plan's settings, and the dataset rebuilt when they change its bucketing (the plan may lower
    the resolution or cap the largest bucket). `rebuild` makes a host's dataset (default: from the options)."""
    planned = plan.apply(config)
    if dataset_options(planned) != dataset.options:
        options = dataset_options(planned)
        dataset = rebuild(planned) if rebuild else TrainDataset.from_options(options, seed=planned.seed)
    return planned, dataset


def sample_grid(bundle: ModelBundle, prompts: list[str], config: TrainConfig, lora: dict[str, torch.Tensor] | None,
                spec: NetworkSpec | None) -> list:
    """Sample images for `prompts` without (lora None) or with the LoRA applied; the bundle is restored after."""
    settings = sample_settings(config)
    if lora is None or spec is None:
        return to_pil(sample_images(bundle, prompts, **settings))
    with applied_lora(bundle, spec, lora):
        return to_pil(sample_images(bundle, prompts, **settings))


def write_outputs(result: TrainResult, config: TrainConfig, folder: Path, name: str, *, overwrite: bool) -> dict:
    """LoRA file, effective config (YAML) and loss plot, all atomic. Returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    lora = save_lora(folder / f"{name}.safetensors", result.state_dict, result.metadata, overwrite=overwrite)
    text = yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)
    cfg = atomic_write(folder / f"{name}.yaml", lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=True)
    plot = atomic_write(folder / f"{name}_loss.png", lambda tmp: loss_curve(result.losses, title=f"{name}: loss")
                        .save(tmp, format="PNG"), overwrite=True)
    return {"lora": lora, "config": cfg, "loss_plot": plot}


def choose_weight_dtype(config: TrainConfig, dataset: TrainDataset, bundle: ModelBundle | None) -> TrainConfig:
    """`base_weight_dtype: auto` resolved: fp8 when the plan with the model's own dtype does not fit, or streams
    blocks that fp8 weights would keep on the device (fewer transfers: faster); else the model's dtype. Without an
    accelerator (no plan) the weights stay as loaded."""
    if config.base_weight_dtype != "auto":
        return config
    silent = NullSink()
    as_loaded = replace(config, base_weight_dtype="model")
    try:
        model = plan_memory(as_loaded, dataset, bundle, silent)
    except ConfigError:
        model = None  # does not fit as loaded
    else:
        if model is None or model.shape.blocks_to_swap == 0:
            return as_loaded
    fp8 = replace(config, base_weight_dtype="fp8")
    try:
        small = plan_memory(fp8, dataset, bundle, silent)
    except ConfigError:
        return as_loaded  # nothing fits either way: the plan as loaded says what would
    if model is None or (small is not None and small.shape.blocks_to_swap < model.shape.blocks_to_swap):
        streamed = small.shape.blocks_to_swap if small else 0
        log.info("base_weight_dtype auto → fp8 (%s)", "the model's dtype does not fit" if model is None else
                 f"{streamed} blocks streamed instead of {model.shape.blocks_to_swap}")
        return fp8
    return as_loaded


def plan_memory(config: TrainConfig, dataset: TrainDataset, bundle: ModelBundle | None,
                sink: ProgressSink) -> Plan | None:
    """The memory plan for an accelerator run (or for `vram_budget_gb`); None on a CPU without a budget.

    Raises ConfigError with what would fit when nothing does: the user sees it before training, never a CUDA OOM.
    """
    if not (torch.cuda.is_available() or config.vram_budget_gb):
        return None
    from .memory import GIB, plan_for_config

    free = int(config.vram_budget_gb * GIB) if config.vram_budget_gb else None
    try:
        # fp8 storage: one byte per weight of the adapted Linears, which hold nearly all of a denoiser's weights
        plan = plan_for_config(config, bundle=bundle, dataset=dataset, free=free, auto=set(config.auto),
                               margin=config.memory_margin,
                               weight_bytes=1.0 if config.base_weight_dtype == "fp8" else None)
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
    """Train as `config` says and write the outputs into `config.output_dir`.

    Under `torchrun` every process calls this: they join one process group, each trains its slice of every global
    micro-batch on its own device (`distributed.py`), and rank 0 alone reports, samples and writes files.
    """
    world = World.from_env()
    with process_group(world):
        if not world.is_main:
            sink = NullSink()
            samples = False
            # Step saves, sample grids and TensorBoard are rank 0's; the training itself is the same on every rank.
            config = replace(config, save_every_n_steps=None, save_every_n_epochs=None, sample_every_n_steps=None,
                             logging_dir=None)
        return _run(config, sink or NullSink(), world, bundle=bundle, resume_state=resume_state, samples=samples)


def _run(config: TrainConfig, sink: ProgressSink, world: World, *, bundle: ModelBundle | None,
         resume_state: Path | None, samples: bool) -> RunOutputs:
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
    if world.distributed:
        sink.status(f"{world.size} processes: {config.batch_size} samples each per micro-batch, "
                    f"{config.batch_size * world.size * config.accumulation_steps} per optimizer step")
    config = choose_weight_dtype(config, dataset, bundle)
    plan = plan_memory(config, dataset, bundle, sink)  # per process: batch_size is per GPU
    if plan is not None:
        config, dataset = apply_plan(plan, config, dataset)
    device = world.device() if world.distributed else training_device()
    staged = bundle is None and device.type != "cpu"  # a bundle we load ourselves: encode before the UNet moves in
    if bundle is None:
        sink.status(f"loading {config.base_model}")
        bundle = load_bundle(config, device="cpu" if staged else device)
    if config.base_weight_dtype == "fp8":
        saved = store_fp8(bundle.unet, list(bundle.unet_targets(conv=False)))  # type: ignore[attr-defined]
        sink.status(f"base weights stored in fp8: {saved / 2**30:.2f} GB saved")
    if config.train_text_encoder and bundle.family.is_flow:
        msg = (f"train_text_encoder: the command line trains the {bundle.family.name} transformer only; train its CLIP "
               "inside ComfyUI (TrainLoRA), or turn train_text_encoder off")
        raise ConfigError(msg, key="train_text_encoder", value=True)
    session = TrainingSession(bundle, config, dataset, sink, SessionHooks(
        lora_path=lambda stem: folder / f"{stem}.safetensors", find_lora=lambda value: find_lora_file(value, [folder]),
        samples_dir=folder / "samples", save_on_cancel=world.is_main))
    session.run.model_hash = quick_model_hash(config.base_model)
    state = None
    if resume_state is not None:
        state = TrainState.load(resume_state)
        state.check_compatible(config, resume_state)
    cache_dir = folder / ".latent_cache" if world.is_main else None  # one writer of the on-disk cache
    if staged:
        cache_batch = plan.shape.cache_batch_size if plan else config.batch_size
        batches = encode_then_load_unet(bundle, dataset, config, sink, device, cache_dir,  # type: ignore[arg-type]
                                        cache_batch_size=cache_batch,
                                        offload_encoders=plan.shape.offload_encoders if plan else True,
                                        text_on_cpu=plan.shape.text_on_cpu if plan else False,
                                        world=world)
    else:
        batches = prepare_batches(bundle, dataset, config, sink, cache_dir=cache_dir, world=world)
    if plan is not None:
        batches.chunk_size = plan.chunk_size
    before = None
    if samples and config.sample_prompts:
        before = sample_grid(bundle, config.sample_prompts, config, None, None)
    result = session.train(batches, resume=state)
    if not world.is_main:
        return RunOutputs(None, None, None, None, None, result)
    spec = session.spec
    # The YAML is the config as the run ended: a resume of its state needs the OOM ladder's optimizer and rank.
    paths = write_outputs(result, result.config or config, folder, name,
                          overwrite=config.overwrite or resume_state is not None)
    state_path = result.train_state.save(folder / f"{name}-state.pt") if result.train_state else None
    samples_path = None
    if before is not None:
        after = sample_grid(bundle, config.sample_prompts, config, result.state_dict, spec)
        grid = image_grid([before, after], ["before (base model)", f"after ({result.steps} steps)"])
        samples_path = atomic_write(folder / f"{name}_samples.png", lambda tmp: grid.save(tmp, format="PNG"),
                                    overwrite=True)
    return RunOutputs(paths["lora"], paths["config"], paths["loss_plot"], samples_path, state_path, result)
