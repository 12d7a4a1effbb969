"""One training run inside the webui, on `shared.sd_model`, handed back exactly as it was.

The caller holds the webui's queue lock (the tab through `call_queue.wrap_gradio_gpu_call`, the HTTP API through
`webui.queued_job`), so no txt2img/img2img runs meanwhile. First the engine's memory planner (on a GPU, or with
`vram_budget_gb`) chooses the settings listed in `auto` so the run fits, or refuses it before anything is touched.
Inside `training_session`:
1. the LoRAs the last generation applied are taken out (`webui.clear_applied_networks`), so the base weights are clean;
2. the cross-attention optimisation is undone unless Settings → Training says otherwise (as the webui's TI trainer);
3. latents and, when they never change, caption encodings are cached; then the VAE and the text encoder leave the GPU
   (`Placements`, skipped under --medvram, where the webui moves modules itself) and come back only for previews;
4. the engine trains adapters injected through peft (float32 adapters, autocast + GradScaler for fp16 weights,
   non-reentrant checkpointing) and removes them in its own `finally`;
5. whatever happened, modules go back to their devices, the optimisation is re-applied, the RNG state is restored,
   and `devices.torch_gc()` frees the memory.
Then the LoRA, its card files and the work files are written and the Lora extension rescans its folder.
"""

from __future__ import annotations

import contextlib
import gc
import html
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..trainer.batches import dataset_options
from ..trainer.config import TrainConfig
from ..trainer.data import TrainDataset, process_caption
from ..trainer.errors import (
    ConfigError,
    LoraLoopError,
    TrainingInterrupted,
    UnsupportedModelError,
)
from ..trainer.loop import TrainResult, make_schedule
from ..trainer.metadata import quick_model_hash
from ..trainer.plot import loss_curve
from ..trainer.runner import apply_plan, plan_memory, prepare_batches, sample_grid
from ..trainer.session import SessionHooks, TrainingSession, find_lora_file
from . import forge, outputs, webui, widgets
from .bundle import WebuiBundle
from .sink import LIVE, LiveStatus, WebuiSink

log = logging.getLogger(__name__)

OOM_ERRORS = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError)


@dataclass
class JobResult:
    """What a run produced, for the tab and the API."""

    name: str
    config: TrainConfig
    steps: int
    total_steps: int
    losses: list[float]
    interrupted: bool = False
    lora: Path | None = None
    card: Path | None = None
    preview_path: Path | None = None
    preview: Image.Image | None = None
    work_files: dict[str, Path] = field(default_factory=dict)
    intermediate: list[Path] = field(default_factory=list)
    removed_networks: list[str] = field(default_factory=list)
    offloaded: list[str] = field(default_factory=list)
    refreshed: bool = False
    weight: float = 1.0  # the preferred weight, for the <lora:name:weight> hint

    @property
    def loss_plot(self) -> Image.Image:
        return loss_curve(self.losses, title=f"{self.name}: loss")

    @property
    def prompt_tag(self) -> str:
        return f"<lora:{self.lora.stem if self.lora else self.name}:{self.weight:g}>"

    def summary(self) -> str:
        if self.interrupted:
            head = f"Cancelled after {self.steps} of {self.total_steps} steps."
            if self.lora is None:
                return head + " Nothing was saved."
            return f"{head} What was trained so far is saved as {self.lora.name}: use {self.prompt_tag}."
        final = f"; final loss {self.losses[-1]:.4f}" if self.losses else ""
        saved = self.lora.name if self.lora else "?"
        return f"Trained {self.steps} steps{final}. Saved {saved}: use {self.prompt_tag}."

    def html(self) -> str:
        rows = [f"<p>{html.escape(self.summary())}</p>"]
        files = {"LoRA": self.lora, "card": self.card, "preview": self.preview_path, **self.work_files}
        items = "".join(f"<li>{html.escape(k)}: <code>{html.escape(str(v))}</code></li>" for k, v in files.items() if v)
        if items:
            rows.append(f"<ul>{items}</ul>")
        if self.removed_networks:
            rows.append(f"<p>Removed the applied LoRAs {html.escape(', '.join(self.removed_networks))} before "
                        "training; they are applied again by the next generation that asks for them.</p>")
        return "".join(rows)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.lora.stem if self.lora else self.name, "steps": self.steps,
                "total_steps": self.total_steps, "interrupted": self.interrupted, "losses": self.losses,
                "lora": str(self.lora) if self.lora else None, "card": str(self.card) if self.card else None,
                "preview": str(self.preview_path) if self.preview_path else None,
                "work_files": {k: str(v) for k, v in self.work_files.items()},
                "intermediate": [str(p) for p in self.intermediate], "prompt": self.prompt_tag,
                "removed_networks": self.removed_networks, "summary": self.summary()}


