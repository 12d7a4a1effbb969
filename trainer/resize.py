"""Resizing a LoRA file: a new rank for every module from the SVD of its update ΔW, and a report of what each keeps.

The maths (docs/lora-format.md §1.4): a module's update is ΔW = c·U·D with U the up weight flattened to (out, r), D the
down weight flattened to (r, in·kh·kw) (LoCon convs are flattened, a Tucker `lora_mid` is folded into D) and c its
scale (alpha/r). QR factors of U and Dᵀ reduce the SVD of ΔW to that of an r×r matrix, so no out×in matrix is ever
formed. Keeping the k largest singular values is the best rank-k update in the Frobenius norm; a module keeps the
energy Σᵢ<ₖ σᵢ² / Σ σᵢ², and the report gives ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F measured on the tensors as written (after
rounding to the file's dtype), so it is what a loader will really see.

Targets: kept energy per module, a fixed rank (never raised), or a file size: every module starts at rank 1 and the
next singular direction with the most relative energy per byte is added while the file fits (greedy by marginal
energy per byte; each module's gains fall, so this is the knapsack's greedy order).

Alpha: every written module gets the same alpha A, the input's most common alpha (the most common rank when the
file has none), and its tensors carry the rest of its scale: up·down = (k/A)·c·U_k·Σ_k·V_k, split evenly (√ on each
side), so every loader's ΔW = up·down·A/k is the kept part of the old ΔW. One value for all modules, because
diffusers (0.42.1) turns per-module alphas that differ into alpha_pattern keys that match no attention or
text-encoder module, and silently applies the common alpha there (tests/test_resize.py loads every module's ΔW back
from diffusers); A1111, ComfyUI and Forge read any alpha. A is written as the file stores it
(its dtype's value), so no rounding of alpha enters ΔW. diffusers/peft files without alpha tensors keep having none
(scale 1 per module, as diffusers then assumes). Names stay as they came: kohya (`lora_down/lora_up/alpha`,
`lora_unet_*`, `lora_te*`), or diffusers/peft (`lora_A/lora_B`).

Refused, with a message that says why: LoHa/LoKr (their ΔW is a Hadamard/Kronecker product, not up·down) and DoRA
(a learned magnitude rescales W+ΔW, so cutting ΔW changes more than ΔW). Tensors that belong to no LoRA module
(e.g. embeddings bundled in the file) are copied unchanged.
"""

from __future__ import annotations

import heapq
import json
import math
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import ConfigError, LoraFileError
from .lorafile import load_lora, save_lora

TARGET_MODES = ("energy", "rank", "max_mb")
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MB = 1_000_000  # --max-mb counts decimal megabytes, so a file that fits N MB also fits N MiB
RESIZE_KEY = "loraloop_resize"  # metadata: the list of resizes this file went through
# Metadata that describes the old tensors and would be wrong afterwards (kohya/ModelSpec hashes of the weights).
STALE_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")
PEFT_CONFIG_KEY = "lora_adapter_metadata"  # diffusers' per-component LoraConfig (r, lora_alpha, patterns)
_ENERGY_SLACK = 1e-12  # float64 rounding of the cumulative energy: 1.0 must select the full numerical rank
_HEADER_SLACK = 512  # bytes reserved for metadata that changes with the chosen ranks (ss_network_dim, the record)

# The parts of one module's keys, per naming convention: (down, up, alpha, Tucker mid).
_KOHYA = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "lora_mid.weight": "mid"}
_PEFT = {"lora_A.weight": "down", "lora_B.weight": "up", "alpha": "alpha"}
_DORA = ("dora_scale", "lora_magnitude_vector")
_LYCORIS = {"hada_": "LoHa", "lokr_": "LoKr"}


