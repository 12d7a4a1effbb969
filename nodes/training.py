"""One TrainLoRA run inside ComfyUI: plan, encode, evict the rest, train the host's UNet (and CLIP) in place, hand back.

Order matters (docs/hosts.md §3, Part C):
1. the memory plan is made before anything is encoded or loaded (a run that cannot fit stops here, with advice);
2. images are encoded once, and captions too unless they change per step or the text encoder trains, with ComfyUI
   loading the CLIP and VAE as it likes;
3. the MODEL (and the CLIP when text is encoded during training) is loaded with every other model evicted
   (`load_models_gpu`, full load unless dynamic VRAM), with the CLIP/VAE when they encode during training; nothing
   calls model management again until training ends (the bundle encodes through the resident CLIP/VAE directly);
4. inference-tensor weights are re-wrapped for autograd without a copy (`bundle.trainable()`), the engine trains
   (adapters injected and always removed), and the original Parameter objects are put back;
5. the LoRA is applied to clones of MODEL/CLIP only (`comfy.sd.load_lora_for_models`); the inputs are untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..trainer.batches import BatchMaker
from ..trainer.config import TrainConfig
from ..trainer.data import format_bucket_table
from ..trainer.errors import TrainingInterrupted
from ..trainer.loop import TrainResult
from ..trainer.metadata import quick_model_hash
from ..trainer.network import NetworkSpec, applied_lora
from ..trainer.plot import loss_curve, to_pil
from ..trainer.runner import apply_plan, prepare_batches
from ..trainer.sampling import sample_latents
from ..trainer.session import SessionHooks, TrainingSession
from .bundle import ComfyBundle
from .datasets import ComfyDataset
from .paths import find_lora, invalidate_lora_list, lora_target
from .plan import plan_run, plan_text, require_fit
from .sink import ComfySink
from .widgets import NodeConfig

log = logging.getLogger(__name__)

# memory_required that makes load_models_gpu unload every other model (ComfyUI's own nodes_train does the same)
EVICT_ALL_OTHER_MODELS = 1e20


class TrainedLora(dict):
    """A LORA_MODEL (dict of kohya-named tensors, usable by ComfyUI's LoraModelLoader) that also carries what SaveLoRA
    writes beside it: metadata, trigger words, a preview image and the family."""

    metadata: dict[str, str]
    trigger_words: list[str]
    preview: Any
    family: str

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str], trigger_words: list[str],
                 preview: Any = None, family: str = "") -> None:
        super().__init__(tensors)
        self.metadata, self.trigger_words, self.preview, self.family = metadata, trigger_words, preview, family


@dataclass
class ComfyRun:
    lora: TrainedLora
    model: Any
    clip: Any
    losses: list[float]
    steps: int
    summary: str
    plan: str = ""
    changes: list[str] = field(default_factory=list)


def _lora_file(stem: str) -> Path:
    folder, safe = lora_target(stem)
    return folder / f"{safe}.safetensors"


def _load_for_training(bundle: ComfyBundle, config: TrainConfig, dynamic_captions: bool,
                       encode_images: bool = False, weight_budget: int | None = None) -> None:
    """Load what training needs with every other model evicted. `weight_budget`: the plan streams blocks
    (`blocks_to_swap`): only that many bytes of the UNet's weights go on the device (ComfyUI's own partial loading)."""
    import comfy.model_management as mm

    models = [bundle.patcher]
    if dynamic_captions:  # text is encoded during training: keep the CLIP loaded beside the UNet
        models.append(bundle.clip.patcher)  # type: ignore[attr-defined]
        bundle.clip_resident = True
    if encode_images and getattr(bundle.vae, "patcher", None) is not None:  # latents not cached: the VAE too
        models.append(bundle.vae.patcher)  # type: ignore[attr-defined]
        bundle.vae_resident = True
    dynamic = bool(getattr(bundle.patcher, "is_dynamic", lambda: False)())
    partial = weight_budget is not None and not dynamic  # dynamic VRAM streams weights on demand by itself
    mm.load_models_gpu(models, memory_required=EVICT_ALL_OTHER_MODELS, force_full_load=not dynamic and not partial)
    if partial:
        keep_weights_on_device(bundle.patcher, int(weight_budget))  # type: ignore[arg-type]


def keep_weights_on_device(patcher: Any, budget: int) -> None:
    """Leave `budget` bytes of the MODEL's weights on its device and the rest in RAM, by ComfyUI's own lowvram
    loading: the layers left out cast their weights to the device as they run (comfy.ops), in forward and again in
    gradient checkpointing's recompute, so the trained LoRA sees the same weights. ComfyUI keeps its books, and the
    next `load_models_gpu` loads the model as the workflow needs it."""
    loaded = int(patcher.loaded_size())
    if loaded != budget:
        patcher.partially_load(patcher.load_device, budget - loaded)
    log.info("LoRA Loop: %.2f GB of the model's weights on the device, %.2f GB stream from RAM",
             patcher.loaded_size() / 2**30, max(0, patcher.model_size() - patcher.loaded_size()) / 2**30)


def _final_preview(bundle: ComfyBundle, config: TrainConfig, result: TrainResult, spec: NetworkSpec,
                   sink: ComfySink, steps: int) -> Any:
    """A fixed-seed sample with the LoRA in `steps` sampler steps (decoded with the real VAE after the adapters are
    gone), or the loss plot when `steps` is 0 or there is no prompt to sample.

    The adapters go in under `bundle.trainable()` too: ComfyUI 0.12.3's weights are inference tensors with
    requires_grad=True, and `Network` turns requires_grad off and back on, which autograd refuses for inference tensors
    outside inference mode. Decoding happens after the re-wrap is undone (loading the VAE may move the UNet).
    """
    if steps <= 0 or not config.sample_prompts:
        return loss_curve(result.losses, title=f"{config.output_name}: loss")
    sink.status(f"sampling the preview ({steps} steps, cfg {config.sample_cfg:g})")
    with bundle.trainable(), torch.no_grad(), applied_lora(bundle, spec, result.state_dict):
        latents = sample_latents(bundle, config.sample_prompts[:1], height=config.resolution, width=config.resolution,
                                 steps=steps, cfg=config.sample_cfg, seed=config.seed, on_step=sink.sampling_step)
    bundle.preview_decode = False
    return to_pil(bundle.decode_latents(latents))[0]


def checkpoint_file(model: Any) -> str | None:
    """The file the MODEL was loaded from, where ComfyUI records it (`cached_patcher_init`: the checkpoint and
    diffusion-model loaders of recent ComfyUI, 0.33 among them; 0.12.3 records nothing)."""
    init = getattr(model, "cached_patcher_init", None)
    args = init[1] if isinstance(init, tuple) and len(init) > 1 and isinstance(init[1], tuple) else ()
    return args[0] if args and isinstance(args[0], str) and args[0] else None


def checkpoint_name(model: Any) -> str:
    """The base model's name for the LoRA's metadata: its file name, else a plain description."""
    path = checkpoint_file(model)
    return Path(path).name if path else "ComfyUI MODEL (loader did not record its file)"


def train_lora(model: Any, clip: Any, vae: Any, dataset: ComfyDataset, node_config: NodeConfig, *, name: str,
               node_id: str | None, save_on_cancel: bool = True, preview_steps: int | None = None) -> ComfyRun:
    """Train on the workflow's MODEL and return the LoRA plus MODEL/CLIP clones with it applied.

    `preview_steps`: sampler steps of the preview drawn after training (0: the loss plot; None: `sample_steps`).
    """
    import comfy.model_management as mm
    import comfy.sd

    with torch.inference_mode(False):
        base = checkpoint_name(model)
        bundle = ComfyBundle(model, clip, vae, name=base)
        config = node_config.resolve(bundle.family, bundle.prediction_type, bundle.compute_dtype)
        config = dataset.config_for(replace(config, output_name=name, base_model=base))
        train_dataset = dataset.build(config)
        sink = ComfySink(node_id)
        plan = plan_run(bundle, config, train_dataset)  # before anything is encoded or loaded
        sink.status(plan_text(plan))
        require_fit(plan)
        if plan is not None:
            config, train_dataset = apply_plan(plan, config, train_dataset, rebuild=dataset.build)
        sink.status(f"{bundle.family.name} ({bundle.prediction_type}); {len(train_dataset.records)} images, "
                    f"{len(train_dataset)} samples per epoch at {config.resolution}px; buckets:\n"
                    + format_bucket_table(train_dataset.bucket_counts()))
        if config.train_text_encoder:
            bundle.train_text_encoders()
        session = TrainingSession(bundle, config, train_dataset, sink, SessionHooks(
            lora_path=_lora_file, find_lora=find_lora, after_save=invalidate_lora_list,
            save_on_cancel=save_on_cancel), model_name=base)
        session.run.model_hash = quick_model_hash(checkpoint_file(model))
        captions = sorted({r.caption or "" for r in train_dataset.records} | {config.trigger_word, ""})
        bundle.set_caption_lengths(captions + list(config.sample_prompts))
        bundle.cache_text(list(config.sample_prompts))
        try:
            batches: BatchMaker = prepare_batches(bundle, train_dataset, config, sink)
        except TrainingInterrupted as stop:  # Cancel while caching latents: nothing trained yet
            raise mm.InterruptProcessingException() from stop
        batches.chunk_size = plan.chunk_size if plan is not None else None
        swapping = plan is not None and plan.shape.blocks_to_swap > 0 and plan.shape.weights_resident is False
        _load_for_training(bundle, config, dynamic_captions=not batches.text_cached,  # text encoded every step
                           encode_images=batches.latent_cache is None,
                           weight_budget=plan.memory.parts["weights_unet"] if swapping else None)
        bundle.preview_decode = True
        try:
            with bundle.trainable() as wrapped:
                log.info("LoRA Loop: %d frozen tensors re-wrapped for autograd (no copy)", wrapped)
                result = session.train(batches)
            # Outside the re-wrap: decoding may make ComfyUI move the UNet's (original) weights.
            steps = config.sample_steps if preview_steps is None else preview_steps
            preview = _final_preview(bundle, config, result, session.spec, sink, steps)
        except TrainingInterrupted as stop:
            raise mm.InterruptProcessingException() from stop  # the cancelled LoRA is saved already (`stop.saved`)
        finally:
            bundle.preview_decode = bundle.clip_resident = bundle.vae_resident = False
            mm.soft_empty_cache()
        triggers = [config.trigger_word] if config.trigger_word else []
        lora = TrainedLora(result.state_dict, result.metadata, triggers, preview, bundle.family.name)
        model_out, clip_out = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    summary = (f"trained {result.steps} steps on {len(train_dataset.records)} images; final loss "
               f"{result.losses[-1]:.4f}" if result.losses else "no steps trained")
    return ComfyRun(lora, model_out, clip_out, result.losses, result.steps, summary, plan_text(plan))


def loss_image(losses: list[float], title: str) -> torch.Tensor:
    """The loss curve as a ComfyUI IMAGE ([1,H,W,3] float in [0,1])."""
    import numpy as np

    array = np.asarray(loss_curve(losses, title=title).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None]