# -- device placement -------------------------------------------------------------------------------------------------
def _device_of(module: nn.Module) -> torch.device | None:
    for tensor in module.parameters():
        return tensor.device
    return None


class Placements:
    """Moves modules whose outputs are cached off the compute device, and every one of them back at the end."""

    def __init__(self, bundle: WebuiBundle) -> None:
        self.bundle = bundle
        self.moved: list[tuple[nn.Module, torch.device]] = []
        self.offloaded: list[str] = []

    def offload(self, module: nn.Module, what: str) -> None:
        if self.bundle.lowvram:  # --medvram/--lowvram: the webui's hooks decide where modules live
            return
        device = _device_of(module)
        if device is None or any(m is module for m, _ in self.moved):
            return
        self.offloaded.append(what)
        if device.type != "cpu":
            module.to("cpu")
            self.moved.append((module, device))

    @contextlib.contextmanager
    def on_device(self, module: nn.Module) -> Iterator[None]:
        """Bring an offloaded module back for a moment (previews need the VAE)."""
        home = next((d for m, d in self.moved if m is module), None)
        if home is not None:
            module.to(home)
        try:
            yield
        finally:
            if home is not None:
                module.to("cpu")

    def restore(self) -> None:
        while self.moved:
            module, device = self.moved.pop()
            module.to(device)


@contextlib.contextmanager
def training_session(bundle: WebuiBundle | forge.ForgeBundle) -> Iterator[tuple[Placements, list[str]]]:
    """Clean base weights in, everything restored out (see the module docstring). Yields (placements, removed LoRAs).
    In Forge its model management does both (forge.training_memory)."""
    placements = Placements(bundle)  # type: ignore[arg-type]
    cuda = [bundle.device.index or 0] if bundle.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        try:
            if isinstance(bundle, forge.ForgeBundle):
                # text=True: the tab turns CLIP training on only after this (bundle.train_text in `_train`)
                with forge.training_memory(bundle), bundle.trainable(text=True):
                    yield placements, []
                return
            removed = webui.clear_applied_networks(bundle.sd_model)
            with webui.training_attention():
                yield placements, removed
        finally:
            placements.restore()
            bundle.train_text = False
            gc.collect()
            webui.torch_gc()


# -- helpers ----------------------------------------------------------------------------------------------------------
def check_model_supports(config: TrainConfig, bundle: WebuiBundle | forge.ForgeBundle) -> None:
    if isinstance(bundle, forge.ForgeBundle):
        if config.train_text_encoder and not bundle.can_train_text():
            raise ConfigError(f"train_text_encoder: this {bundle.family.name} CLIP has no text model LoRA Loop can "
                              "adapt; turn train_text_encoder off", key="train_text_encoder", value=True)
        return
    if config.train_text_encoder and not bundle.text_encoders:
        why = ("its text encoders are OpenCLIP models with fused attention" if bundle.family.name != "sd1"
               else "its text encoder is not a CLIP model")
        raise ConfigError(f"train_text_encoder: text-encoder LoRA is trained in the webui for SD 1.x CLIP only; this "
                          f"{bundle.family.name} model cannot ({why}). Turn train_text_encoder off to train the UNet",
                          key="train_text_encoder", value=True, allowed=(False,))


def preview_prompt(config: TrainConfig, dataset: TrainDataset) -> str:
    if config.sample_prompts:
        return config.sample_prompts[0]
    first = dataset.items[0].record.caption if dataset.items else ""
    return process_caption(first, dataset.options, random.Random(0)) or config.trigger_word


