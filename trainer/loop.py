"""The training loop, readable top to bottom: setup → steps (accumulate, clip, step, report) → export.

The host's modules are adapted in place and always restored: `Network` is removed in a `finally`, whatever happens.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from .checkpointing import gradient_checkpointing
from .config import TrainConfig
from .distributed import broadcast_parameters, sum_gradients, sum_scalar
from .errors import NonFiniteLossError, TrainingInterrupted
from .loss import LossSettings, diffusion_loss, draw_noise
from .memory import OomRecovery
from .metadata import RunInfo, build_metadata
from .network import Network, NetworkSpec, network_spec
from .optim import build_optimizer
from .progress import NullSink, ProgressSink, StepInfo
from .schedule import lr_factor
from .state import TrainState

if TYPE_CHECKING:
    from .batches import BatchMaker
    from .bundle import ModelBundle

log = logging.getLogger(__name__)

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    """What a run produced. `state_dict` is the LoRA in kohya layout (save dtype), ready for `save_lora`."""

    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str]
    losses: list[float]
    steps: int
    spec: NetworkSpec
    run: RunInfo
    interrupted: bool = False
    train_state: TrainState | None = None
    samples: list = field(default_factory=list)
    config: TrainConfig | None = None  # the config as the run ended (the OOM ladder may have changed settings)


@dataclass
class Schedule:
    """How many optimizer steps a run has and where each one reads its micro-batches."""

    batches_per_epoch: int
    accumulation_steps: int
    total_steps: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch / self.accumulation_steps)

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, first batch index in that epoch) of 0-based optimizer step `step`."""
        epoch, within = divmod(step, self.steps_per_epoch)
        return epoch, within * self.accumulation_steps


def make_schedule(config: TrainConfig, batches_per_epoch: int) -> Schedule:
    steps_per_epoch = math.ceil(batches_per_epoch / config.accumulation_steps)
    total = config.max_train_steps or steps_per_epoch * config.epochs
    return Schedule(batches_per_epoch, config.accumulation_steps, total)


def non_finite_advice(config: TrainConfig) -> str:
    """What to change after a NaN/inf loss, naming only the levers this run can still pull."""
    levers = [f"lower learning_rate (now {config.learning_rate:g})"]
    if config.mixed_precision == "fp16":  # fp16's narrow range overflows; bf16 has fp32's
        levers.append("use mixed_precision bf16 instead of fp16")
    if not config.max_grad_norm:
        levers.append("enable max_grad_norm (1.0 is typical)")
    text = levers[0] if len(levers) == 1 else ", ".join(levers[:-1]) + f" or {levers[-1]}"
    return text[0].upper() + text[1:]


def _param_groups(network: Network, config: TrainConfig) -> list[dict]:
    groups = [{"params": network.parameters("unet"), "lr": config.learning_rate, "name": "unet"}]
    te_params = [p for slot in network.bundle.text_encoders for p in network.parameters(slot.prefix)]
    if te_params:
        groups.append({"params": te_params, "lr": config.text_encoder_lr or config.learning_rate, "name": "te"})
    return [g for g in groups if g["params"]]


def _autocast(bundle: ModelBundle, config: TrainConfig) -> contextlib.AbstractContextManager:
    if config.mixed_precision not in AUTOCAST_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(bundle.device.type, dtype=AUTOCAST_DTYPES[config.mixed_precision])


