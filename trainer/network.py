"""Adapters through peft: inject into a bundle's modules, train, export in kohya/LyCORIS layout, load, remove.

`Network` owns one peft tuner per adapted module (UNet, each trained text encoder). Removing it calls peft's
`unload()`, which puts the original module objects back, so the host's weights are bit-identical afterwards
(we never merge). kohya's file layout is written here and nowhere else (docs/lora-format.md §1, §3.4).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .bundle import ModelBundle, TextEncoderSlot
from .config import TrainConfig, field_default
from .custom_layers import custom_modules
from .errors import ConfigError, LoraFileError
from .naming import TE_CLASSES, apply_preset, find_targets, kohya_te_name

log = logging.getLogger(__name__)

ADAPTER = "default"  # the name of our adapter inside every peft layer (the OOM ladder's rank lever reads it too)
DEFAULT_RANK: int = field_default("lora_rank")
MIN_RANK = 4  # the lowest rank the memory planner and the OOM ladder lower an adapter to
NETWORK_TYPES = ("lora", "locon", "loha", "lokr")
# Origin-article / LLM-style names → SD attention names (the article's example is ["q_proj", "v_proj"]).
_UNET_ALIASES = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out.0", "o_proj": "to_out.0",
                 "to_out": "to_out.0"}
_TE_ALIASES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj", "to_out.0": "out_proj",
               "o_proj": "out_proj"}


@dataclass(frozen=True)
class NetworkSpec:
    """What to train.

    Args:
        network_type: `lora`, `locon` (LoRA + 3×3 ResNet convs), `loha` or `lokr` (LyCORIS layouts, through peft).
        rank, alpha: adapter rank and alpha; the update is scaled by alpha/rank.
        dropout: dropout on the adapter input (LoRA/LoCon) or module dropout (LoHa/LoKr).
        conv_rank, conv_alpha: rank/alpha of 3×3 convs (LoCon, LoHa, LoKr); None → rank/alpha.
        target_modules: keep only default targets whose path ends with one of these names (None: kohya's defaults).
        target_preset: `default` (the family's usual targets) or `attention` (attention projections only).
        train_unet, train_text_encoder: which modules get adapters.
        rank_by_module, alpha_by_module: exact per-module overrides (used when loading a file with mixed ranks).
    """

    network_type: str = "lora"
    rank: int = DEFAULT_RANK
    alpha: float = float(DEFAULT_RANK)
    dropout: float = 0.0
    conv_rank: int | None = None
    conv_alpha: float | None = None
    target_modules: tuple[str, ...] | None = None
    train_unet: bool = True
    train_text_encoder: bool = False
    rank_by_module: dict[str, int] = field(default_factory=dict)
    alpha_by_module: dict[str, float] = field(default_factory=dict)
    target_preset: str = "default"

    @property
    def uses_conv(self) -> bool:
        return self.network_type in ("locon", "loha", "lokr") or self.conv_rank is not None

    @property
    def kohya_module(self) -> str:
        return "networks.lora" if self.network_type in ("lora", "locon") else "lycoris.kohya"

    def kohya_args(self) -> dict[str, str]:
        """`ss_network_args` as kohya/LyCORIS write them (string values)."""
        args: dict[str, str] = {}
        if self.network_type in ("loha", "lokr"):
            args["algo"] = self.network_type
        if self.uses_conv:
            args["conv_dim"] = str(self.conv_rank or self.rank)
            args["conv_alpha"] = str(self.conv_alpha if self.conv_alpha is not None else self.alpha)
        if self.dropout:
            args["dropout"] = str(self.dropout)
        return args


def network_spec(config: TrainConfig) -> NetworkSpec:
    """What `config` trains: the one place a `NetworkSpec` is built from config fields."""
    return NetworkSpec(network_type=config.network_type, rank=config.lora_rank, alpha=config.alpha,
                       dropout=config.lora_dropout, conv_rank=config.conv_rank, conv_alpha=config.conv_alpha,
                       target_modules=tuple(config.target_modules) if config.target_modules else None,
                       train_text_encoder=config.train_text_encoder, target_preset=config.target_preset)


def _filter(paths: list[str], names: tuple[str, ...] | None, aliases: dict[str, str]) -> list[str]:
    if not names:
        return paths
    wanted = [aliases.get(n, n) for n in names]
    return [p for p in paths if any(p == w or p.endswith("." + w) for w in wanted)]


def _peft_config(spec: NetworkSpec, targets: dict[str, tuple[int, float]]):  # noqa: ANN202
    """A peft config whose rank/alpha patterns pin every target to its exact (rank, alpha)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    rank_pattern = {re.escape(p): r for p, (r, _) in targets.items() if r != spec.rank}
    alpha_pattern = {re.escape(p): a for p, (_, a) in targets.items() if a != spec.alpha}
    common = {"r": spec.rank, "target_modules": list(targets), "rank_pattern": rank_pattern,
              "alpha_pattern": alpha_pattern}
    if spec.network_type in ("lora", "locon"):
        return LoraConfig(lora_alpha=spec.alpha, lora_dropout=spec.dropout, init_lora_weights=True, **common)
    if spec.network_type == "loha":
        return LoHaConfig(alpha=spec.alpha, module_dropout=spec.dropout, **common)
    # LoKr: factor the larger side, decompose w2 when the rank is small enough to be a saving (LyCORIS default).
    return LoKrConfig(alpha=spec.alpha, module_dropout=spec.dropout, decompose_both=False, decompose_factor=-1,
                      **common)


def _register_custom_layers(config: object, custom: dict[type[nn.Module], type[nn.Module]], network_type: str) -> None:
    """Host layers that are not nn.Linear but compute a linear map (Forge Neo's) get our thin LoRA layer
    (custom_layers.py) through peft's custom-module registration; LoHa/LoKr have no such layer."""
    if not custom:
        return
    if network_type not in ("lora", "locon"):
        names = ", ".join(sorted(cls.__qualname__ for cls in custom))
        msg = (f"network_type {network_type} cannot adapt this model's layers ({names}: not torch.nn.Linear "
               "subclasses); use lora or locon")
        raise ConfigError(msg, key="network_type", value=network_type, allowed=("lora", "locon"))
    config._register_custom_module(custom)  # type: ignore[attr-defined]


class Network:
    """Adapters injected into a bundle; use as a context manager so they are always removed.

    Args:
        bundle: the model bundle whose `unet` / `text_encoders` get adapters.
        spec: what to train.
    """

    def __init__(self, bundle: ModelBundle, spec: NetworkSpec) -> None:
        if spec.network_type not in NETWORK_TYPES:
            msg = f"network_type must be one of {', '.join(NETWORK_TYPES)} (got {spec.network_type!r})"
            raise ConfigError(msg, key="network_type", value=spec.network_type, allowed=NETWORK_TYPES)
        self.bundle = bundle
        self.spec = spec
        self._tuners: list[tuple[str, nn.Module, object]] = []  # (component, module, tuner)
        self._requires_grad: list[tuple[nn.Parameter, bool]] = []
        self.names: dict[str, tuple[str, str]] = {}  # kohya stem → (component, module path)
        try:
            if spec.train_unet:
                self._inject_unet()
            if spec.train_text_encoder:
                for slot in bundle.text_encoders:
                    self._inject_text_encoder(slot)
        except BaseException:
            self.remove()
            raise
        if not self.names:
            msg = (f"no module matched target_modules={list(spec.target_modules or [])}; try to_q, to_k, to_v, "
                   "to_out.0, proj_in, ff.net.2")
            raise ConfigError(msg, key="target_modules", value=spec.target_modules)
        log.info("adapters on %d modules (%s, rank %d, alpha %g)", len(self.names), spec.network_type, spec.rank,
                 spec.alpha)

    # -- injection ------------------------------------------------------------------------------------------------
    def _rank_alpha(self, stem: str, kind: str) -> tuple[int, float]:
        spec = self.spec
        rank, alpha = spec.rank, spec.alpha
        if kind == "conv3x3":
            rank = spec.conv_rank or spec.rank
            alpha = spec.conv_alpha if spec.conv_alpha is not None else spec.alpha
        return spec.rank_by_module.get(stem, rank), spec.alpha_by_module.get(stem, alpha)

    def _inject(self, component: str, module: nn.Module, targets: dict[str, tuple[int, float]]) -> None:
        from peft import LoHaModel, LoKrModel, LoraModel

        for p in module.parameters():
            self._requires_grad.append((p, p.requires_grad))
            p.requires_grad_(False)
        tuners = {"lora": LoraModel, "locon": LoraModel, "loha": LoHaModel, "lokr": LoKrModel}
        tuner_cls = tuners[self.spec.network_type]
        config = _peft_config(self.spec, targets)
        _register_custom_layers(config, custom_modules(module, list(targets)), self.spec.network_type)
        tuner = tuner_cls(module, config, ADAPTER)
        self._tuners.append((component, module, tuner))
        # Adapters train in float32 even on fp16/bf16 base weights (peft makes them in the base dtype).
        for name, p in module.named_parameters():
            if self._is_adapter_param(name):
                p.data = p.data.float()
                p.requires_grad_(True)

    @staticmethod
    def _is_adapter_param(name: str) -> bool:
        return any(k in name for k in (".lora_A.", ".lora_B.", ".hada_", ".lokr_"))

    def _inject_unet(self) -> None:
        kinds = self.bundle.unet_targets(conv=self.spec.uses_conv)
        attention = getattr(getattr(self.bundle, "arch", None), "attention", None) or self.bundle.family.attention
        paths = apply_preset(list(kinds), self.spec.target_preset, attention)
        paths = _filter(paths, self.spec.target_modules, _UNET_ALIASES)
        if not paths:
            return
        stems = {p: self.bundle.unet_lora_name(p) for p in paths}
        targets = {p: self._rank_alpha(stems[p], kinds[p]) for p in paths}
        self.names.update({stem: ("unet", p) for p, stem in stems.items()})
        self._inject("unet", self.bundle.unet, targets)

    def _inject_text_encoder(self, slot: TextEncoderSlot) -> None:
        paths = slot.targets or find_targets(slot.module, TE_CLASSES)
        paths = _filter(paths, self.spec.target_modules, _TE_ALIASES)
        if not paths:
            return
        stems = {p: kohya_te_name(slot.prefix, p, slot.layer_pattern) for p in paths}
        self.names.update({stem: (slot.prefix, p) for p, stem in stems.items()})
        self._inject(slot.prefix, slot.module, {p: self._rank_alpha(stems[p], "linear") for p in paths})

    # -- access ---------------------------------------------------------------------------------------------------
    def parameters(self, component: str | None = None) -> list[nn.Parameter]:
        """Trainable adapter parameters, optionally of one component (`unet`, `lora_te`, `lora_te1`, …)."""
        out = []
        for comp, module, _ in self._tuners:
            if component in (None, comp):
                out += [p for n, p in module.named_parameters() if self._is_adapter_param(n)]
        return out

    def _layers(self) -> dict[str, nn.Module]:
        """kohya stem → the peft layer module holding that module's adapter."""
        modules = {comp: dict(m.named_modules()) for comp, m, _ in self._tuners}
        return {stem: modules[comp][path] for stem, (comp, path) in self.names.items()}

    # -- export / import ------------------------------------------------------------------------------------------
    def state_dict(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """The adapters in kohya's (LoRA/LoCon) or LyCORIS's (LoHa/LoKr) key layout, every tensor in `dtype`; a bundle
        whose `lora_key_style` is `diffusers` gets diffusers' `lora_A`/`lora_B` names (its stems are module paths)."""
        out: dict[str, torch.Tensor] = {}
        diffusers_keys = getattr(self.bundle, "lora_key_style", "kohya") == "diffusers"
        for stem, layer in self._layers().items():
            tensors = _export_layer(self.spec.network_type, layer)
            if diffusers_keys and "lora_up.weight" in tensors:
                tensors = _diffusers_layer(tensors)
            for key, tensor in tensors.items():
                out[f"{stem}.{key}"] = tensor.detach().to("cpu", dtype).contiguous()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a kohya/LyCORIS (or diffusers lora_A/lora_B) state dict written for the same modules and ranks
        (continue training, apply)."""
        state = kohya_keys(state)
        layers = self._layers()
        stems = stems_of(state)
        missing, unexpected = sorted(set(layers) - stems), sorted(stems - set(layers))
        if unexpected:
            msg = (f"{len(unexpected)} LoRA modules do not exist in this model/network (e.g. {unexpected[:3]}); "
                   "was it trained for another model family or with other targets?")
            raise LoraFileError(msg)
        if missing:
            log.warning("%d adapted modules are not in the file and keep their fresh initialisation (e.g. %s)",
                        len(missing), missing[:3])
        by_stem: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state.items():  # one pass: each key split once
            stem, part = split_key(key)
            by_stem.setdefault(stem, {})[part] = value
        for stem in sorted(stems):
            _import_layer(self.spec.network_type, layers[stem], by_stem[stem], stem)

    # -- removal --------------------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Take every adapter out and restore requires_grad flags; the modules are exactly as before injection."""
        while self._tuners:
            _, _, tuner = self._tuners.pop()
            tuner.unload()  # type: ignore[attr-defined]
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)
        self._requires_grad.clear()

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@contextlib.contextmanager
def applied_lora(bundle: ModelBundle, spec: NetworkSpec, tensors: dict[str, torch.Tensor]) -> Iterator[Network]:
    """A trained LoRA (kohya tensors) applied to `bundle` for sampling; the bundle is restored on exit."""
    with Network(bundle, replace(spec, train_unet=True)) as network:
        network.load_state_dict({k: v.float() for k, v in tensors.items()})
        yield network


DIFFUSERS_KEYS = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}
# Every per-module tensor name a kohya/LyCORIS/diffusers LoRA file holds after its module stem.
ADAPTER_SUFFIXES = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "lora_A.weight", "lora_B.weight", "alpha",
                    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w2",
                    "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "dora_scale")


def split_key(key: str) -> tuple[str, str]:
    """(module stem, tensor name) of a LoRA key; stems may hold dots (diffusers: `transformer.x.attn.to_q`)."""
    for suffix in ADAPTER_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    stem, _, rest = key.partition(".")
    return stem, rest


def stems_of(state: dict[str, torch.Tensor]) -> set[str]:
    return {split_key(k)[0] for k in state}


def kohya_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with diffusers' `lora_A`/`lora_B` tensor names renamed to kohya's `lora_down`/`lora_up` (unchanged when
    it has none)."""
    if not any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state):
        return state
    back = {v: k for k, v in DIFFUSERS_KEYS.items()}
    out = {}
    for key, value in state.items():
        for new, old in back.items():
            if key.endswith("." + new):
                key = key[: -len(new)] + old
        out[key] = value
    return out


def _diffusers_layer(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' names with the alpha/rank scale baked into lora_B and no alpha key: every loader then computes the
    same B·A (diffusers reads no alpha for SD3 files, ComfyUI and diffusers' Flux loader default to scale 1)."""
    down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
    scale = float(tensors["alpha"]) / down.shape[0]
    return {DIFFUSERS_KEYS["lora_down.weight"]: down, DIFFUSERS_KEYS["lora_up.weight"]: up * scale}


def _export_layer(network_type: str, layer: nn.Module) -> dict[str, torch.Tensor]:
    if network_type in ("lora", "locon"):
        rank = layer.r[ADAPTER]
        return {"lora_down.weight": layer.lora_A[ADAPTER].weight, "lora_up.weight": layer.lora_B[ADAPTER].weight,
                "alpha": torch.tensor(float(layer.scaling[ADAPTER] * rank))}
    params = {n.split(".")[0]: p for n, p in layer.named_parameters() if n.endswith(f".{ADAPTER}") and
              n.split(".")[0].startswith(("hada_", "lokr_"))}
    rank = layer.r[ADAPTER]
    scaling = float(layer.scaling[ADAPTER])
    out = dict(params)
    if network_type == "lokr" and "lokr_w1" in out and "lokr_w2" in out:
        # Both Kronecker factors full: LyCORIS/ComfyUI/A1111 apply no alpha/rank scale, peft does. Bake it in.
        out["lokr_w1"] = out["lokr_w1"] * scaling
        out["alpha"] = torch.tensor(float(rank))
        return out
    out["alpha"] = torch.tensor(scaling * rank)
    return out


def _import_layer(network_type: str, layer: nn.Module, tensors: dict[str, torch.Tensor], stem: str) -> None:
    with torch.no_grad():
        if network_type in ("lora", "locon"):
            pairs = {"lora_down.weight": layer.lora_A[ADAPTER].weight, "lora_up.weight": layer.lora_B[ADAPTER].weight}
        else:
            pairs = {n.split(".")[0]: p for n, p in layer.named_parameters() if n.endswith(f".{ADAPTER}")}
        for key, param in pairs.items():
            if key not in tensors:
                msg = f"{stem}.{key} is missing from the LoRA file"
                raise LoraFileError(msg)
            value = tensors[key]
            if key == "lokr_w1" and "lokr_w2" in tensors:  # undo the scale baked in by _export_layer
                value = value.float() / float(layer.scaling[ADAPTER])
            if value.numel() != param.numel():
                msg = (f"{stem}.{key} has shape {tuple(value.shape)} but the network expects {tuple(param.shape)}; "
                       "set lora_rank/conv_rank to the file's ranks")
                raise LoraFileError(msg)
            param.copy_(value.reshape(param.shape).to(param.dtype))
        if network_type in ("lora", "locon") and "alpha" in tensors:
            rank = layer.r[ADAPTER]
            layer.scaling[ADAPTER] = float(tensors["alpha"]) / rank
            layer.lora_alpha[ADAPTER] = float(tensors["alpha"])


def spec_from_state_dict(state: dict[str, torch.Tensor], base: NetworkSpec,
                         metadata: dict[str, str] | None = None) -> NetworkSpec:
    """`base` with network type, ranks and alphas read from a kohya/LyCORIS file (per module when they differ).

    LoKr layers with two full Kronecker factors do not reveal their rank (it only decided the factorisation), so it is
    read from the file's `ss_network_dim` metadata, else taken from `base`.
    """
    state = kohya_keys(state)
    stems = sorted(stems_of(state))
    if any(k.endswith(".hada_w1_a") for k in state):
        network_type = "loha"
    elif any(".lokr_" in k for k in state):
        network_type = "lokr"
    elif any(k.endswith(".lora_down.weight") for k in state):
        network_type = "locon" if any(state[k].dim() == 4 and state[k].shape[-1] > 1 for k in state
                                      if k.endswith(".lora_down.weight")) else "lora"
    else:
        msg = "no LoRA/LoHa/LoKr tensors found (expected keys ending in .lora_down.weight, .hada_w1_a or .lokr_w1)"
        raise LoraFileError(msg)
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for stem in stems:
        if network_type in ("lora", "locon"):
            r = state[f"{stem}.lora_down.weight"].shape[0]
        elif network_type == "loha":
            r = state[f"{stem}.hada_w1_b"].shape[0]
        elif f"{stem}.lokr_w2_b" in state:
            r = state[f"{stem}.lokr_w2_b"].shape[0]
        elif f"{stem}.lokr_w1_b" in state:
            r = state[f"{stem}.lokr_w1_b"].shape[0]
        else:
            r = int(float((metadata or {}).get("ss_network_dim", base.rank)))
        ranks[stem] = int(r)
        alphas[stem] = float(state[f"{stem}.alpha"]) if f"{stem}.alpha" in state else float(r)
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return NetworkSpec(network_type=network_type, rank=rank, alpha=alpha, dropout=base.dropout,
                       conv_rank=base.conv_rank, conv_alpha=base.conv_alpha, target_modules=base.target_modules,
                       train_unet=any(s.startswith("lora_unet_") for s in stems) or base.train_unet,
                       train_text_encoder=any(s.startswith("lora_te") for s in stems) or base.train_text_encoder,
                       rank_by_module={s: r for s, r in ranks.items() if r != rank},
                       alpha_by_module={s: a for s, a in alphas.items() if a != alpha})