# -- the run -----------------------------------------------------------------------------------------------------------
def prepare(values: dict[str, Any]) -> tuple[WebuiBundle | forge.ForgeBundle, TrainConfig, widgets.TabSettings]:
    """Check the loaded model and the settings; raise before anything is touched."""
    settings = widgets.parse_values(values)
    model = webui.sd_model()
    if getattr(webui.cmd_opts(), "lowvram", False):
        raise UnsupportedModelError("training with --lowvram is not possible (the webui's own trainers refuse it "
                                    "too); restart without --lowvram (--medvram works)")
    if forge.detected(model) and hasattr(model, "forge_objects"):
        forge.check_trainable(model)
        bundle: WebuiBundle | forge.ForgeBundle = forge.ForgeBundle(model)
    else:
        bundle = WebuiBundle(model, webui.compute_device())
    config = widgets.resolve(settings, bundle.family, bundle.prediction_type, bundle.dtype,
                          base_model=webui.checkpoint_file(model))
    if "output_dir" not in settings.mapping:
        config = replace(config, output_dir=str(webui.work_dir()))
    check_model_supports(config, bundle)
    return bundle, config, settings


def run_training(values: dict[str, Any], *, live: LiveStatus = LIVE) -> JobResult:
    """Train on the webui's loaded model with the tab's/API's `values`; the caller holds the queue lock."""
    bundle, config, settings = prepare(values)
    lora_dir = webui.lora_dir()
    name = outputs.choose_name(lora_dir, config.output_name, overwrite=config.overwrite)
    config = replace(config, output_name=name)
    dataset = TrainDataset.from_options(dataset_options(config), seed=config.seed)
    live.start(name)
    sink = WebuiSink(webui.state(), live)
    try:
        config, dataset, chunk_size = plan_run(config, dataset, bundle, sink)
        job = JobResult(name=name, config=config, steps=0, total_steps=0, losses=[], weight=settings.preferred_weight)
        session = TrainingSession(bundle, config, dataset, sink, _hooks(bundle, config, settings, lora_dir, job))
        session.run.model_hash = quick_model_hash(webui.checkpoint_file(bundle.sd_model))
        result, partial, preview = _train(session, settings, job, chunk_size)
        _write(session, settings, lora_dir, job, result, partial, preview)
    except BaseException as err:
        live.finish(f"failed: {err}")
        raise
    job.refreshed = webui.refresh_networks()
    if isinstance(bundle, forge.ForgeBundle):
        forge.forget_cached_lora()  # Forge caches LoRA files by name: a retrained one must be read again
    webui.state().textinfo = job.summary()
    live.finish(job.summary())
    return job


def plan_run(config: TrainConfig, dataset: TrainDataset, bundle: WebuiBundle,
             sink: WebuiSink) -> tuple[TrainConfig, TrainDataset, int | None]:
    """The engine's memory plan (on a GPU, or with vram_budget_gb): the settings listed in `auto` are chosen so the
    run fits the free memory; a run that cannot fit is refused here, before anything is touched. Returns the config,
    the dataset (rebuilt when the plan lowered the resolution) and the micro-batch chunk size."""
    try:
        plan = plan_memory(config, dataset, bundle, sink)
    except ImportError as err:  # the planner builds its model mirrors with diffusers, which the webui may lack
        log.warning("LoRA Loop: no memory plan (%s); training with the settings as given", err)
        return config, dataset, None
    if plan is None:
        return config, dataset, None
    planned, dataset = apply_plan(plan, config, dataset)
    if planned.mixed_precision == "no" and bundle.dtype != torch.float32:  # the webui's weights decide precision
        planned = replace(planned, mixed_precision=config.mixed_precision)
    return planned, dataset, plan.chunk_size


def _hooks(bundle: WebuiBundle, config: TrainConfig, settings: widgets.TabSettings, lora_dir: Path,
           job: JobResult) -> SessionHooks:
    """LoRAs go into the Lora folder with their card files; samples into the work folder."""

    def write_cancelled(stem: str, partial: TrainResult) -> Path:
        card = outputs.card_metadata(family=bundle.family, trigger_word=config.trigger_word,
                                     preferred_weight=settings.preferred_weight,
                                     description=f"LoRA Loop: cancelled after {partial.steps} steps on {bundle.name}.")
        files = outputs.write_lora(lora_dir, stem, partial.state_dict, partial.metadata, card, overwrite=True)
        job.lora, job.card = files["lora"], files["card"]
        return files["lora"]

    return SessionHooks(lora_path=lambda stem: lora_dir / f"{stem}.safetensors",
                        find_lora=lambda value: find_lora_file(value, [lora_dir]),
                        samples_dir=Path(config.output_dir) / "samples", write_lora=write_cancelled)