def _grad_scaler(device_type: str, enabled: bool):  # noqa: ANN202 - a GradScaler
    """torch.amp.GradScaler (torch ≥ 2.3), or the CUDA one of older torch (A1111 ships torch 2.1)."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device_type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled and device_type == "cuda")


def _tensorboard(config: TrainConfig):  # noqa: ANN202 - SummaryWriter or None
    if not config.logging_dir:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("logging_dir is set but tensorboard is not installed (pip install tensorboard); not logging")
        return None
    return SummaryWriter(config.logging_dir)


def train(bundle: ModelBundle, batches: BatchMaker, config: TrainConfig, sink: ProgressSink | None = None, *,
          spec: NetworkSpec | None = None, initial_lora: dict[str, torch.Tensor] | None = None,
          resume: TrainState | None = None, run: RunInfo | None = None,
          on_step_end: Callable[[int, Network], None] | None = None,
          recovery: OomRecovery | None = None) -> TrainResult:
    """Train a LoRA on `bundle` with the micro-batches `batches` makes; the bundle is restored when this returns/raises.

    Raises:
        NonFiniteLossError: the loss became NaN/inf (nothing is returned or saved).
        TrainingInterrupted: the sink asked to stop, or one of the sink's `interrupt_errors` was raised (then
            chained as the cause); `.result` holds what was trained up to the last completed step.
    """
    sink = sink or NullSink()
    spec = spec or network_spec(config)
    run = run or RunInfo(model_name=bundle.name)
    recovery = recovery or OomRecovery(bundle, batches, config, run=run)  # OOM/spill → next rung, same step again
    step_fn, on_step_end = recovery.wrap(_optimizer_step), recovery.wrap_callback(on_step_end)
    schedule = make_schedule(config, batches.batches_per_epoch)
    settings = LossSettings(config.min_snr_gamma, config.noise_offset, config.timestep_sampling)
    torch.manual_seed(config.seed)  # peft's adapter init draws from the global RNG
    with Network(bundle, spec) as network:
        if initial_lora is not None:
            network.load_state_dict(initial_lora)
        broadcast_parameters(network.parameters(), batches.world)  # every rank starts from rank 0's adapters
        optimizer = build_optimizer(config.optimizer, _param_groups(network, config), config.learning_rate,
                                    config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
            s, scheduler=config.lr_scheduler, warmup_steps=config.lr_warmup_steps, total_steps=schedule.total_steps,
            num_cycles=config.lr_num_cycles))
        scaler = _grad_scaler(bundle.device.type, config.mixed_precision == "fp16")
        losses: list[float] = []
        start = 0
        if resume is not None:
            start = resume.apply(network, optimizer, scheduler, scaler)
            losses = list(resume.losses)
        writer = _tensorboard(config)
        params = network.parameters()
        run.num_batches_per_epoch = schedule.batches_per_epoch
        sink.status(f"training {schedule.total_steps} steps ({len(network.names)} adapted modules)")
        tick = time.perf_counter()
        step = completed = start
        # A host may cancel by raising its own exception from inside a forward (ComfyUI 0.33 does it in every op,
        # the CLI gets KeyboardInterrupt): it ends the run like a stop request, keeping the last completed step.
        interrupts = tuple(getattr(sink, "interrupt_errors", ()))
        try:
            # Block swap needs checkpointing (blockswap.py); the recovery context starts the swap itself.
            checkpointing = config.gradient_checkpointing or config.blocks_to_swap > 0
            with gradient_checkpointing(bundle.unet, checkpointing), recovery:
                for step in range(start, schedule.total_steps):
                    if sink.should_stop():
                        raise TrainingInterrupted(f"cancelled after {step} steps", step=step)
                    loss = step_fn(bundle, batches, schedule, step, config, settings, optimizer, scaler, params)
                    if not math.isfinite(loss):
                        advice = non_finite_advice(config)
                        msg = f"the loss became {loss} at step {step + 1}; nothing was saved. {advice}"
                        raise NonFiniteLossError(msg, step=step + 1)
                    scheduler.step()
                    losses.append(loss)
                    completed = step + 1
                    now = time.perf_counter()
                    info = StepInfo(step + 1, schedule.total_steps, schedule.locate(step)[0] + 1, loss,
                                    scheduler.get_last_lr()[0], (now - tick) / (step + 1 - start))
                    sink.step(info)
                    if writer is not None:
                        writer.add_scalar("loss", loss, step + 1)
                        writer.add_scalar("lr", info.lr, step + 1)
                    if on_step_end is not None:
                        on_step_end(step + 1, network)
            step = schedule.total_steps
        except (TrainingInterrupted, *interrupts) as stop:
            done = stop.step if isinstance(stop, TrainingInterrupted) else completed
            partial = _finish(network, recovery, spec, run, losses, done, schedule, optimizer=optimizer,
                              scheduler=scheduler, scaler=scaler, interrupted=True)
            cancel = stop if isinstance(stop, TrainingInterrupted) else TrainingInterrupted(
                f"cancelled after {done} steps", step=done)
            cancel.result = partial  # type: ignore[attr-defined]
            if cancel is stop:
                raise
            raise cancel from stop
        finally:
            if writer is not None:
                writer.close()
        result = _finish(network, recovery, spec, run, losses, step, schedule, optimizer=optimizer,
                         scheduler=scheduler, scaler=scaler)
    return result


def _finish(network: Network, recovery: OomRecovery, spec: NetworkSpec, run: RunInfo, losses: list[float],
            steps: int, schedule: Schedule, *, optimizer: torch.optim.Optimizer, scheduler: object, scaler: object,
            interrupted: bool = False) -> TrainResult:
    """The result and its resumable state as the OOM ladder left the run: its config (checkpointing, caches,
    optimizer, rank), the adapters' rank (ss_network_dim) and the optimizer that is stepping now."""
    config = recovery.config
    if recovery.lowered_rank:
        spec = replace(spec, rank=recovery.lowered_rank)
    result = _result(network, config, spec, run, losses, steps, schedule, interrupted=interrupted)
    result.train_state = TrainState.capture(network, recovery.optimizer or optimizer, scheduler, scaler, steps, losses,
                                            config)
    result.config = config
    return result


