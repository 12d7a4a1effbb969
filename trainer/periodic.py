"""What happens after an optimizer step in every front end: intermediate LoRAs (keeping the last K) and sample previews.

The CLI, ComfyUI and A1111 differ only in where a step LoRA goes, where (whether) sample PNGs are kept, what must
happen around sampling (A1111 brings its VAE back to the GPU) and after a save (ComfyUI refreshes its file list).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .bundle import ModelBundle
from .config import TrainConfig
from .lorafile import atomic_write, save_lora
from .metadata import RunInfo, build_metadata
from .network import Network, NetworkSpec
from .plot import image_grid, to_pil
from .progress import ProgressSink
from .resize import prune_to_energy
from .sampling import sample_images, sample_settings


class PeriodicSaver:
    """`on_step_end` for `loop.train`.

    Args:
        lora_path: step-LoRA file stem (`<name>-step000100`) → its path.
        steps_per_epoch: for `save_every_n_epochs`.
        samples_dir: where sample grids are written (None: only shown through the sink).
        sampling: a context manager factory wrapped around sampling (e.g. bring the VAE to the GPU).
        after_save: called after each step LoRA is written (e.g. refresh a host's file list).
    """

    def __init__(self, bundle: ModelBundle, config: TrainConfig, spec: NetworkSpec, sink: ProgressSink, run: RunInfo,
                 *, lora_path: Callable[[str], Path], steps_per_epoch: int, samples_dir: Path | None = None,
                 sampling: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 after_save: Callable[[], None] | None = None) -> None:
        self.bundle, self.config, self.spec, self.sink, self.run = bundle, config, spec, sink, run
        self.lora_path, self.steps_per_epoch, self.samples_dir = lora_path, steps_per_epoch, samples_dir
        self.sampling, self.after_save = sampling, after_save
        self.saved: list[Path] = []

    def __call__(self, step: int, network: Network) -> None:
        c = self.config
        by_steps = c.save_every_n_steps and step % c.save_every_n_steps == 0
        by_epochs = c.save_every_n_epochs and step % (self.steps_per_epoch * c.save_every_n_epochs) == 0
        if by_steps or by_epochs:
            self._save(step, network)
        if c.sample_prompts and c.sample_every_n_steps and step % c.sample_every_n_steps == 0:
            self._sample(step)

    def _save(self, step: int, network: Network) -> None:
        from .loop import SAVE_DTYPES

        c = self.config
        meta = build_metadata(family=self.bundle.family, spec=self.spec, run=replace(self.run, steps=step),
                              config=c, output_name=c.output_name,
                              trigger_words=[c.trigger_word] if c.trigger_word else None,
                              prediction_type=self.bundle.prediction_type)
        path = self.lora_path(f"{c.output_name}-step{step:06d}")
        tensors = network.state_dict(SAVE_DTYPES[c.save_precision])
        if c.dynamic_rank:  # each save point gets its own ranks; training goes on at lora_rank
            pruned = prune_to_energy(tensors, meta, c.dynamic_rank)
            tensors, meta = pruned.tensors, pruned.metadata
        self.saved.append(save_lora(path, tensors, meta, overwrite=True))
        while c.save_last_n and len(self.saved) > c.save_last_n:
            self.saved.pop(0).unlink(missing_ok=True)
        if self.after_save is not None:
            self.after_save()

    def _sample(self, step: int) -> None:
        c = self.config
        with self.sampling():
            images = to_pil(sample_images(self.bundle, c.sample_prompts, **sample_settings(c)))
        grid = image_grid([images], [f"step {step}"])
        if self.samples_dir is not None:
            atomic_write(self.samples_dir / f"{c.output_name}_step{step:06d}.png",
                         lambda tmp: grid.save(tmp, format="PNG"), overwrite=True)
        self.sink.preview(step, grid)