@dataclass(frozen=True)
class Target:
    """What to resize to: `energy` (share of singular-value energy kept per module, 0-1], `rank` (a rank per module,
    never raised) or `max_mb` (file size in MB; ranks chosen per module so the file fits)."""

    mode: str
    value: float

    def __post_init__(self) -> None:
        if self.mode not in TARGET_MODES:
            msg = f"resize target must be one of {', '.join(TARGET_MODES)} (got {self.mode!r})"
            raise ConfigError(msg, key="mode", value=self.mode, allowed=TARGET_MODES)
        value = self.value
        bad = (not math.isfinite(value) or (self.mode == "energy" and not 0 < value <= 1)
               or (self.mode == "rank" and (value < 1 or value != int(value)))
               or (self.mode == "max_mb" and not value > 0))
        if bad:
            want = {"energy": "a share of energy above 0 and at most 1 (e.g. 0.95)",
                    "rank": "a whole number of 1 or more (e.g. 8)", "max_mb": "a file size in MB above 0 (e.g. 20)"}
            msg = f"resize {self.mode} must be {want[self.mode]} (got {value:g})"
            raise ConfigError(msg, key=self.mode, value=value)

    def describe(self) -> str:
        return {"energy": f"energy {self.value:g}", "rank": f"rank {int(self.value)}",
                "max_mb": f"at most {self.value:g} MB"}[self.mode]


@dataclass(frozen=True)
class ModuleReport:
    """One module: ranks, kept energy (of ΔW's singular values) and ‖ΔW−ΔW_r‖_F/‖ΔW‖_F as written."""

    name: str
    kind: str  # linear, conv (flattened kernel) or tucker (lora_mid folded in)
    rank_before: int
    rank_after: int
    kept_energy: float
    relative_error: float
    energy: float  # ‖ΔW‖_F², for the overall numbers
    error: float  # ‖ΔW−ΔW_r‖_F


@dataclass
class ResizeReport:
    """Per module and overall: what the resize kept, and the sizes before and after (bytes, headers included)."""

    target: Target
    modules: list[ModuleReport]
    size_before: int
    size_after: int
    source: str = "LoRA"
    output: str | None = None
    copied: list[str] = field(default_factory=list)  # tensors that belong to no LoRA module, copied unchanged
    notes: list[str] = field(default_factory=list)

    @property
    def kept_energy(self) -> float:
        """The share of the whole LoRA's energy Σ‖ΔW‖² that the resized modules keep."""
        total = sum(m.energy for m in self.modules)
        return 1.0 if total == 0 else sum(m.kept_energy * m.energy for m in self.modules) / total

    @property
    def relative_error(self) -> float:
        """√(Σ‖ΔW−ΔW_r‖²) / √(Σ‖ΔW‖²) over every module."""
        total = sum(m.energy for m in self.modules)
        return 0.0 if total == 0 else math.sqrt(sum(m.error**2 for m in self.modules) / total)

    @property
    def ranks(self) -> dict[str, int]:
        return {m.name: m.rank_after for m in self.modules}

    def summary(self) -> str:
        """The overall lines."""
        ranks = [m.rank_after for m in self.modules]
        common = Counter(ranks).most_common(1)[0][0] if ranks else 0
        before = [m.rank_before for m in self.modules]
        lines = [f"resized {self.source}" + (f" -> {self.output}" if self.output else "")
                 + f" (target: {self.target.describe()})",
                 f"modules: {len(ranks)}, ranks {_span(before)} -> {_span(ranks)} (most often {common})",
                 f"kept energy {self.kept_energy:.4f}, relative error of dW {self.relative_error:.4f}",
                 f"size: {self.size_before / MB:.2f} MB -> {self.size_after / MB:.2f} MB "
                 "(one alpha for every module, the rest of each scale in its tensors: same strength)"]
        if self.copied:
            lines.append(f"{len(self.copied)} tensors that belong to no LoRA module copied unchanged "
                         f"(e.g. {self.copied[0]})")
        return "\n".join(lines + self.notes)

    def text(self) -> str:
        """A table of every module, then the overall lines."""
        width = max([len(m.name) for m in self.modules] + [6])
        rows = [f"{'module':<{width}}  rank      kept energy  rel. error"]
        rows += [f"{m.name:<{width}}  {m.rank_before:>4} -> {m.rank_after:<4}  {m.kept_energy:>10.4f}  "
                 f"{m.relative_error:>10.4f}" for m in self.modules]
        return "\n".join([*rows, "", self.summary()])

    def to_dict(self) -> dict:
        return {"source": self.source, "output": self.output, "target": asdict(self.target),
                "kept_energy": self.kept_energy, "relative_error": self.relative_error,
                "size_before": self.size_before, "size_after": self.size_after, "copied": self.copied,
                "notes": self.notes, "modules": [asdict(m) for m in self.modules]}


