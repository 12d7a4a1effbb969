"""OOM recovery: catch an out-of-memory error (or a detected spill), free memory, pull the next lever of the ladder
and redo the same step — same micro-batches, same noise, nothing lost.

The ladder, cheapest first, keeps the effective batch throughout:

1. `chunk`: run each micro-batch in smaller chunks (batch↓ accumulation↑ without touching data order or maths);
   halves until 1.
2. `gradient_checkpointing`: recompute block activations in backward.
3. `cache`: cache latents and text outputs (encode one image at a time) and move idle encoders off the device.
4. `optimizer`: AdamW → AdamW8bit (bitsandbytes, or our pure-torch one when it is absent).
5. `swap`: stream more transformer blocks from host memory (DiTs the engine holds: the command line), a quarter of
   the blocks more per rung; slower, same maths.
6. `bucket`: cap the latent area (×0.75 per rung, down to half the original), shrinking larger buckets' latents.
7. `rank`: halve the LoRA rank (truncated SVD of each adapter's update), down to 4.

Then it gives up with `OutOfMemoryGiveUp`, naming what was tried and what would fit. Every change is logged and
appended to `RunInfo.changes` (written into the LoRA as `loraloop_changes`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ...blockswap import BlockSwap, swappable_blocks
from ...checkpointing import gradient_checkpointing
from ...errors import LoraLoopError
from ...network import MIN_RANK
from .levers import (
    cap_batches,
    lora_layers,
    offload,
    release_memory,
    shrink_network_rank,
    swap_optimizer,
    unet_multiple,
)
from .spill import SpillEvent, SpillGuard, cuda_memory_fill

# torch < 2.5 (A1111 ships 2.1) has only the CUDA spelling.
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

log = logging.getLogger(__name__)

LADDER = ("chunk", "gradient_checkpointing", "cache", "optimizer", "swap", "bucket", "rank")
# With several processes only one rank may run out of memory: it may change how it computes, never what (a changed
# optimizer, bucket or rank on one rank alone would make the ranks' adapters diverge).
PER_RANK_LADDER = ("chunk", "gradient_checkpointing", "cache", "swap")
SWAP_SHARE = 0.25  # the swap rung streams this share of the blocks more each time
BUCKET_FACTOR = 0.75
BUCKET_FLOOR = 0.5  # never below half the original largest latent area
# Retries of one step: every rung of the ladder, each possibly several times (chunk halvings, bucket and rank steps).
MAX_TRIES_PER_STEP = 32


class OutOfMemoryGiveUp(LoraLoopError):
    """Out of memory with every lever pulled. `tried` lists the adjustments made; the message says what would fit."""

    def __init__(self, msg: str, *, step: int, tried: list[str]) -> None:
        super().__init__(msg)
        self.step = step
        self.tried = tried


@dataclass(frozen=True)
class Adjustment:
    """One rung pulled: which lever, the value before and after, and the line written to the log and metadata."""

    rung: str
    key: str
    old: Any
    new: Any
    step: int
    cause: str

    @property
    def message(self) -> str:
        return f"step {self.step + 1}: {self.cause} → {self.key} {self.old} → {self.new}"


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the RuntimeErrors other allocators raise (CPU, MPS)."""
    if isinstance(error, OUT_OF_MEMORY):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class OomRecovery:
    """Holds the ladder's state for one run and applies its levers.

    Args:
        bundle: the model bundle being trained (for checkpointing and offloading).
        batches: the run's `BatchMaker` (chunk size, caches, bucket cap act on it).
        config: the run's config (batch size, caching, optimizer, sampling). `self.config` follows the ladder: after
            a rung it holds the changed setting (gradient_checkpointing, cache_latents, cache_text_encoder_outputs,
            optimizer, lora_rank), so the LoRA's metadata and the resumable state describe the run as it ended.
        run: the run's `RunInfo`; every adjustment is appended to `run.changes`.
        spill_guard: detects spills into system RAM (None: off; default on for CUDA).
        advise: returns what would fit (e.g. from the planner) for the give-up message.
        sampling_in_run: sample images are made during training (encoders then stay on the device).
    """

    def __init__(self, bundle: Any, batches: Any, config: Any, *, run: Any = None,
                 spill_guard: SpillGuard | None = None, advise: Callable[[], str] | None = None,
                 sampling_in_run: bool | None = None) -> None:
        self.bundle = bundle
        self.batches = batches
        self.config = config
        self.run = run
        self.spill_guard = spill_guard if spill_guard is not None else (
            SpillGuard() if getattr(bundle, "device", torch.device("cpu")).type == "cuda" else None)
        self.advise = advise
        self.sampling_in_run = bool(config.sample_prompts and config.sample_every_n_steps) \
            if sampling_in_run is None else sampling_in_run
        self.adjustments: list[Adjustment] = []
        self.optimizer: torch.optim.Optimizer | None = None  # set when the ladder swapped the optimizer
        self.rank: int = config.lora_rank  # the adapters' (largest) rank once the ladder touched it
        self.lowered_rank: int | None = None  # set when the ladder lowered the rank (metadata must say so)
        self._stack = contextlib.ExitStack()
        self._checkpointing = bool(config.gradient_checkpointing or getattr(config, "blocks_to_swap", 0))
        self._swap: BlockSwap | None = None
        self._original_area: int | None = None
        self._cap: int | None = None
        self._undo_cap: Callable[[], None] | None = None
        self._rungs_done: set[str] = set()

    # -- context: everything the ladder changed on shared objects is undone on exit ----------------------------------
    def __enter__(self) -> OomRecovery:
        count = getattr(self.config, "blocks_to_swap", 0)
        if count and self._can_swap():
            self._swap_blocks(count)
        elif count:
            log.info("blocks_to_swap %d ignored: %s", count, "the host places this model's weights itself"
                     if not getattr(self.bundle, "engine_block_swap", False) else "the model has no transformer blocks")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._undo_cap is not None:
            self._undo_cap()
            self._undo_cap = None
        if self._swap is not None:
            self._swap.__exit__(None, None, None)
            self._swap = None
        self._stack.close()

    # -- block swap ---------------------------------------------------------------------------------------------------
    def _can_swap(self) -> bool:
        """The engine swaps blocks of models it holds itself (standalone bundles); a host places its own weights."""
        return bool(getattr(self.bundle, "engine_block_swap", False)) and bool(swappable_blocks(self.bundle.unet))

    def _swap_blocks(self, count: int) -> None:
        if self._swap is not None:
            self._swap.__exit__(None, None, None)
        self._swap = BlockSwap(self.bundle.unet, count, self.bundle.device).__enter__()

    # -- the ladder -----------------------------------------------------------------------------------------------
    def on_oom(self, step: int, cause: str, *, optimizer: torch.optim.Optimizer | None = None,
               params: list | None = None) -> Adjustment:
        """Pull the next lever that can still change something; raise `OutOfMemoryGiveUp` when none is left."""
        release_memory()
        world = getattr(self.batches, "world", None)
        for rung in PER_RANK_LADDER if world is not None and world.distributed else LADDER:
            adjustment = getattr(self, f"_rung_{rung}")(step, cause, optimizer, params)
            if adjustment is not None:
                self.adjustments.append(adjustment)
                log.warning("out of memory: %s", adjustment.message)
                if self.run is not None:
                    self.run.changes.append(adjustment.message)
                if self.spill_guard is not None:
                    self.spill_guard.reset()
                release_memory()
                return adjustment
        raise OutOfMemoryGiveUp(self._give_up_message(step, cause), step=step,
                                tried=[a.message for a in self.adjustments])

    def _rung_chunk(self, step: int, cause: str, *_: Any) -> Adjustment | None:
        current = self.batches.chunk_size or self.batches.batch_size
        if current <= 1:
            return None
        new = max(1, current // 2)
        self.batches.chunk_size = new
        return Adjustment("chunk", "chunk_size", current, new, step,
                          f"{cause}; batch {self.batches.batch_size} now runs in chunks (same maths and data order)")

    def _rung_gradient_checkpointing(self, step: int, cause: str, *_: Any) -> Adjustment | None:
        if self._checkpointing:
            return None
        self._stack.enter_context(gradient_checkpointing(self.bundle.unet, True))
        self._checkpointing = True
        self._set(gradient_checkpointing=True)
        return Adjustment("gradient_checkpointing", "gradient_checkpointing", False, True, step, cause)

    def _rung_cache(self, step: int, cause: str, *_: Any) -> Adjustment | None:
        if "cache" in self._rungs_done:
            return None
        self._rungs_done.add("cache")
        done = []
        batches, dataset = self.batches, self.batches.dataset
        if batches.latent_cache is None and dataset.options.crop != "random":
            from ...data import LatentCache

            batches.latent_cache = LatentCache(self.bundle.encode_images, options=dataset.options,
                                               encoder_id=f"{self.bundle.name}|{self.bundle.family.name}")
            self._set(cache_latents=True)
            done.append("latents")
        # Like `batches.caches_text`, minus the config switch: out of memory, the ladder overrides a user's "off".
        if not batches.text_cached and self.config.can_cache_text(dataset.captions_are_static):
            batches.cache_text_outputs()
            self._set(cache_text_encoder_outputs=True)
            done.append("text outputs")
        moved = self._offload_encoders(latents=batches.latent_cache is not None, text=batches.text_cached)
        if not done and not moved:
            return None
        what = " and ".join(done) or "nothing new"
        return Adjustment("cache", "cache", "off" if done else "on", f"{what} cached" +
                          (f", {', '.join(moved)} moved off the device" if moved else ""), step, cause)

    def _offload_encoders(self, *, latents: bool, text: bool) -> list[str]:
        """Move idle encoders of a standalone diffusers bundle to the CPU (hosts manage their own models)."""
        from ...bundles.diffusers_bundle import DiffusersBundle

        if self.sampling_in_run or not isinstance(self.bundle, DiffusersBundle) or self.bundle.device.type == "cpu":
            return []
        moved, modules = [], []
        if latents and next(self.bundle.vae.parameters()).device.type != "cpu":
            modules.append(self.bundle.vae)
            moved.append("VAE")
        if text and not self.config.train_text_encoder:
            for slot in self.bundle.text_encoders:
                if next(slot.module.parameters()).device.type != "cpu":
                    modules.append(slot.module)
                    moved.append(slot.prefix)
        if modules:
            self._stack.callback(offload(modules))
        return moved

    def _rung_optimizer(self, step: int, cause: str, optimizer: torch.optim.Optimizer | None, *_: Any
                        ) -> Adjustment | None:
        from ...optim import eight_bit_backend

        if "optimizer" in self._rungs_done or optimizer is None:
            return None
        self._rungs_done.add("optimizer")
        if self.config.optimizer != "adamw":  # another optimizer was chosen for how it learns: not swapped away
            log.info("OOM ladder: 8-bit optimizer skipped (optimizer is %s)", self.config.optimizer)
            return None
        self.optimizer = swap_optimizer(optimizer, "adamw8bit")
        self._set(optimizer="adamw8bit")
        return Adjustment("optimizer", "optimizer", "adamw", f"adamw8bit ({eight_bit_backend()}; state restarted)",
                          step, cause)

    def _rung_swap(self, step: int, cause: str, *_: Any) -> Adjustment | None:
        if not self._checkpointing or not self._can_swap():
            return None
        total = len(swappable_blocks(self.bundle.unet))
        old = self._swap.count if self._swap is not None else 0
        if old >= total:
            return None
        new = min(total, old + max(1, math.ceil(total * SWAP_SHARE)))
        self._swap_blocks(new)
        self._set(blocks_to_swap=new)
        return Adjustment("swap", "blocks_to_swap", old, new, step,
                          f"{cause}; {new} of {total} blocks stream from host memory (slower, same maths)")

    def _rung_bucket(self, step: int, cause: str, *_: Any) -> Adjustment | None:
        if self._original_area is None:
            w, h = max(self.batches.dataset.bucket_counts(), key=lambda b: b[0] * b[1])
            self._original_area = (w // 8) * (h // 8)
        current = self._cap or self._original_area
        floor = int(self._original_area * BUCKET_FLOOR)
        if current <= floor:
            return None
        new = max(floor, int(current * BUCKET_FACTOR))
        if self._undo_cap is not None:
            self._undo_cap()
        self._undo_cap = cap_batches(self.batches, new, unet_multiple(self.bundle.unet))
        self._cap = new
        side = lambda area: int(math.sqrt(area)) * 8  # noqa: E731
        return Adjustment("bucket", "max bucket area", f"{side(current)}²", f"{side(new)}²", step,
                          f"{cause}; larger buckets' latents are downscaled")

    def _rung_rank(self, step: int, cause: str, optimizer: torch.optim.Optimizer | None, params: list | None
                   ) -> Adjustment | None:
        if optimizer is None or params is None or self.config.network_type not in ("lora", "locon"):
            return None
        roots = [self.bundle.unet, *(s.module for s in self.bundle.text_encoders)]
        ranks = [layer.r["default"] for r in roots for layer in lora_layers(r)]
        if not ranks:
            return None
        old = max(ranks)  # the live adapters' rank (a resumed LoRA file may differ from the config)
        if old <= MIN_RANK:
            return None
        new = max(MIN_RANK, old // 2)
        shrink_network_rank(roots, new, self.optimizer or optimizer, params)
        self.rank = self.lowered_rank = new
        self._set(lora_rank=new, lora_alpha=self.config.alpha)  # the truncated adapters keep their alpha
        return Adjustment("rank", "lora_rank", old, new, step, f"{cause}; adapters truncated by SVD")

    def _set(self, **changes: Any) -> None:
        """Record a rung's setting in `self.config` (a frozen TrainConfig; other config objects are left alone)."""
        if dataclasses.is_dataclass(self.config):
            self.config = dataclasses.replace(self.config, **changes)

    def _give_up_message(self, step: int, cause: str) -> str:
        tried = "; ".join(f"{a.key} {a.new}" for a in self.adjustments) or "nothing could be changed"
        fit = self.advise() if self.advise is not None else (
            "train at a lower resolution, free memory used by other programs, or use a GPU with more memory")
        return (f"out of memory at step {step + 1} ({cause}) with every lever pulled ({tried}). What would fit: "
                f"{fit}")

    # -- wiring into the loop ---------------------------------------------------------------------------------------
    def wrap(self, step_fn: Callable[..., float]) -> Callable[..., float]:
        """`loop._optimizer_step` guarded: on OOM free memory, adjust and redo the step; watch for spills."""

        def guarded(bundle, batches, schedule, step, config, settings, optimizer, scaler, params):  # noqa: ANN001, ANN202
            for _ in range(MAX_TRIES_PER_STEP):
                current = self._current_optimizer(optimizer)
                start = time.perf_counter()
                try:
                    loss = step_fn(bundle, batches, schedule, step, config, settings, current, scaler, params)
                except (OUT_OF_MEMORY, RuntimeError) as error:
                    if not is_out_of_memory(error):
                        raise
                    cause = f"out of memory ({_short(error)})"
                else:
                    self._watch(step, time.perf_counter() - start, optimizer, params)
                    return loss
                # Outside the except block: the traceback (and the tensors its frames hold) is gone.
                current.zero_grad(set_to_none=True)
                self.on_oom(step, cause, optimizer=current, params=params)
            msg = f"step {step + 1} ran out of memory {MAX_TRIES_PER_STEP} times"
            raise OutOfMemoryGiveUp(msg, step=step, tried=[a.message for a in self.adjustments])

        return guarded

    def wrap_callback(self, fn: Callable[[int, Any], None] | None) -> Callable[[int, Any], None] | None:
        """`on_step_end` (periodic saves, sample images) guarded: an OOM there skips that sample/save, logged."""
        if fn is None:
            return None

        def guarded(step: int, network: Any) -> None:
            try:
                fn(step, network)
                return
            except (OUT_OF_MEMORY, RuntimeError) as error:
                if not is_out_of_memory(error):
                    raise
                text = f"step {step}: out of memory while saving/sampling ({_short(error)}); skipped, training goes on"
            release_memory()
            log.warning("%s", text)
            if self.run is not None:
                self.run.changes.append(text)

        return guarded

    def _current_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        if self.optimizer is None:
            return optimizer
        # The loop's scheduler keeps setting the learning rate on the optimizer it knows; mirror it.
        for new, old in zip(self.optimizer.param_groups, optimizer.param_groups, strict=True):
            new["lr"] = old["lr"]
        return self.optimizer

    def _watch(self, step: int, seconds: float, optimizer: torch.optim.Optimizer, params: list) -> None:
        if self.spill_guard is None:
            return
        reserved, total = cuda_memory_fill()
        event = self.spill_guard.observe(step, seconds, reserved, total)
        if event is not None:
            self.on_spill(event, optimizer, params)

    def on_spill(self, event: SpillEvent, optimizer: torch.optim.Optimizer | None = None,
                 params: list | None = None) -> Adjustment:
        """A spill is an OOM the driver hid: pull the next lever for the following steps (this one finished)."""
        return self.on_oom(event.step, f"spilling into system RAM ({event.seconds:.1f} s/step vs "
                           f"{event.median:.2f})", optimizer=self._current_optimizer(optimizer) if optimizer else None,
                           params=params)


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:120]
