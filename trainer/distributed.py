"""Training on several processes (GPUs, machines) with torch's own distributed stack, launched by `torchrun`.

Data-parallel, and exact: every optimizer step reads one GLOBAL micro-batch per accumulation step (`batch_size` ×
world size samples, the same one a single process with that batch would read), each rank takes its own slice, draws
the noise of the whole global micro-batch from the shared per-micro-batch seed and keeps its slice of it, weighs its
per-sample losses by the global sample count, and the adapters' gradients are SUMMED across ranks before the step.
So N processes with `batch_size` B train the same adapters as one process with B × N (up to float summation order),
and an uneven last batch of a bucket is handled exactly (a rank may hold fewer samples, or none).

Only the adapters train, so gradients are all-reduced by hand over their few tensors (what DDP does, without wrapping
a host's module). Rank 0 alone writes files, samples and logs. A model that does not fit one card is a matter for
the memory planner (checkpointing, offload), not for sharding: LoRA Loop does not shard the base model (no FSDP).

`torchrun` sets WORLD_SIZE/RANK/LOCAL_RANK; its elastic agent ends every rank when one dies, and a collective that
loses a peer raises here after `timeout` at the latest, so a dead rank never hangs the others.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .errors import LoraLoopError

DEFAULT_TIMEOUT_S = 300  # a peer that stops answering ends the run after this long, never a silent hang


class DistributedError(LoraLoopError):
    """A multi-process run cannot start or lost one of its processes."""


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (a single process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls) -> World:
        """The world `torchrun` (or `accelerate launch`) describes in the environment; one process without it."""
        try:
            size = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError as err:
            msg = f"WORLD_SIZE/RANK/LOCAL_RANK must be integers (launch with torchrun): {err}"
            raise DistributedError(msg) from err
        if size < 1 or not 0 <= rank < size:
            msg = f"RANK {rank} is outside WORLD_SIZE {size}: launch with torchrun"
            raise DistributedError(msg)
        return cls(rank, size, local)

    def device(self) -> torch.device:
        """The accelerator of this rank (one GPU per process), else the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    def slice(self, count: int) -> tuple[int, int]:
        """(offset, length) of this rank's share of a global micro-batch of `count` samples: near-equal parts in
        rank order (the first ranks take one more when it does not divide)."""
        base, extra = divmod(count, self.size)
        offset = self.rank * base + min(self.rank, extra)
        return offset, base + (1 if self.rank < extra else 0)


SINGLE = World()


@contextlib.contextmanager
def process_group(world: World, timeout_s: int = DEFAULT_TIMEOUT_S) -> Iterator[World]:
    """Join the process group for the run (gloo on the CPU, nccl on CUDA) and leave it afterwards; nothing for one
    process."""
    if not world.distributed:
        yield world
        return
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(world.device())
    try:
        dist.init_process_group(backend, rank=world.rank, world_size=world.size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as err:
        msg = (f"rank {world.rank} of {world.size} could not join the other processes ({err}); launch every process "
               "with torchrun (MASTER_ADDR/MASTER_PORT must reach rank 0)")
        raise DistributedError(msg) from err
    try:
        yield world
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _collective_failed(world: World, what: str, err: BaseException) -> DistributedError:
    return DistributedError(f"rank {world.rank} of {world.size} lost the other processes while {what} ({err}); the "
                            "run stopped without writing this step (a file on disk is never half-written); resume from "
                            "the last state file with --resume")


def sum_gradients(params: list[torch.nn.Parameter], world: World) -> None:
    """Sum the gradients of `params` over all ranks (missing ones count as zero), in one flat buffer."""
    if not world.distributed:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    try:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    except RuntimeError as err:
        raise _collective_failed(world, "summing gradients", err) from err
    offset = 0
    for param, grad in zip(params, grads, strict=True):
        n = grad.numel()
        param.grad = flat[offset : offset + n].view_as(grad).to(grad.dtype)
        offset += n


def sum_scalar(value: float, world: World, device: torch.device | str = "cpu") -> float:
    """`value` summed over all ranks (the step's loss, each rank holding its weighted share)."""
    if not world.distributed:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    try:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    except RuntimeError as err:
        raise _collective_failed(world, "summing the loss", err) from err
    return float(tensor.item())


def broadcast_parameters(params: list[torch.nn.Parameter], world: World) -> None:
    """Start every rank from rank 0's adapters (what DDP does when it wraps a module)."""
    if not world.distributed:
        return
    import torch.distributed as dist

    try:
        for param in params:
            dist.broadcast(param.data, src=0)
    except RuntimeError as err:
        raise _collective_failed(world, "sharing the initial adapters", err) from err