def _span(values: list[int]) -> str:
    if not values:
        return "-"
    return str(min(values)) if min(values) == max(values) else f"{min(values)}-{max(values)}"


@dataclass
class Resized:
    """A resized LoRA: tensors and metadata ready for `save_lora`, and the report."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    report: ResizeReport


# -- reading modules ---------------------------------------------------------------------------------------------------
@dataclass
class _Module:
    """One LoRA module as ΔW = scale · up @ down (float64, flattened), and where its tensors came from."""

    name: str
    parts: dict[str, str]  # role (down, up, alpha) → the key suffix this file uses
    keys: list[str]  # every key of the module in the input (Tucker's mid included)
    scale: float
    up: torch.Tensor  # (out, r)
    down: torch.Tensor  # (r, in·kh·kw)
    down_tail: tuple[int, ...]  # down's shape after the rank: (in,) or (in, kh, kw)
    up_tail: tuple[int, ...]  # up's shape after the rank: () or (1, 1)
    dtype: torch.dtype
    alpha: float | None  # the file's alpha for it (None: none written; kohya then means alpha = rank)
    alpha_dtype: torch.dtype | None
    kind: str
    left: torch.Tensor | None = None  # SVD of ΔW/scale: left (out, p) · diag(sigma) · right (p, in·kh·kw)
    sigma: torch.Tensor | None = None
    right: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    @property
    def energy(self) -> float:
        return float((self.scale**2) * (self.sigma**2).sum())


def _split(key: str) -> tuple[str, str] | None:
    """(module name, part) for a key ending in a known LoRA part, else None."""
    for part in (*_KOHYA, *_PEFT):
        if key.endswith("." + part):
            return key[: -len(part) - 1], part
    return None


def _refuse_lycoris_and_dora(tensors: dict[str, torch.Tensor], source: str) -> None:
    for key in tensors:
        last = key.rsplit(".", 2)
        for prefix, kind in _LYCORIS.items():
            if any(p.startswith(prefix) for p in last[1:]):
                msg = (f"{source} is a LyCORIS {kind} file (key {key!r}): its update is a "
                       f"{'Hadamard' if kind == 'LoHa' else 'Kronecker'} product, not up·down, so it has no rank to "
                       "cut per module. resize works on LoRA/LoCon files; retrain it with network_type lora or locon")
                raise LoraFileError(msg, path=source)
        if any(p.startswith(_DORA) for p in last[1:]):
            msg = (f"{source} is a DoRA LoRA (key {key!r}): a learned magnitude rescales W+ΔW, so cutting ΔW's rank "
                   "changes more than ΔW and the file would load differently. resize refuses DoRA; use a plain LoRA")
            raise LoraFileError(msg, path=source)


def _peft_config(metadata: dict[str, str], source: str) -> dict:
    text = metadata.get(PEFT_CONFIG_KEY)
    if not text:
        return {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        msg = f"{source}: metadata {PEFT_CONFIG_KEY} is not valid JSON ({err}); remove it or fix the file"
        raise LoraFileError(msg, path=source) from err
    return config if isinstance(config, dict) else {}


def _peft_scale(name: str, rank: int, config: dict) -> float:
    """alpha/r of a peft module without an alpha tensor, from diffusers' saved LoraConfig (keys `<prefix>.lora_alpha`,
    `<prefix>.alpha_pattern`, …); without one diffusers and peft use alpha = r, i.e. scale 1."""
    prefix, _, path = name.partition(".")

    def get(key: str) -> object:
        return config.get(f"{prefix}.{key}", config.get(key))

    alpha = get("lora_alpha")
    for pattern, value in (get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", path) or re.fullmatch(rf"(.*\.)?{pattern}", name):
            alpha = value
    if alpha is None:
        return 1.0
    return float(alpha) / (math.sqrt(rank) if get("use_rslora") else rank)


def _read_module(name: str, found: dict[str, str], tensors: dict[str, torch.Tensor], config: dict,
                 source: str) -> _Module:
    """One module from its keys (`found`: suffix → key); checks the shapes fit together."""
    parts = _KOHYA if "lora_down.weight" in found or "lora_up.weight" in found else _PEFT
    roles = {role: suffix for suffix, role in parts.items()}
    missing = [roles[r] for r in ("down", "up") if roles[r] not in found]
    if missing:
        msg = f"{source}: module {name} has no {missing[0]} tensor; the file is incomplete (re-export it)"
        raise LoraFileError(msg, path=source)
    extra = [s for s in found if s not in parts]
    if extra:
        msg = (f"{source}: module {name} holds {name}.{extra[0]}, which resize does not understand (it handles "
               f"{', '.join(parts)}); refusing rather than dropping it")
        raise LoraFileError(msg, path=source)
    down = tensors[found[roles["down"]]].to("cpu", torch.float64)  # a host may hand over GPU tensors
    up = tensors[found[roles["up"]]].to("cpu", torch.float64)
    rank = down.shape[0]
    kind = "linear" if down.dim() == 2 else "conv"
    up2 = up.flatten(1)
    down2 = down.flatten(1)
    down_tail = tuple(down.shape[1:])
    if "mid" in roles and roles["mid"] in found:  # LyCORIS Tucker: ΔW[o,i,h,w] = Σ up[o,a] mid[a,b,h,w] down[b,i]
        mid = tensors[found[roles["mid"]]].to("cpu", torch.float64)
        if mid.dim() != 4 or mid.shape[:2] != (rank, rank) or down.dim() != 4 or down.shape[2:] != (1, 1):
            msg = (f"{source}: module {name} has a lora_mid of shape {tuple(mid.shape)} that does not fit its "
                   f"lora_down {tuple(down.shape)}")
            raise LoraFileError(msg, path=source)
        down2 = torch.einsum("abhw,bi->aihw", mid, down.flatten(1)).reshape(rank, -1)
        down_tail = (down.shape[1], *mid.shape[2:])
        kind = "tucker"
    if up2.shape[1] != rank or (up.dim() == 4 and up.shape[2:] != (1, 1)):
        msg = (f"{source}: module {name} has up {tuple(up.shape)} and down {tuple(down.shape)}, which do not make "
               "a LoRA (up must be (out, rank) or (out, rank, 1, 1))")
        raise LoraFileError(msg, path=source)
    alpha_key = found.get(roles["alpha"])
    if alpha_key is not None:
        scale = float(tensors[alpha_key].float().item()) / rank
    elif parts is _PEFT:
        scale = _peft_scale(name, rank, config)
    else:
        scale = 1.0  # kohya: no alpha means alpha = rank
    return _Module(name=name, parts=roles, keys=list(found.values()), scale=scale, up=up2, down=down2,
                   down_tail=down_tail, up_tail=tuple(up.shape[2:]), dtype=tensors[found[roles["up"]]].dtype,
                   alpha=float(tensors[alpha_key].float().item()) if alpha_key else None,
                   alpha_dtype=tensors[alpha_key].dtype if alpha_key else None, kind=kind)


def read_modules(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                 source: str = "LoRA") -> tuple[list[_Module], list[str]]:
    """The LoRA modules of a state dict (kohya or diffusers/peft names), and the keys that belong to none.

    Raises LoraFileError naming `source` for LoHa/LoKr/DoRA files, incomplete modules and files without modules.
    """
    _refuse_lycoris_and_dora(tensors, source)
    grouped: dict[str, dict[str, str]] = {}
    for key in tensors:
        split = _split(key)
        if split is not None:
            grouped.setdefault(split[0], {})[split[1]] = key
    # A module is a name with a down or up weight; an `alpha` (or other part) alone belongs to no module.
    names = [n for n, found in grouped.items() if {"lora_down.weight", "lora_up.weight", "lora_A.weight",
                                                   "lora_B.weight"} & set(found)]
    if not names:
        msg = (f"{source} holds no LoRA modules (expected keys ending in .lora_down.weight/.lora_up.weight or "
               ".lora_A.weight/.lora_B.weight); is it a LoRA file?")
        raise LoraFileError(msg, path=source)
    config = _peft_config(metadata or {}, source)
    modules = [_read_module(n, grouped[n], tensors, config, source) for n in sorted(names)]
    used = {k for m in modules for k in m.keys}
    rest = [k for k in tensors if k not in used]
    stray = next((k for k in rest for n in names if k.startswith(n + ".")), None)
    if stray is not None:  # e.g. peft's lora_B.bias: its scale would change with the alpha convention
        msg = (f"{source}: {stray} belongs to a LoRA module but is no part resize understands (it handles lora_down/"
               "lora_up/lora_mid/alpha and lora_A/lora_B); refusing rather than dropping or mis-scaling it")
        raise LoraFileError(msg, path=source)
    return modules, rest


def decompose(module: _Module) -> _Module:
    """Fill in the SVD of up @ down (float64) through QR factors: O((out + in)·r²), exact up to rounding."""
    q_up, r_up = torch.linalg.qr(module.up)  # (out, p) (p, r)
    q_down, r_down = torch.linalg.qr(module.down.T)  # (n, q) (q, r)
    u, sigma, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    module.left, module.sigma, module.right = q_up @ u, sigma, vh @ q_down.T
    return module


# -- choosing ranks ---------------------------------------------------------------------------------------------------
def _useful(module: _Module) -> int:
    """How many singular directions carry any energy (at least 1: every module keeps a tensor)."""
    return max(1, int((module.sigma > module.sigma.max() * 1e-12).sum())) if module.sigma.numel() else 1


def rank_for_energy(module: _Module, energy: float) -> int:
    """The smallest rank whose singular values hold `energy` of the module's total (1.0: the full numerical rank)."""
    squares = module.sigma**2
    total = float(squares.sum())
    if total == 0:
        return 1
    cumulative = torch.cumsum(squares, 0) / total
    k = int((cumulative < energy - _ENERGY_SLACK).sum()) + 1
    return min(k, _useful(module))


