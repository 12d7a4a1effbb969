"""Tiny random-weight Flux.1-dev and SD3 files in the real layouts, for a REAL ComfyUI (tests/test_comfy_real_flow.py,
bench/comfy_vs_builtin.py --family flux|sd3).

ComfyUI detects a diffusion model from key names and shapes (comfy/model_detection.py), the VAE from its keys
(comfy/sd.py `VAE`), and a text encoder from its keys too (comfy/sd.py `detect_te_model`). So each file has the real
key names of the format a user downloads, only small where the detection reads the size from the weights:

* **Flux.1 dev** (BFL layout, diffusion model only, for UNETLoader): ComfyUI 0.12.3 and 0.33 both read the hidden size
  from `img_in`/`txt_in`, the context width from `txt_in`, the pooled width from `vector_in`, and fix the rope axes at
  16+56+56 = 128, so one head of 128: hidden 128, 1 double + 1 single block, context 64, pooled 32 (~1 M parameters).
* **SD3** (SAI MMDiT layout, diffusion model only): depth = x_embedder width / 64 (here 2: hidden 128, 2 heads),
  `context_embedder` 4096 → 128 (SD3's text encoder always pads CLIP-L||G to 4096 and concatenates T5's tokens, so
  4096 is fixed), pooled 64 (`y_embedder`), a 32 x 32 patch `pos_embed` (up to 512 px).
* **VAE**: ComfyUI fixes the SD/Flux VAE's channels (128-256-512-512); only the latent width is read from the weights.
  So it is the full-size 16-channel VAE (Flux's ae.safetensors layout, 84 M parameters, fp16 on disk).
* **Text encoders** (HF transformers layouts, as ComfyUI's text_encoders files): CLIP-L (width 32, 3 layers), CLIP-G
  (width 32, 32 layers: ComfyUI recognises CLIP-G by its 31st layer), T5 (1 gated-GELU layer; width 64 for Flux,
  4096 for SD3 because of the fixed padding above: 131 M parameters, nearly all the token embedding). ComfyUI's own
  loaders build text encoders at the real sizes from JSON configs; the test-only node in `test_nodes/` loads these
  files through ComfyUI's own classes with the configs written in each file's metadata (see its docstring).

Weights: matrices N(0, 1/fan_in) (the signal keeps its scale through the layers), norm scales 1, biases N(0, 0.02²);
the VAE and text encoders use diffusers'/transformers' own initialisation. Everything is seeded and cached by content
in `$LORALOOP_TEST_CACHE` (or ~/.cache/loraloop-tests), like checkpoint.py. Building everything takes ~15 s.
Only torch, safetensors, diffusers and transformers are needed (no ComfyUI import), so the bench can build these from
this repository's venv.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FORMAT_VERSION = 2  # bump when the way the files are built changes

# -- the sizes ---------------------------------------------------------------------------------------------------------
FLUX = {"hidden": 128, "double": 1, "single": 1, "context": 64, "pooled": 32, "guidance": True, "mlp_ratio": 4}
SD3 = {"depth": 2, "context": 4096, "pooled": 64, "pos_embed_max": 32}
CLIP_L = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
          "hidden_act": "quick_gelu", "projection_dim": 32}
CLIP_G = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 32, "num_attention_heads": 2,
          "hidden_act": "gelu", "projection_dim": 32}
T5_FLUX = {"d_model": 64, "d_kv": 16, "num_heads": 4, "d_ff": 128, "num_layers": 1}
T5_SD3 = {"d_model": 4096, "d_kv": 8, "num_heads": 2, "d_ff": 16, "num_layers": 1}
VAE_CHANNELS = 16


def cache_dir() -> Path:
    return Path(os.environ.get("LORALOOP_TEST_CACHE") or Path.home() / ".cache" / "loraloop-tests")


def _cached(stem: str, parts: object, build: Callable[[], dict], metadata: dict[str, str] | None = None) -> Path:
    """`cache_dir()/<stem>-<hash of parts>.safetensors`, built once (written atomically)."""
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, parts], sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir() / f"{stem}-{digest}.safetensors"
    if target.is_file():
        return target
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tensors = {k: v.contiguous() for k, v in build().items()}
    save_file(tensors, str(tmp), metadata={"note": "random weights, LoRA Loop tests", **(metadata or {})})
    tmp.replace(target)
    return target


class _Init:
    """Seeded random tensors by role (fp16 on disk)."""

    def __init__(self, seed: int) -> None:
        import torch

        self.torch = torch
        self.gen = torch.Generator().manual_seed(seed)
        self.out: dict = {}

    def linear(self, name: str, out_f: int, in_f: int, bias: bool = True) -> None:
        torch = self.torch
        self.out[name + ".weight"] = (torch.randn(out_f, in_f, generator=self.gen) / math.sqrt(in_f)).half()
        if bias:
            self.bias(name + ".bias", out_f)

    def bias(self, name: str, n: int) -> None:
        self.out[name] = (self.torch.randn(n, generator=self.gen) * 0.02).half()

    def ones(self, name: str, n: int) -> None:
        self.out[name] = self.torch.ones(n, dtype=self.torch.float16)

    def tensor(self, name: str, *shape: int, scale: float = 1.0) -> None:
        self.out[name] = (self.torch.randn(*shape, generator=self.gen) * scale).half()


# -- diffusion models --------------------------------------------------------------------------------------------------
def flux_state_dict(seed: int = 0, **over: object) -> dict:
    """A Flux.1 (dev when `guidance`) diffusion model in BFL's key layout (as flux1-dev.safetensors)."""
    c = {**FLUX, **over}
    h, mlp, ctx, pooled = int(c["hidden"]), int(c["hidden"]) * int(c["mlp_ratio"]), int(c["context"]), int(c["pooled"])
    head = 128  # comfy/model_detection.py: axes_dim 16+56+56, num_heads = hidden // 128
    assert h % head == 0, "Flux's hidden size must be a multiple of 128 (ComfyUI's fixed rope axes)"
    w = _Init(seed)
    w.linear("img_in", h, 16 * 4)
    w.linear("time_in.in_layer", h, 256)
    w.linear("time_in.out_layer", h, h)
    w.linear("vector_in.in_layer", h, pooled)
    w.linear("vector_in.out_layer", h, h)
    if c["guidance"]:
        w.linear("guidance_in.in_layer", h, 256)
        w.linear("guidance_in.out_layer", h, h)
    w.linear("txt_in", h, ctx)
    for i in range(int(c["double"])):
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}_"
            w.linear(p + "mod.lin", 6 * h, h)
            w.linear(p + "attn.qkv", 3 * h, h)
            w.ones(p + "attn.norm.query_norm.scale", head)
            w.ones(p + "attn.norm.key_norm.scale", head)
            w.linear(p + "attn.proj", h, h)
            w.linear(p + "mlp.0", mlp, h)
            w.linear(p + "mlp.2", h, mlp)
    for i in range(int(c["single"])):
        p = f"single_blocks.{i}."
        w.linear(p + "linear1", 3 * h + mlp, h)
        w.linear(p + "linear2", h, h + mlp)
        w.ones(p + "norm.query_norm.scale", head)
        w.ones(p + "norm.key_norm.scale", head)
        w.linear(p + "modulation.lin", 3 * h, h)
    w.linear("final_layer.linear", 16 * 4, h)
    w.linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return w.out


