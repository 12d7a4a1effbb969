"""Activation, FLOP and traffic models of a denoiser, fitted to traced steps, per precision / checkpointing / kernel.

A traced step gives exact numbers for one (batch, latent size). Everything a step allocates per sample is linear in
the batch, and per sample it is linear in the latent area except attention, which is quadratic with the math kernel.
So four traces fit the whole surface:

    peak(b, A) = k0 + b · (a0 + a1·A + a2·A²)          A = latent height × width
    flops(b, A) = b · (f0 + f1·A + f2·A²)        traffic(b, A) = b · (m0 + m1·A + m2·A²)

from (b=1, A1), (b=1, A2), (b=1, A3) and (b=2, A2). Fits for the full-size families are shipped in `profiles.json`
(regenerate with `python -m loraloop.trainer.memory.estimation.profiles`, about 10 minutes on 2 cores); any other
architecture (the tiny models, a custom UNet) is traced on first use, which takes well under a second.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ...bundles.diffusers_bundle import DiffusersBundle
from ...families import get_family
from ...network import NetworkSpec
from .architecture import cast, meta_bundle
from .simulate import StepSetup, simulate_inference, simulate_step, simulate_vae_decode, simulate_vae_encode

log = logging.getLogger(__name__)

PROFILE_FILE = Path(__file__).with_name("profiles.json")
PROFILE_VERSION = 1
TRACE_RANK = 16  # activations depend on rank only through the [tokens, rank] adapter intermediates (<3% up to 64)
PRECISIONS = ("fp32", "half")  # half = fp16/bf16 weights with autocast (the loop on CUDA with mixed precision)
# Families with the same UNet share a profile (SD2 base and SD2-v differ only in the noise target).
PROFILE_FAMILY = {"sd1": "sd1", "sd2": "sd2", "sd2-v": "sd2", "sdxl": "sdxl"}


@dataclass(frozen=True)
class Quadratic:
    """c0 + c1·x + c2·x²."""

    c0: float
    c1: float
    c2: float

    def __call__(self, x: float) -> float:
        return self.c0 + self.c1 * x + self.c2 * x * x

    @staticmethod
    def through(points: list[tuple[float, float]]) -> Quadratic:
        """The quadratic through three (x, y) points (exact; Lagrange form)."""
        (x1, y1), (x2, y2), (x3, y3) = points
        denom = (x1 - x2) * (x1 - x3) * (x2 - x3)
        c2 = (x3 * (y2 - y1) + x2 * (y1 - y3) + x1 * (y3 - y2)) / denom
        c1 = (x3 * x3 * (y1 - y2) + x2 * x2 * (y3 - y1) + x1 * x1 * (y2 - y3)) / denom
        c0 = (x2 * x3 * (x2 - x3) * y1 + x3 * x1 * (x3 - x1) * y2 + x1 * x2 * (x1 - x2) * y3) / denom
        return Quadratic(c0, c1, c2)


@dataclass(frozen=True)
class StepModel:
    """Fitted per-step model of one (precision, checkpointing, attention) mode. Areas are latent pixels (h·w).

    Attributes:
        fixed: bytes of the peak that do not grow with the batch (adapter grads, the loss …).
        per_sample: peak bytes per sample as a function of latent area.
        flops, traffic: per sample, forward + backward.
        ops: kernels per forward + backward (independent of batch and size).
        optimizer_state_per_param, optimizer_peak_per_param: traced AdamW bytes per adapter parameter.
    """

    fixed: float
    per_sample: Quadratic
    flops: Quadratic
    traffic: Quadratic
    ops: int
    optimizer_state_per_param: float
    optimizer_peak_per_param: float

    def peak(self, batch: int, area: float) -> float:
        return self.fixed + batch * self.per_sample(area)


@dataclass(frozen=True)
class StepFigures:
    """What one chunk of `batch` samples costs in a step: peak bytes above weights and adapter parameters (traced
    at `rank`), FLOPs and memory traffic of forward + backward, kernels, and AdamW bytes per adapter parameter."""

    peak: float
    flops: float
    traffic: float
    ops: int
    optimizer_state_per_param: float
    optimizer_peak_per_param: float
    rank: int


@dataclass(frozen=True)
class SideModel:
    """Peak bytes per image of a no-grad pass (VAE encode/decode at pixel area, denoiser inference at latent area)."""

    per_sample: Quadratic

    def peak(self, batch: int, area: float) -> float:
        return batch * max(0.0, self.per_sample(area))


@dataclass
class ArchitectureProfile:
    """Every fitted model of one UNet/VAE architecture. `steps` keys: `"{precision}|gc={0,1}|{attention}"`.

    A profile made by `live_profile` keeps its meta bundle and fits a missing mode when it is first asked for.
    """

    name: str
    steps: dict[str, StepModel] = field(default_factory=dict)
    vae_encode: SideModel | None = None
    vae_decode: SideModel | None = None
    inference: dict[str, SideModel] = field(default_factory=dict)
    source: DiffusersBundle | None = field(default=None, repr=False, compare=False)
    device_type: str = "cuda"
    _exact: dict = field(default_factory=dict, repr=False, compare=False)

    @staticmethod
    def key(precision: str, gradient_checkpointing: bool, attention: str) -> str:
        return f"{precision}|gc={int(gradient_checkpointing)}|{attention}"

    def step(self, precision: str, gradient_checkpointing: bool, attention: str) -> StepModel:
        """The fitted step model of a mode (shipped profiles)."""
        key = self.key(precision, gradient_checkpointing, attention)
        if key not in self.steps:
            msg = f"profile {self.name} has no mode {key}; modes: {sorted(self.steps)}"
            raise KeyError(msg)
        return self.steps[key]

    def figures(self, precision: str, gradient_checkpointing: bool, attention: str, batch: int,
                latent_hw: tuple[int, int], rank: int) -> StepFigures:
        """One chunk's step figures: from the fitted model, or (live profiles) from an exact trace at these values,
        which is cached; the tiny models are traced in a fraction of a second."""
        area = latent_hw[0] * latent_hw[1]
        if self.source is None:
            model = self.step(precision, gradient_checkpointing, attention)
            return StepFigures(model.peak(batch, area), batch * model.flops(area), batch * model.traffic(area),
                               model.ops, model.optimizer_state_per_param, model.optimizer_peak_per_param, TRACE_RANK)
        key = (precision, gradient_checkpointing, attention, batch, tuple(latent_hw), rank)
        if key not in self._exact:
            self._with_precision(precision)
            setup = StepSetup(batch, tuple(latent_hw), torch.float16 if precision == "half" else None,  # type: ignore[arg-type]
                              gradient_checkpointing, attention, self.device_type)
            trace = simulate_step(self.source, NetworkSpec(rank=rank, alpha=rank), setup)
            params = max(1, trace.adapter_params)
            self._exact[key] = StepFigures(trace.peak, trace.flops, trace.traffic, trace.ops,
                                           trace.optimizer_state / params, trace.optimizer_peak / params, rank)
        return self._exact[key]

    def inference_model(self, precision: str) -> SideModel:
        if precision not in self.inference and self.source is not None:
            self._with_precision(precision)
            autocast = torch.float16 if precision == "half" else None
            self.inference[precision] = _fit_side(
                lambda b, hw: simulate_inference(self.source, b, hw, autocast), self._sides(), 1)  # type: ignore[arg-type]
        return self.inference[precision]

    def vae_models(self) -> tuple[SideModel, SideModel]:
        if self.vae_encode is None or self.vae_decode is None:
            if self.source is None:
                msg = f"profile {self.name} has no VAE models"
                raise KeyError(msg)
            source = self.source
            self.vae_encode = _fit_side(lambda b, hw: simulate_vae_encode(source, b, hw), self._sides(), 8)
            self.vae_decode = _fit_side(lambda b, hw: simulate_vae_decode(source, b, hw), self._sides(), 1)
        return self.vae_encode, self.vae_decode

    def _sides(self) -> tuple[int, int, int]:
        return trace_sides(self.source.family.resolution // 8) if self.source is not None else (8, 16, 24)

    def _with_precision(self, precision: str) -> None:
        assert self.source is not None
        dtype = torch.float16 if precision == "half" else torch.float32
        cast(self.source.unet, dtype)
        for slot in self.source.text_encoders:
            cast(slot.module, dtype)


def live_profile(source: DiffusersBundle, name: str, device_type: str) -> ArchitectureProfile:
    """A profile that traces a meta mirror of `source` mode by mode, when asked (tiny and custom models)."""
    return ArchitectureProfile(name, source=meta_bundle(source.family.name, source=source), device_type=device_type)


def trace_sides(native_latent: int) -> tuple[int, int, int]:
    """Latent sides to trace: half, once and 1.5 times the native size, rounded to the UNet's multiple of 8."""
    half = max(8, native_latent // 2 // 8 * 8)
    return half, max(half + 8, native_latent // 8 * 8), max(half + 16, native_latent * 3 // 2 // 8 * 8)


def fit_step_model(bundle: DiffusersBundle, precision: str, gradient_checkpointing: bool, attention: str,
                   sides: tuple[int, int, int], device_type: str = "cuda") -> StepModel:
    """Trace four steps of a meta `bundle` (in the dtype `precision` implies) and fit a `StepModel`."""
    autocast = torch.float16 if precision == "half" else None
    spec = NetworkSpec(rank=TRACE_RANK, alpha=TRACE_RANK)

    def run(batch: int, side: int):  # noqa: ANN202
        setup = StepSetup(batch, (side, side), autocast, gradient_checkpointing, attention, device_type,
                          fp16_scaler=False)
        return simulate_step(bundle, spec, setup)

    singles = [run(1, s) for s in sides]
    double = run(2, sides[1])
    per_sample_mid = double.peak - singles[1].peak
    fixed = singles[1].peak - per_sample_mid
    areas = [float(s * s) for s in sides]
    first = singles[0]
    return StepModel(
        fixed=float(fixed),
        per_sample=Quadratic.through([(a, t.peak - fixed) for a, t in zip(areas, singles, strict=True)]),
        flops=Quadratic.through([(a, float(t.flops)) for a, t in zip(areas, singles, strict=True)]),
        traffic=Quadratic.through([(a, float(t.traffic)) for a, t in zip(areas, singles, strict=True)]),
        ops=first.ops,
        optimizer_state_per_param=first.optimizer_state / first.adapter_params,
        optimizer_peak_per_param=first.optimizer_peak / first.adapter_params)


def _fit_side(fn, sides: tuple[int, int, int], scale: int) -> SideModel:  # noqa: ANN001
    points = [(float((s * scale) ** 2), float(fn(1, (s * scale, s * scale)))) for s in sides]
    return SideModel(Quadratic.through(points))


def build_profile(bundle: DiffusersBundle, name: str, *, precisions: tuple[str, ...] = PRECISIONS,
                  attentions: tuple[str, ...] = ("flash", "math"), device_type: str = "cuda") -> ArchitectureProfile:
    """Trace and fit every mode of a meta bundle (its UNet is cast per precision and restored)."""
    sides = trace_sides(bundle.family.resolution // 8)
    profile = ArchitectureProfile(name)
    for precision in precisions:
        cast(bundle.unet, torch.float16 if precision == "half" else torch.float32)
        for te in bundle.text_encoders:
            cast(te.module, bundle.dtype)
        for attention in attentions:
            for gc in (False, True):
                start = time.perf_counter()
                profile.steps[ArchitectureProfile.key(precision, gc, attention)] = fit_step_model(
                    bundle, precision, gc, attention, sides, device_type)
                log.info("%s %s gc=%s %s fitted in %.1fs", name, precision, gc, attention, time.perf_counter() - start)
        autocast = torch.float16 if precision == "half" else None
        profile.inference[precision] = _fit_side(
            lambda b, hw, a=autocast: simulate_inference(bundle, b, hw, a), sides, 1)
    profile.vae_encode = _fit_side(lambda b, hw: simulate_vae_encode(bundle, b, hw), sides, 8)
    profile.vae_decode = _fit_side(lambda b, hw: simulate_vae_decode(bundle, b, hw), sides, 1)
    return profile


# -- the shipped table ----------------------------------------------------------------------------------------------
def _to_json(profile: ArchitectureProfile) -> dict:
    data = asdict(profile)
    for transient in ("source", "device_type", "_exact"):
        data.pop(transient, None)
    return data


def _quad(d: dict) -> Quadratic:
    return Quadratic(d["c0"], d["c1"], d["c2"])


def _from_json(d: dict) -> ArchitectureProfile:
    steps = {k: StepModel(v["fixed"], _quad(v["per_sample"]), _quad(v["flops"]), _quad(v["traffic"]), v["ops"],
                          v["optimizer_state_per_param"], v["optimizer_peak_per_param"]) for k, v in d["steps"].items()}
    side = lambda v: None if v is None else SideModel(_quad(v["per_sample"]))  # noqa: E731
    return ArchitectureProfile(d["name"], steps, side(d["vae_encode"]), side(d["vae_decode"]),
                               {k: SideModel(_quad(v["per_sample"])) for k, v in d["inference"].items()})


def load_shipped(path: Path = PROFILE_FILE) -> dict[str, ArchitectureProfile]:
    """The shipped profiles by family; an empty dict (and a warning) when the file is missing or outdated."""
    if not path.is_file():
        log.warning("%s is missing; profiles will be traced on first use (slow for full-size models)", path)
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("version") != PROFILE_VERSION:
        log.warning("%s has version %s, expected %s; tracing instead", path, data.get("version"), PROFILE_VERSION)
        return {}
    return {name: _from_json(p) for name, p in data["profiles"].items()}


def family_profile(family: str, shipped: dict[str, ArchitectureProfile] | None = None) -> ArchitectureProfile:
    """The profile of a full-size family: shipped, else traced now (minutes for SDXL)."""
    name = PROFILE_FAMILY[get_family(family).name]
    table = load_shipped() if shipped is None else shipped
    if name in table:
        return table[name]
    log.warning("no shipped profile for %s; tracing it now (this takes a few minutes)", name)
    return build_profile(meta_bundle(name), name)


def write_shipped(families: tuple[str, ...] = ("sd1", "sd2", "sdxl"), path: Path = PROFILE_FILE) -> None:
    """Trace every full-size family and write the table (run after changing the loop, peft or diffusers)."""
    from .architecture import count_family_sizes

    profiles = {name: _to_json(build_profile(meta_bundle(name), name)) for name in families}
    sizes = {name: asdict(count_family_sizes(name)) for name in ("sd1", "sd2", "sd2-v", "sdxl")}
    meta = {"torch": torch.__version__, "trace_rank": TRACE_RANK}
    text = json.dumps({"version": PROFILE_VERSION, "generated_with": meta, "profiles": profiles, "sizes": sizes},
                      indent=1)
    path.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    write_shipped()