def _train(session: TrainingSession, settings: widgets.TabSettings, job: JobResult, chunk_size: int | None = None,
           ) -> tuple[TrainResult | None, TrainResult | None, Image.Image | None]:
    """The part that touches the model: (result, partial result when cancelled, preview image)."""
    bundle, config, dataset, sink = session.bundle, session.config, session.dataset, session.sink
    spec = session.spec
    work_dir = Path(config.output_dir)
    sink.status(f"{bundle.family.name} ({bundle.prediction_type}, {str(bundle.dtype).replace('torch.', '')}); "
                f"{len(dataset.records)} images, {len(dataset)} samples per epoch at {config.resolution}px")
    result = partial = preview = None
    with training_session(bundle) as (placements, removed):
        job.removed_networks = removed
        session.hooks.sampling = lambda: placements.on_device(bundle.vae)
        prompt = preview_prompt(config, dataset)
        bundle.train_text = spec.train_text_encoder
        captions = [process_caption(item.record.caption, dataset.options, random.Random(0))
                    for item in dataset.items]
        bundle.set_caption_lengths([*captions, *config.sample_prompts, prompt])
        try:
            batches = prepare_batches(bundle, dataset, config, sink, cache_dir=work_dir / ".latent_cache")
        except TrainingInterrupted:  # Cancel while caching latents: nothing trained, nothing to save
            return None, None, None
        batches.chunk_size = chunk_size
        if batches.text_cached:  # the text encoder is idle: previews use the cache too
            bundle.cache_text([*config.sample_prompts, prompt, ""])
            placements.offload(bundle.text_module, "text encoder")
        if batches.latent_cache is not None:
            placements.offload(bundle.vae, "VAE")
        job.offloaded = list(placements.offloaded)
        job.total_steps = make_schedule(config, batches.batches_per_epoch).total_steps
        sink.begin(job.total_steps)
        try:
            result = session.train(batches)
        except TrainingInterrupted as stop:
            partial = getattr(stop, "result", None)
            if partial is not None:
                partial.train_state = None  # the tab does not resume cancelled runs: free the optimizer copy
        job.intermediate = session.saved
        if result is not None:
            if result.train_state is not None:
                job.work_files["state"] = result.train_state.save(work_dir / f"{config.output_name}-state.pt")
                result.train_state = None
            if settings.make_preview and prompt:
                sink.status("sampling the preview image")
                bundle.train_text = spec.train_text_encoder
                with placements.on_device(bundle.vae):
                    preview = sample_grid(bundle, [prompt], config, result.state_dict, session.spec)[0]
    return result, partial, preview


def _write(session: TrainingSession, settings: widgets.TabSettings, lora_dir: Path, job: JobResult,
           result: TrainResult | None, partial: TrainResult | None, preview: Image.Image | None) -> None:
    """The LoRA and its card files into the Lora folder, the config and loss plot into the work folder. A cancelled
    run's LoRA was written by the session already (`_hooks`)."""
    bundle, config = session.bundle, session.config
    name = config.output_name
    if result is None:  # cancelled
        job.interrupted = True
        job.steps = partial.steps if partial is not None else 0
        job.losses = list(partial.losses) if partial is not None else []
        return
    job.steps, job.losses = result.steps, list(result.losses)
    card = outputs.card_metadata(family=bundle.family, trigger_word=config.trigger_word,
                                 preferred_weight=settings.preferred_weight,
                                 description=f"LoRA Loop: {result.steps} steps on {len(session.dataset.records)} "
                                             f"images, base {bundle.name}.")
    files = outputs.write_lora(lora_dir, name, result.state_dict, result.metadata, card, preview=preview,
                               overwrite=config.overwrite)
    job.lora, job.card, job.preview_path, job.preview = files["lora"], files["card"], files.get("preview"), preview
    job.work_files.update(outputs.write_work_files(Path(config.output_dir), name, config, job.losses))


def native_resolution() -> int:
    """The loaded model's native resolution (512 when none is loaded or it is not trainable)."""
    from .bundle import detect_family

    try:
        return detect_family(webui.loaded_model())[0].resolution
    except LoraLoopError:
        return 512


def check_dataset_text(values: dict[str, Any]) -> tuple[str, bool]:
    """The dataset report for the tab/API (no model needed): (text, will_fail)."""
    from ..trainer.data import check_dataset, format_report

    config = widgets.dataset_config(values, native_resolution())
    report = check_dataset(dataset_options(config))
    return format_report(report), report.will_fail