def sd3_state_dict(seed: int = 0, **over: object) -> dict:
    """An SD3 (medium-style: no qk-norm, no attn2) MMDiT in SAI's key layout (as sd3_medium.safetensors' model)."""
    c = {**SD3, **over}
    depth, ctx, pooled, pos = int(c["depth"]), int(c["context"]), int(c["pooled"]), int(c["pos_embed_max"])
    h = 64 * depth  # comfy/model_detection.py: depth = x_embedder width // 64; one head of 64 per block
    w = _Init(seed)
    w.tensor("x_embedder.proj.weight", h, 16, 2, 2, scale=1 / math.sqrt(16 * 4))
    w.bias("x_embedder.proj.bias", h)
    w.tensor("pos_embed", 1, pos * pos, h, scale=0.1)
    w.linear("t_embedder.mlp.0", h, 256)
    w.linear("t_embedder.mlp.2", h, h)
    w.linear("y_embedder.mlp.0", h, pooled)
    w.linear("y_embedder.mlp.2", h, h)
    w.linear("context_embedder", h, ctx)
    for i in range(depth):
        last = i == depth - 1  # the last context block is "pre_only": no attention output, no MLP
        for block in ("context_block", "x_block"):
            p = f"joint_blocks.{i}.{block}."
            pre_only = last and block == "context_block"
            w.linear(p + "adaLN_modulation.1", (2 if pre_only else 6) * h, h)
            w.linear(p + "attn.qkv", 3 * h, h)
            if not pre_only:
                w.linear(p + "attn.proj", h, h)
                w.linear(p + "mlp.fc1", 4 * h, h)
                w.linear(p + "mlp.fc2", h, 4 * h)
    w.linear("final_layer.linear", 2 * 2 * 16, h)
    w.linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return w.out