def micro_batch_seed(seed: int, epoch: int, batch_index: int) -> int:
    """The seed of one micro-batch's noise and timesteps: fixed by data position, so resume and chunking change
    nothing."""
    return (seed * 0x9E3779B1 + epoch * 0x85EBCA77 + batch_index * 0xC2B2AE3D) % (2**63)


def _optimizer_step(bundle: ModelBundle, batches: BatchMaker, schedule: Schedule, step: int, config: TrainConfig,
                    settings: LossSettings, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    params: list[torch.nn.Parameter]) -> float:
    """Accumulate gradients over this step's micro-batches (split into chunks if memory demands), then step."""
    epoch, first = schedule.locate(step)
    indices = range(first, min(first + schedule.accumulation_steps, schedule.batches_per_epoch))
    total_loss = 0.0
    for batch_index in indices:
        micro = batches.micro_batch(epoch, batch_index)
        n = len(micro.captions)
        if n == 0:  # this rank's slice of a small global micro-batch is empty
            continue
        generator = torch.Generator().manual_seed(micro_batch_seed(config.seed, epoch, batch_index))
        # The noise of the whole (global) micro-batch, then this rank's slice: every process draws what one process
        # training the global batch would draw for these samples.
        shape = (micro.total, *micro.latents.shape[1:])
        draw = draw_noise(shape, generator, settings, len(bundle.alphas_cumprod),
                          flow=bundle.prediction_type == "flow")[micro.offset : micro.offset + n]
        for lo in range(0, n, batches.chunk_size or n):
            hi = min(n, lo + (batches.chunk_size or n))
            weight = (hi - lo) / micro.total / len(indices)
            with _autocast(bundle, config):
                cond = micro.conditioning(bundle, slice(lo, hi))
                loss = diffusion_loss(bundle, micro.latents[lo:hi], cond, draw[lo:hi], settings, micro.sizes[lo:hi])
            scaler.scale(loss * weight).backward()
            total_loss += loss.item() * weight
    world = batches.world
    if world.distributed:  # each rank holds its weighted share: the sums are the global batch's mean
        sum_gradients(params, world)
        total_loss = sum_scalar(total_loss, world, bundle.device)
    if config.max_grad_norm:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total_loss


def _result(network: Network, config: TrainConfig, spec: NetworkSpec, run: RunInfo, losses: list[float], steps: int,
            schedule: Schedule, *, interrupted: bool = False) -> TrainResult:
    run.steps = steps
    run.epoch = schedule.locate(max(steps - 1, 0))[0] + 1 if steps else 0
    state = network.state_dict(SAVE_DTYPES[config.save_precision])
    meta = build_metadata(family=network.bundle.family, spec=spec, run=run, config=config,
                          output_name=config.output_name,
                          trigger_words=[config.trigger_word] if config.trigger_word else None,
                          prediction_type=network.bundle.prediction_type)
    return TrainResult(state, meta, list(losses), steps, spec, run, interrupted)
