"""Block swap: the last N transformer blocks of a DiT live in (pinned) host memory and are streamed to the device
one block ahead of the one computing, so a model larger than the card trains.

How (the design kohya's and musubi-tuner's `blocks_to_swap` share, written for our loop):
- Only frozen tensors move. The adapters (trainable) stay on the device, so the optimizer never sees a moved tensor.
- Moving is re-pointing: a swapped Parameter's `.data` is its host copy between uses and a device copy while its block
  runs; the frozen weights never change, so nothing is copied back.
- A forward pre-hook on every module of a block that owns tensors tells which block runs now. Hooks on the leaves (not
  only on the block) still fire when gradient checkpointing recomputes a block inside backward, which calls the block's
  forward function directly.
- The direction (forward: up, backward's recompute: down) picks the neighbour to prefetch on a side CUDA stream, so the
  copy overlaps the current block's compute. At most two swapped blocks are on the device at a time (plus what
  autograd still holds for a backward in progress).
- Swapping needs gradient checkpointing: without it autograd saves every block's weights for backward and nothing is
  freed (the loop turns checkpointing on with it).

On exit every tensor is copied back to the device it came from: values bit-identical, the same Parameter objects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from .checkpointing import DIT_BLOCK_CLASSES

log = logging.getLogger(__name__)

def swappable_blocks(root: nn.Module) -> list[nn.Module]:
    """The DiT blocks of `root` in registration order (= execution order for every supported family)."""
    return [m for m in root.modules() if type(m).__name__ in DIT_BLOCK_CLASSES]


def place_unswapped(root: nn.Module, device: torch.device | str, count: int) -> None:
    """Move `root` to `device` except the last `count` DiT blocks (they stay in host memory for `BlockSwap`), so a
    model bigger than the card never lands on it whole."""
    blocks = swappable_blocks(root)[len(swappable_blocks(root)) - count:] if count else []
    staying = {id(m) for block in blocks for m in block.modules()}
    for module in root.modules():
        if id(module) not in staying:
            module._apply(lambda t: t.to(device), recurse=False)  # what nn.Module.to does, one module at a time


@dataclass
class _Slot:
    """One frozen tensor of a swapped block: where it lives in its module and its host copy."""

    module: nn.Module
    name: str
    is_param: bool
    home: torch.device
    host: torch.Tensor

    def point_to(self, tensor: torch.Tensor) -> None:
        if self.is_param:
            self.module._parameters[self.name].data = tensor  # type: ignore[union-attr]
        else:
            self.module._buffers[self.name] = tensor


@dataclass
class _Block:
    index: int
    slots: list[_Slot] = field(default_factory=list)
    copies: list[torch.Tensor] | None = None  # device copies while loaded (or being loaded)
    ready: torch.cuda.Event | None = None


class BlockSwap:
    """Context manager: swap the last `count` DiT blocks of `root` between `device` and host memory.

    Args:
        root: the transformer (adapters already injected: trainable tensors are left where they are).
        count: blocks to keep off the device (capped at the number of blocks).
        device: the compute device.
    Attributes:
        loads: block loads done (tests and logs); `max_resident`: most swapped blocks on the device at once.
    """

    def __init__(self, root: nn.Module, count: int, device: torch.device | str) -> None:
        self.root = root
        self.device = torch.device(device)
        self.blocks = swappable_blocks(root)
        self.count = max(0, min(count, len(self.blocks)))
        self.swapped: dict[int, _Block] = {}
        self.loads = 0
        self.max_resident = 0
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._current: int | None = None
        self._direction = 1
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @property
    def moved_bytes(self) -> int:
        """Bytes kept off the device."""
        return sum(s.host.numel() * s.host.element_size() for b in self.swapped.values() for s in b.slots)

    def __enter__(self) -> BlockSwap:
        if not self.count:
            return self
        first = len(self.blocks) - self.count
        for index in range(first, len(self.blocks)):
            self.swapped[index] = self._offload(index)
        for index, block in enumerate(self.blocks):
            for module in block.modules():
                if module is block or _owns_tensors(module):
                    self._hooks.append(module.register_forward_pre_hook(self._hook(index)))
        log.info("block swap: %d of %d blocks (%.2f GB) stream from host memory", self.count, len(self.blocks),
                 self.moved_bytes / 1024**3)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for block in self.swapped.values():
            block.copies = block.ready = None
            for slot in block.slots:  # home again: the same objects, bit-identical values
                slot.point_to(slot.host.to(slot.home))
        self.swapped.clear()
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)

    # -- placement ---------------------------------------------------------------------------------------------------
    def _offload(self, index: int) -> _Block:
        """Host copies of a block's frozen tensors (a block the runner left on the CPU keeps its tensors); its
        adapters go to the device."""
        block = _Block(index)
        pin = self.device.type == "cuda"
        for module in self.blocks[index].modules():
            for table, is_param in ((module._parameters, True), (module._buffers, False)):
                for name, tensor in table.items():
                    if tensor is None:
                        continue
                    if is_param and tensor.requires_grad:
                        tensor.data = tensor.data.to(self.device)
                        continue
                    host = tensor.detach()
                    host = host.to("cpu", copy=True) if host.device.type != "cpu" or not pin else host
                    slot = _Slot(module, name, is_param, tensor.device, host.pin_memory() if pin else host)
                    slot.point_to(slot.host)
                    block.slots.append(slot)
        return block

    def _start_load(self, block: _Block) -> None:
        if block.copies is not None:
            return
        self.loads += 1
        if self._stream is None:  # CPU (tests): a plain copy, same bookkeeping
            block.copies = [s.host.to(self.device, copy=True) for s in block.slots]
            return
        with torch.cuda.stream(self._stream):
            block.copies = [s.host.to(self.device, non_blocking=True) for s in block.slots]
            block.ready = torch.cuda.Event()
            block.ready.record(self._stream)

    def _use(self, block: _Block) -> None:
        self._start_load(block)
        assert block.copies is not None
        if block.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(block.ready)
            for tensor in block.copies:  # made on the side stream, used on this one: keep the allocator honest
                tensor.record_stream(current)
            block.ready = None
        for slot, tensor in zip(block.slots, block.copies, strict=True):
            slot.point_to(tensor)

    def _evict(self, block: _Block) -> None:
        if block.copies is None:
            return
        for slot in block.slots:
            slot.point_to(slot.host)
        block.copies = block.ready = None  # autograd may still hold them until this block's backward ran

    # -- the hook ----------------------------------------------------------------------------------------------------
    def _hook(self, index: int):  # noqa: ANN202 - a forward pre-hook
        def enter(_module: nn.Module, _args: object) -> None:
            if index != self._current:
                self._enter(index)

        return enter

    def _enter(self, index: int) -> None:
        if self._current is not None:
            self._direction = 1 if index > self._current else -1
        self._current = index
        ahead = index + self._direction
        for other, block in self.swapped.items():
            if other not in (index, ahead):
                self._evict(block)
        if index in self.swapped:
            self._use(self.swapped[index])
        if ahead in self.swapped:
            self._start_load(self.swapped[ahead])
        self.max_resident = max(self.max_resident, sum(b.copies is not None for b in self.swapped.values()))


def _owns_tensors(module: nn.Module) -> bool:
    return any(t is not None for t in (*module._parameters.values(), *module._buffers.values()))