def flux_model(seed: int = 0) -> Path:
    return _cached("loraloop-tiny-flux1-dev", ["flux", FLUX, seed], lambda: flux_state_dict(seed))


def sd3_model(seed: int = 0) -> Path:
    return _cached("loraloop-tiny-sd3", ["sd3", SD3, seed], lambda: sd3_state_dict(seed))


# -- VAE ---------------------------------------------------------------------------------------------------------------
def _vae_config() -> dict:
    return {"in_channels": 3, "out_channels": 3, "latent_channels": VAE_CHANNELS,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
            "use_quant_conv": False, "use_post_quant_conv": False}


def _build_vae(seed: int) -> dict:
    import torch
    from diffusers import AutoencoderKL

    if str(REPO / "tests") not in sys.path:
        sys.path.insert(0, str(REPO / "tests"))
    from helpers.ldm_checkpoint import vae_to_ldm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**_vae_config())
    return {k: v.half() for k, v in vae_to_ldm(vae, prefix="").items()}


def vae16(seed: int = 0) -> Path:
    """The 16-channel VAE of Flux.1 and SD3 (ae.safetensors' LDM layout, no quant convs)."""
    return _cached("loraloop-random-vae16", ["vae16", _vae_config(), seed], lambda: _build_vae(seed))


# -- text encoders -----------------------------------------------------------------------------------------------------
def _clip_config(over: dict) -> dict:
    return {"vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 49407,
            "pad_token_id": 1, "layer_norm_eps": 1e-5, **over}


def _t5_config(over: dict) -> dict:
    return {"vocab_size": 32128, "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True, "model_type": "t5",
            "relative_attention_num_buckets": 32, "layer_norm_epsilon": 1e-6, **over}


def _build_clip(config: dict, seed: int) -> dict:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModelWithProjection(CLIPTextConfig(**config))  # as clip_l/clip_g.safetensors: with projection
    sd = model.state_dict()
    out = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in sd.items()}
    return {k: v.half() for k, v in out.items() if "position_ids" not in k}


def _build_t5(config: dict, seed: int) -> dict:
    import torch
    from transformers import T5Config, T5EncoderModel

    hf = {k: v for k, v in config.items() if k not in ("dense_act_fn", "is_gated_act")}
    hf["feed_forward_proj"] = "gated-gelu"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(T5Config(**hf))
    sd = model.state_dict()
    sd.pop("encoder.embed_tokens.weight", None)  # tied to `shared`: T5 files keep `shared.weight` only
    return {k: v.half() for k, v in sd.items()}


@dataclass(frozen=True)
class TextEncoder:
    """One text-encoder file and what ComfyUI's classes need to build it at this size."""

    path: Path
    model_name: str  # the slot in ComfyUI's text-encoder classes: clip_l, clip_g or t5xxl
    config: dict


