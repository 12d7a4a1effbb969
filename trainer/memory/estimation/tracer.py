"""Run one training step on the meta device and record what the allocator would see: live bytes, their peak, FLOPs.

Meta tensors carry shape and dtype but no data, so a full-size SDXL step costs seconds of CPU and no memory. Every
storage created under `LiveBytes` is counted until the storage object dies (autograd's saved tensors keep it alive
exactly as on a real device), which gives the peak of live tensor bytes the caching allocator would report as
`max_memory_allocated` (minus kernel workspaces, which `estimate.py` adds).

Two things a meta run does not do by itself are emulated, because they change activation memory a lot:
* CUDA autocast (meta tensors have no autocast key): `AutocastEmulation` casts the inputs of the ops CUDA autocast runs
  in half (linear, conv, matmul, attention) and in float32 (norms, softmax, losses), above autograd, as autocast does.
* The attention kernel: meta falls back to the math kernel; `AutocastEmulation` routes `scaled_dot_product_attention` to
  the kernel the target device would pick (flash/mem-efficient on CUDA, flash on CPU), or to the math kernel on request.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ATTENTION_KERNELS = ("flash", "math")


def _free_ops() -> frozenset:
    """Ops that launch no kernel: views, reshapes, detaches, metadata."""
    aten = torch.ops.aten
    names = ("view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze",
             "slice", "select", "split", "split_with_sizes", "chunk", "unbind", "detach", "alias", "as_strided",
             "_reshape_alias", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty")
    found = []
    for name in names:
        packet = getattr(aten, name, None)
        if packet is not None:
            found.extend(getattr(packet, o) for o in packet.overloads())
    return frozenset(found)


_FREE_OPS = _free_ops()


def _flop_formulas() -> dict[Any, Callable[..., int]]:
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    formulas = dict(flop_registry)
    # The CPU flash kernel has the same shapes as the CUDA one but is missing from torch's table.
    formulas[aten._scaled_dot_product_flash_attention_for_cpu] = flop_registry[aten._scaled_dot_product_flash_attention]
    formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = \
        flop_registry[aten._scaled_dot_product_flash_attention_backward]
    return formulas


@dataclass
class PhaseMark:
    """Live and peak bytes when a phase of the step ended (`forward`, `backward`, `optimizer`)."""

    name: str
    live: int
    peak: int


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created while active and still alive, their running peak, and matmul/conv FLOPs.

    Storages that already existed (weights, inputs made outside) are never counted, also when an op writes into them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.flops = 0
        self.ops = 0  # kernels launched (one per aten op, roughly)
        self.traffic = 0  # bytes read + written by ops that are not matmul/conv/attention (memory-bound ops)
        self.marks: list[PhaseMark] = []
        self._sizes: dict[int, int] = {}
        self._external: set[int] = set()
        self._formulas = _flop_formulas()

    def mark(self, name: str) -> None:
        self.marks.append(PhaseMark(name, self.live, self.peak))

    def reset_peak(self) -> None:
        self.peak = self.live

    def _release(self, key: int) -> None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch protocol
        kwargs = kwargs or {}
        for arg in tree_flatten((args, kwargs))[0]:
            if isinstance(arg, torch.Tensor):
                key = arg.untyped_storage()._cdata
                if key not in self._sizes:
                    self._external.add(key)
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if packet in self._formulas:
            self.flops += int(self._formulas[packet](*args, **kwargs, out_val=out))
        elif func not in _FREE_OPS:
            # A memory-bound kernel reads about as much as it writes; views and metadata ops move nothing.
            self.traffic += 2 * sum(t.numel() * t.element_size() for t in outputs)
        if func not in _FREE_OPS:
            self.ops += 1
        for tensor in outputs:
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self._sizes or key in self._external:
                continue
            self._sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            # The storage's Python object lives exactly as long as its C++ StorageImpl (PyObject preservation).
            weakref.finalize(storage, self._release, key)
        self.peak = max(self.peak, self.live)
        return out


# CUDA autocast's op lists (aten/src/ATen/autocast_mode.cpp), reduced to the ops SD UNets and CLIP call.
_HALF_OPS = (F.linear, F.conv1d, F.conv2d, F.conv_transpose2d, torch.conv2d, torch.matmul, torch.Tensor.matmul,
             torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm, torch.baddbmm, torch.Tensor.baddbmm, torch.mm,
             torch.addmm, torch.einsum, F.scaled_dot_product_attention)
_FLOAT_OPS = (F.group_norm, torch.group_norm, F.layer_norm, torch.layer_norm, F.softmax, torch.softmax,
              torch.Tensor.softmax, F.log_softmax, F.mse_loss, torch.exp, torch.Tensor.exp, torch.pow, torch.Tensor.pow,
              torch.rsqrt, torch.Tensor.rsqrt, torch.cumsum, torch.logsumexp)


class AutocastEmulation(TorchFunctionMode):
    """Autocast for devices that have none (meta): cast floating inputs of autocast's half ops to `dtype` and of its
    float32 ops to float32. Casts of leaf tensors that need grad are cached for the region, as autocast does."""

    def __init__(self, dtype: torch.dtype | None, attention: str = "flash", device_type: str = "cuda") -> None:
        super().__init__()
        if attention not in ATTENTION_KERNELS:
            msg = f"attention kernel must be one of {ATTENTION_KERNELS} (got {attention!r})"
            raise ValueError(msg)
        self.dtype = dtype
        self.attention = attention
        self.device_type = device_type
        self._cache: dict[int, torch.Tensor] = {}
        self._depth = 0

    def __enter__(self) -> AutocastEmulation:
        self._depth += 1
        return super().__enter__()  # type: ignore[return-value]

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._depth -= 1
        if self._depth == 0:  # autocast drops its weight-cast cache when the outermost region ends
            self._cache.clear()

    def _cast(self, value: Any, dtype: torch.dtype) -> Any:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dtype == dtype:
            return value
        if value.is_leaf and value.requires_grad:
            cached = self._cache.get(id(value))
            if cached is None:
                cached = self._cache[id(value)] = value.to(dtype)
            return cached
        return value.to(dtype)

    def _cast_all(self, args: tuple, kwargs: dict, dtype: torch.dtype) -> tuple[tuple, dict]:
        args = tuple(type(a)(self._cast(x, dtype) for x in a) if isinstance(a, (list, tuple)) else self._cast(a, dtype)
                     for a in args)
        return args, {k: self._cast(v, dtype) for k, v in kwargs.items()}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch protocol
        kwargs = kwargs or {}
        if self.dtype is not None:
            if func in _HALF_OPS:
                args, kwargs = self._cast_all(args, kwargs, self.dtype)
            elif func in _FLOAT_OPS:
                args, kwargs = self._cast_all(args, kwargs, torch.float32)
        if func is F.scaled_dot_product_attention:
            return self._attention(*args, **kwargs)
        return func(*args, **kwargs)

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                   **_: Any) -> torch.Tensor:
        aten = torch.ops.aten
        if self.attention == "math" or attn_mask is not None:
            weights = (q @ k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
            if attn_mask is not None:
                weights = weights + attn_mask
            return weights.softmax(-1) @ v
        if self.device_type == "cpu":
            return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, scale=scale)[0]
        if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
            return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)[0]
        return aten._scaled_dot_product_efficient_attention(q, k, v, None, True, dropout_p, is_causal, scale=scale)[0]


@dataclass
class StepTrace:
    """What one traced training step allocated, in bytes, above the weights and adapter parameters.

    Attributes:
        peak: peak of live bytes over forward + backward (+ optimizer step when traced).
        after_forward: live bytes when the forward (and loss) ended: what autograd saved.
        optimizer_state: bytes the optimizer keeps between steps (created by its first step).
        optimizer_peak: peak during the optimizer step itself (grads + state + temporaries).
        flops: FLOPs of forward + backward (including gradient-checkpointing recompute).
        adapter_params: trainable parameters.
        traffic: bytes moved by memory-bound ops in forward + backward.
        ops: kernels launched in forward + backward.
    """

    peak: int
    after_forward: int
    optimizer_state: int
    optimizer_peak: int
    flops: int
    adapter_params: int
    traffic: int = 0
    ops: int = 0
    marks: list[PhaseMark] = field(default_factory=list)