def _unit_bytes(module: _Module, dtype: torch.dtype) -> int:
    """Bytes one more rank costs: a row of down and a column of up."""
    return (module.up.shape[0] + module.down.shape[1]) * _itemsize(dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def ranks_for_size(modules: list[_Module], dtypes: dict[str, torch.dtype], budget: int,
                   fixed: int) -> dict[str, int]:
    """Per-module ranks whose tensors fit `budget - fixed` bytes: rank 1 each, then greedily the direction with the
    most relative energy (σ²/‖ΔW‖² of its module) per byte, while it fits.

    Raises ConfigError when even rank 1 everywhere does not fit.
    """
    ranks = {m.name: 1 for m in modules}
    cost = {m.name: _unit_bytes(m, dtypes[m.name]) for m in modules}
    used = fixed + sum(cost.values())
    if used > budget:
        msg = (f"max_mb {budget / MB:g} is below the smallest file these {len(modules)} modules make "
               f"({math.ceil(used / MB * 100) / 100:g} MB at rank 1 each); raise max_mb")
        raise ConfigError(msg, key="max_mb", value=budget / MB)
    totals = {m.name: float((m.sigma**2).sum()) for m in modules}
    by_name = {m.name: m for m in modules}
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        m, k = by_name[name], ranks[name]
        if k < _useful(m) and totals[name] > 0:
            gain = float(m.sigma[k] ** 2) / totals[name]
            heapq.heappush(heap, (-gain / cost[name], name))

    for name in ranks:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        if used + cost[name] > budget:
            continue  # this module cannot grow any more; cheaper ones still may
        ranks[name] += 1
        used += cost[name]
        push(name)
    return ranks


def choose_ranks(modules: list[_Module], target: Target, dtypes: dict[str, torch.dtype],
                 fixed: int = 0) -> dict[str, int]:
    """The new rank of every module for `target` (never above its current numerical rank)."""
    if target.mode == "energy":
        return {m.name: rank_for_energy(m, target.value) for m in modules}
    if target.mode == "rank":
        return {m.name: min(int(target.value), _useful(m)) for m in modules}
    return ranks_for_size(modules, dtypes, int(target.value * MB), fixed)


# -- writing -----------------------------------------------------------------------------------------------------------
def common_alpha(modules: list[_Module]) -> float:
    """The one alpha every written module gets: the input's most common alpha (a usable one), else its most common
    rank (a kohya file without alpha tensors means alpha = rank)."""
    alphas = [m.alpha for m in modules if m.alpha is not None and math.isfinite(m.alpha) and m.alpha > 0]
    if alphas:
        return Counter(alphas).most_common(1)[0][0]
    return float(Counter(m.rank for m in modules).most_common(1)[0][0])


def _alpha_tensor(alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """alpha in the tensors' dtype when that holds it exactly, else in float32 (loaders read any dtype)."""
    value = torch.tensor(alpha, dtype=dtype)
    return value if float(value) == alpha else torch.tensor(alpha)


def _writes_alpha(module: _Module) -> bool:
    """kohya files always carry alpha; diffusers/peft files only when they came with one."""
    return module.alpha is not None or "lora_down.weight" in module.parts.values()


def rebuild(module: _Module, rank: int, dtype: torch.dtype, alpha: float) -> tuple[dict[str, torch.Tensor], float,
                                                                                    torch.Tensor, torch.Tensor]:
    """The module's tensors at `rank` with `alpha` (the rest of the old scale split evenly into up and down), the scale
    loaders will apply, and the written up/down back in float64 (flattened) to measure the error."""
    written: dict[str, torch.Tensor] = {}
    applied = 1.0
    if _writes_alpha(module):
        written[module.parts["alpha"]] = _alpha_tensor(alpha, dtype)
        applied = float(written[module.parts["alpha"]]) / rank
    ratio = module.scale / applied
    root = torch.sqrt(abs(ratio) * module.sigma[:rank])
    up = (module.left[:, :rank] * root * (1.0 if ratio >= 0 else -1.0)).to(dtype)
    down = (root[:, None] * module.right[:rank]).to(dtype)
    written[module.parts["up"]] = up.reshape(up.shape[0], rank, *module.up_tail).contiguous()
    written[module.parts["down"]] = down.reshape(rank, *module.down_tail).contiguous()
    return written, applied, up.to(torch.float64), down.to(torch.float64)


def _inner(u1: torch.Tensor, v1: torch.Tensor, u2: torch.Tensor, v2: torch.Tensor) -> float:
    """⟨u1@v1, u2@v2⟩_F through r×r Gram matrices (float64)."""
    return float(((u1.T @ u2) * (v1 @ v2.T)).sum())


def module_error(module: _Module, up: torch.Tensor, down: torch.Tensor, scale: float) -> float:
    """‖c·U·D − scale·up·down‖_F: the written update against the original."""
    c = module.scale
    a = c * c * _inner(module.up, module.down, module.up, module.down)
    b = scale * scale * _inner(up, down, up, down)
    ab = c * scale * _inner(module.up, module.down, up, down)
    return math.sqrt(max(0.0, a + b - 2 * ab))


_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}


def serialized_size(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """The size of the .safetensors file these make: 8 bytes, the JSON header padded to 8, the data; exact but for
    a few bytes of offset digits (safetensors orders the data by dtype). Meta tensors work too (only shapes and dtypes
    are read)."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, value in tensors.items():
        size = value.numel() * value.element_size()
        name = _DTYPE_NAMES.get(value.dtype, "F8_E4M3")  # the float8 names are the longest safetensors has
        header[key] = {"dtype": name, "shape": list(value.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return 8 + -(-len(text) // 8) * 8 + offset


def _fixed_bytes(modules: list[_Module], copied: dict[str, torch.Tensor], metadata: dict[str, str],
                 dtypes: dict[str, torch.dtype], source: str) -> int:
    """Everything of the output file except the rank-sized tensor data, as an upper bound: the header as it would be
    at today's ranks (longer shapes and offsets than any smaller rank gives), alphas, copied tensors, and room for the
    metadata this resize adds."""
    shapes: dict[str, torch.Tensor] = dict(copied)
    data = 0
    for m in modules:
        dtype = dtypes[m.name]
        up = torch.empty(m.up.shape[0], m.rank, *m.up_tail, dtype=dtype, device="meta")
        down = torch.empty(m.rank, *m.down_tail, dtype=dtype, device="meta")
        shapes.update({f"{m.name}.{m.parts['up']}": up, f"{m.name}.{m.parts['down']}": down,
                       f"{m.name}.{m.parts['alpha']}": torch.empty((), dtype=torch.float32, device="meta")})
        data += (up.numel() + down.numel()) * up.element_size()
    return serialized_size(shapes, metadata) - data + _HEADER_SLACK + len(source.encode("utf-8"))


def resized_metadata(metadata: dict[str, str], report: ResizeReport, modules: list[_Module],
                     alpha: float) -> dict[str, str]:
    """The input's metadata with the network's dim/alpha as they are now and a record of this resize."""
    out = {k: v for k, v in metadata.items() if k not in STALE_KEYS}
    ranks = report.ranks
    common = Counter(ranks.values()).most_common(1)[0][0]
    if "ss_network_dim" in out or any("lora_down.weight" in m.parts.values() for m in modules):
        out["ss_network_dim"] = str(common)
        out["ss_network_alpha"] = str(alpha)
    convs = [ranks[m.name] for m in modules if m.kind != "linear" and math.prod(m.down_tail[1:]) > 1]
    if convs and "ss_network_args" in out:
        try:
            args = json.loads(out["ss_network_args"])
        except json.JSONDecodeError:
            args = None
        if isinstance(args, dict):
            conv = Counter(convs).most_common(1)[0][0]
            args.update({"conv_dim": str(conv), "conv_alpha": str(alpha)})
            out["ss_network_args"] = json.dumps(args)
    if out.pop(PEFT_CONFIG_KEY, None) is not None:
        report.notes.append(f"metadata {PEFT_CONFIG_KEY} removed: diffusers then reads each module's rank from its "
                            "tensors with scale 1, which is how they are written")
    try:
        history = json.loads(out.get(RESIZE_KEY, "[]"))
    except json.JSONDecodeError:
        history = []
    record = {"target": report.target.mode, "value": report.target.value, "source": report.source,
              "ranks": {"min": min(ranks.values()), "max": max(ranks.values()), "most_common": common},
              "kept_energy": round(report.kept_energy, 6), "relative_error": round(report.relative_error, 6),
              "alpha": alpha, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out[RESIZE_KEY] = json.dumps([*history, record] if isinstance(history, list) else [record])
    return out


def resize_state_dict(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, target: Target, *,
                      precision: str | None = None, source: str = "LoRA") -> Resized:
    """Resize every LoRA module of `tensors` to `target`; `precision` (fp16/bf16/fp32) or the file's own dtypes.

    Raises LoraFileError (naming `source`) for files resize cannot handle, ConfigError for a bad target or a size
    that cannot be reached.
    """
    metadata = dict(metadata or {})
    if precision is not None and precision not in PRECISIONS:
        msg = f"precision must be one of {', '.join(PRECISIONS)} or unset to keep the file's (got {precision!r})"
        raise ConfigError(msg, key="precision", value=precision, allowed=tuple(PRECISIONS))
    modules, copied = read_modules(tensors, metadata, source)
    for module in modules:
        decompose(module)
    dtypes = {m.name: PRECISIONS[precision] if precision else m.dtype for m in modules}
    size_before = serialized_size(tensors, metadata)
    ranks = choose_ranks(modules, target, dtypes,
                         _fixed_bytes(modules, {k: tensors[k] for k in copied}, metadata, dtypes, source))
    alpha = common_alpha(modules)
    while True:
        out: dict[str, torch.Tensor] = {k: tensors[k] for k in copied}
        reports = []
        for m in modules:
            written, scale, up, down = rebuild(m, ranks[m.name], dtypes[m.name], alpha)
            out.update({f"{m.name}.{suffix}": value for suffix, value in written.items()})
            energy = m.energy
            kept = 1.0 if energy == 0 else float((m.sigma[: ranks[m.name]] ** 2).sum() / (m.sigma**2).sum())
            error = module_error(m, up, down, scale)
            reports.append(ModuleReport(m.name, m.kind, m.rank, ranks[m.name], kept,
                                        0.0 if energy == 0 else error / math.sqrt(energy), energy, error))
        report = ResizeReport(target, reports, size_before, 0, source=source, copied=copied)
        new_metadata = resized_metadata(metadata, report, modules, alpha)
        report.size_after = serialized_size(out, new_metadata)
        if target.mode != "max_mb":
            return Resized(out, new_metadata, report)
        # safetensors orders the data by dtype, which moves offsets (and their digits) a little: measure for real
        from safetensors.torch import save

        report.size_after = len(save(out, metadata=new_metadata))
        if report.size_after <= target.value * MB:
            return Resized(out, new_metadata, report)
        _drop_weakest(modules, ranks)  # the header slack was not enough: give back the least useful direction


def _drop_weakest(modules: list[_Module], ranks: dict[str, int]) -> None:
    candidates = [(float(m.sigma[ranks[m.name] - 1] ** 2) / max(float((m.sigma**2).sum()), 1e-300), m.name)
                  for m in modules if ranks[m.name] > 1]
    if not candidates:
        msg = "max_mb is below the smallest file these modules make at rank 1 each; raise max_mb"
        raise ConfigError(msg, key="max_mb")
    ranks[min(candidates)[1]] -= 1


def resize_file(source: Path, output: Path, target: Target, *, precision: str | None = None,
                overwrite: bool = False) -> ResizeReport:
    """Read `source`, resize it, write `output` atomically (never over an existing file unless `overwrite`)."""
    source, output = Path(source), Path(output)
    if output.exists() and not overwrite:
        msg = f"{output} already exists; choose another output name or pass --overwrite"
        raise LoraFileError(msg, path=output)
    tensors, metadata = load_lora(source)
    resized = resize_state_dict(tensors, metadata, target, precision=precision, source=str(source))
    for key in ("ss_output_name", "modelspec.title"):  # the name hosts show (A1111's "alias from file")
        if key in resized.metadata:
            resized.metadata[key] = output.stem
    save_lora(output, resized.tensors, resized.metadata, overwrite=overwrite)
    resized.report.output = str(output)
    resized.report.size_before = source.stat().st_size
    resized.report.size_after = output.stat().st_size
    return resized.report


def prune_to_energy(tensors: dict[str, torch.Tensor], metadata: dict[str, str], energy: float) -> Resized:
    """`dynamic_rank` at a save point: the trained LoRA cut, per module, to the smallest rank holding `energy`."""
    return resize_state_dict(tensors, metadata, Target("energy", energy), source="the trained LoRA")