def text_encoder(kind: str, seed: int = 0) -> TextEncoder:
    """`clip_l`, `clip_g`, `t5_flux` or `t5_sd3`: built (and cached) on first use. The file's metadata carries
    `loraloop_test_model` and `loraloop_test_config` (JSON) for the test-only loader node."""
    if kind in ("clip_l", "clip_g"):
        config = _clip_config(CLIP_L if kind == "clip_l" else CLIP_G)
        model_name, build = kind, (lambda: _build_clip(config, seed))
    elif kind in ("t5_flux", "t5_sd3"):
        config = _t5_config(T5_FLUX if kind == "t5_flux" else T5_SD3)
        model_name, build = "t5xxl", (lambda: _build_t5(config, seed))
    else:
        raise ValueError(f"unknown text encoder {kind!r}")
    meta = {"loraloop_test_model": model_name, "loraloop_test_config": json.dumps(config, sort_keys=True)}
    path = _cached(f"loraloop-tiny-{kind.replace('_', '-')}", [kind, config, seed], build, meta)
    return TextEncoder(path, model_name, config)


@dataclass(frozen=True)
class FlowFamily:
    """Everything one family needs in ComfyUI: the diffusion model, the VAE, the text encoders and the loader type."""

    name: str  # flux | sd3
    model: Path
    vae: Path
    text_encoders: tuple[TextEncoder, ...]
    clip_type: str  # the loader's type: flux | sd3
    latent_node: str  # the empty-latent node of the family's stock workflows
    scheduler: str

    def loader_nodes(self) -> dict[str, dict]:
        """API-format nodes `unet` (stock UNETLoader), `clip` (the test-only TinyCLIPLoader) and `vae` (stock
        VAELoader): MODEL is ["unet", 0], CLIP ["clip", 0], VAE ["vae", 0]. Put the same nodes in every prompt, so
        ComfyUI's cache hands each prompt the same objects."""
        names = [t.path.name for t in self.text_encoders]
        clip = {"clip_name1": names[0], "clip_name2": names[1], "type": self.clip_type}
        if len(names) > 2:
            clip["clip_name3"] = names[2]
        return {
            "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": self.model.name, "weight_dtype": "default"}},
            "clip": {"class_type": "LoRALoopTest_TinyCLIPLoader", "inputs": clip},
            "vae": {"class_type": "VAELoader", "inputs": {"vae_name": self.vae.name}},
        }

    @property
    def files(self) -> dict[str, list[Path]]:
        """models/<folder> → files, for `link_models`."""
        return {"diffusion_models": [self.model], "vae": [self.vae],
                "text_encoders": [t.path for t in self.text_encoders]}


def flow_family(name: str, seed: int = 0) -> FlowFamily:
    if name == "flux":
        return FlowFamily("flux", flux_model(seed), vae16(seed), (text_encoder("clip_l", seed),
                                                                  text_encoder("t5_flux", seed)),
                          "flux", "EmptySD3LatentImage", "simple")
    if name == "sd3":
        return FlowFamily("sd3", sd3_model(seed), vae16(seed), (text_encoder("clip_l", seed),
                                                                text_encoder("clip_g", seed),
                                                                text_encoder("t5_sd3", seed)),
                          "sd3", "EmptySD3LatentImage", "simple")
    raise ValueError(f"unknown flow family {name!r} (flux or sd3)")


def link_models(base: Path, family: FlowFamily) -> None:
    """Symlink the family's files into `<base>/models/<folder>/` (ComfyUI's default folders under --base-directory)."""
    for folder, paths in family.files.items():
        target_dir = base / "models" / folder
        target_dir.mkdir(parents=True, exist_ok=True)
        for path in paths:
            link = target_dir / path.name
            if not link.exists():
                link.symlink_to(path)


TEST_NODES = Path(__file__).resolve().parent / "test_nodes"
TEST_NODES_NAME = "loraloop_test_nodes"


def link_test_nodes(base: Path) -> None:
    """The test-only node package (TinyCLIPLoader) into `<base>/custom_nodes/`."""
    link = base / "custom_nodes" / TEST_NODES_NAME
    if not link.exists():
        link.symlink_to(TEST_NODES, target_is_directory=True)


if __name__ == "__main__":
    for fam in sys.argv[1:] or ["flux", "sd3"]:
        print(flow_family(fam))
