"""`shared.sd_model` stand-ins: what the webui holds after loading an SD1 / SD2 / SDXL checkpoint, at toy size.

SD1/SD2 are the real `ldm.models.diffusion.ddpm.LatentDiffusion` (stable-diffusion-sdkit's copy of the Stability repo
the webui clones into repositories/stable-diffusion-stability-ai) with the real ldm `UNetModel` and `AutoencoderKL`,
built from configs like the webui's v1/v2 inference yamls. The text side is the webui's hijack of the
ldm text embedder (modules/sd_hijack_clip.py): `cond_stage_model` is a wrapper whose `.wrapped.transformer` is a
transformers `CLIPTextModel` and whose `forward(texts)` parses emphasis, splits prompts into 75-token chunks and
honours clip skip. `ClipWithCustomWords` below re-implements that behaviour at small scale.

SDXL: sgm (generative-models) is not on PyPI, so `SdxlEngine` mirrors `sgm.models.diffusion.DiffusionEngine` as the
webui extends it (modules/sd_models_xl.py: `get_learned_conditioning`, `apply_model`, `alphas_cumprod`,
`parameterization`): a GeneralConditioner with a CLIP-L and an OpenCLIP-bigG-like embedder and three
ConcatTimestepEmbedderND size embedders, an `OpenAIWrapper`, and the ldm UNetModel with sgm's `label_emb`
(`Sequential(Sequential(Linear, SiLU, Linear))`), which gives the SGM module names.

Importing ldm's ddpm.py needs pytorch_lightning and torchvision, which only its training/logging code uses; when they
are not installed they are stubbed for the duration of that one import and removed again.
"""

from __future__ import annotations

import re
import sys
import types
from functools import cache

import torch
from torch import nn

from loraloop.trainer.tokenizer import load_clip_tokenizer

WIDTH = 32  # text-encoder width of the toy CLIPs
CHUNK = 75  # tokens per prompt chunk (sd_hijack_clip.py: chunk_length)

# The real SD1/SD2 block structure (4 levels, attention on the first three: SD1.5's 16 transformers, so kohya's 192
# target names) at toy width, for naming tests; training tests use the 2-level `small` UNet, which is ~10× faster.
SD1_UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
                num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_head_channels=8, use_spatial_transformer=True,
                transformer_depth=1, context_dim=WIDTH, legacy=False, use_checkpoint=False)
SMALL_UNET = dict(SD1_UNET, attention_resolutions=[1], channel_mult=[1, 2])
SD2_LINEAR = dict(use_linear_in_transformer=True)  # SD2/SDXL: Linear proj_in/proj_out
# SDXL's structure: no attention on the first level, attention on the others (SDXL: 3 levels, depth 2 and 10).
SDXL_UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2],
                 num_res_blocks=2, channel_mult=[1, 2], num_head_channels=8, use_spatial_transformer=True,
                 transformer_depth=1, context_dim=2 * WIDTH, legacy=False, use_linear_in_transformer=True,
                 use_checkpoint=False)
SIZE_DIM = 8  # ConcatTimestepEmbedderND outdim (256 in SDXL)
VAE = dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 2, 2],
           num_res_blocks=1, attn_resolutions=[], dropout=0.0)


@cache
def ldm_ddpm() -> types.ModuleType:
    """`ldm.models.diffusion.ddpm`, importable without pytorch_lightning/torchvision."""
    added = []

    def stub(name: str, **attrs: object) -> types.ModuleType:
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module
        added.append(name)
        return module

    import importlib.util

    if importlib.util.find_spec("pytorch_lightning") is None:
        dist = stub("pytorch_lightning.utilities.distributed", rank_zero_only=lambda f: f)
        util = stub("pytorch_lightning.utilities", distributed=dist)
        stub("pytorch_lightning", LightningModule=type("LightningModule", (nn.Module,), {}), utilities=util)
    if importlib.util.find_spec("torchvision") is None:
        utils = stub("torchvision.utils", make_grid=lambda *a, **k: None)
        stub("torchvision", utils=utils)
    try:
        import ldm.models.diffusion.ddpm as ddpm
    finally:
        for name in added:
            sys.modules.pop(name, None)
    return ddpm


# -- text: the webui's prompt handling, small ------------------------------------------------------------------------
_TOKENS = re.compile(r"\\[()\[\]\\]|\(|\)|\[|\]|:\s*[+-]?[.\d]+\s*\)|[^\\()\[\]:]+|:|\\")


def parse_attention(text: str) -> list[tuple[str, float]]:
    """(text, weight) runs of a prompt with the webui's emphasis rules: (x) ×1.1, [x] ÷1.1, (x:w), \\( literal."""
    out: list[tuple[str, float]] = []
    stack: list[tuple[str, int]] = []  # (bracket, index into out where its span starts)
    for m in _TOKENS.finditer(text):
        tok = m.group(0)
        if tok.startswith("\\") and len(tok) == 2:
            out.append((tok[1], 1.0))
        elif tok in ("(", "["):
            stack.append((tok, len(out)))
        elif tok.startswith(":") and tok.endswith(")") and stack and stack[-1][0] == "(":
            _, start = stack.pop()
            weight = float(tok[1:-1].strip())
            out[start:] = [(t, w * weight) for t, w in out[start:]]
        elif tok in (")", "]") and stack and stack[-1][0] == ("(" if tok == ")" else "["):
            _, start = stack.pop()
            factor = 1.1 if tok == ")" else 1 / 1.1
            out[start:] = [(t, w * factor) for t, w in out[start:]]
        else:
            out.append((tok, 1.0))
    for bracket, start in reversed(stack):
        factor = 1.1 if bracket == "(" else 1 / 1.1
        out[start:] = [(t, w * factor) for t, w in out[start:]]
    return [(t, w) for t, w in out if t]


class FrozenClipStandIn(nn.Module):
    """ldm's FrozenCLIPEmbedder / FrozenOpenCLIPEmbedder after loading: a frozen text model and its tokenizer."""

    def __init__(self, kind: str = "sd1", seed: int = 0) -> None:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        super().__init__()
        open_clip = kind in ("sd2", "sdxl-g")
        config = CLIPTextConfig(hidden_size=WIDTH, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
                                vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                                pad_token_id=0 if open_clip else 49407, projection_dim=WIDTH,
                                hidden_act="gelu" if open_clip else "quick_gelu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = (CLIPTextModelWithProjection if kind == "sdxl-g" else CLIPTextModel)(config)
        if kind == "sd2":
            self.model = model  # the webui tells SD2 by `cond_stage_model.model` (sd_models.set_model_type)
        else:
            self.transformer = model
        self.tokenizer = load_clip_tokenizer("open-clip" if open_clip else "clip-l")
        self.kind = kind
        self.eval().requires_grad_(False)

    @property
    def text_model(self) -> nn.Module:
        return self.model if self.kind == "sd2" else self.transformer


class ClipWithCustomWords(nn.Module):
    """The webui's FrozenCLIPEmbedderWithCustomWords (sd_hijack_clip.py), reduced: emphasis, 75-token chunks with
    BOS/EOS, padding with EOS (CLIP-L) or "!" after the EOS (OpenCLIP), clip skip, emphasis multipliers with the
    "Original" mean restore. `forward(texts)` → [B, 77·chunks, D] (and the pooled projection for the bigG one)."""

    def __init__(self, wrapped: FrozenClipStandIn, *, penultimate: bool = False, return_pooled: bool = False,
                 input_key: str = "txt") -> None:
        super().__init__()
        self.wrapped = wrapped
        self.penultimate = penultimate  # SDXL embedders use the hidden states before the last layer
        self.return_pooled = return_pooled
        self.input_key = input_key
        tok = wrapped.tokenizer
        self.id_start, self.id_end = tok.bos_token_id, tok.eos_token_id
        self.id_pad = 0 if wrapped.kind in ("sd2", "sdxl-g") else self.id_end
        self.ucg_rate = 0.0

    def tokenize_line(self, line: str) -> list[tuple[list[int], list[float]]]:
        from modules import shared

        runs = parse_attention(line) if shared.opts.emphasis != "None" else [(line, 1.0)]
        tokens: list[int] = []
        weights: list[float] = []
        for text, weight in runs:
            ids = self.wrapped.tokenizer(text, add_special_tokens=False).input_ids
            tokens += ids
            weights += [weight] * len(ids)
        chunks = []
        for start in range(0, max(len(tokens), 1), CHUNK):
            part, mult = tokens[start : start + CHUNK], weights[start : start + CHUNK]
            pad = CHUNK - len(part)
            chunks.append(([self.id_start, *part, self.id_end] + [self.id_pad] * pad, [1.0, *mult, 1.0] + [1.0] * pad))
        return chunks

    def process_texts(self, texts: list[str]) -> tuple[list[list], int]:
        chunks = [self.tokenize_line(t) for t in texts]
        return chunks, max(len(c) for c in chunks) * CHUNK

    def forward(self, texts: list[str]):
        from modules import devices, shared

        batch = [self.tokenize_line(t) for t in texts]
        n = max(len(c) for c in batch)
        empty = self.tokenize_line("")[0]
        zs, pooled = [], None
        for i in range(n):
            chunk = [c[i] if i < len(c) else empty for c in batch]
            ids = torch.tensor([c[0] for c in chunk], device=devices.device)
            mult = torch.tensor([c[1] for c in chunk], device=devices.device)
            out = self.wrapped.text_model(input_ids=ids, output_hidden_states=True)
            skip = max(int(shared.opts.CLIP_stop_at_last_layers), 1)
            if self.penultimate:
                z = out.hidden_states[-2]
            elif skip > 1:
                text_model = self.wrapped.text_model
                norm = getattr(text_model, "text_model", text_model).final_layer_norm
                z = norm(out.hidden_states[-skip])
            else:
                z = out.last_hidden_state
            if (mult != 1).any():  # sd_emphasis.EmphasisOriginal: weight the tokens, then restore the mean
                original_mean = z.mean()
                z = z * mult.reshape((*mult.shape, 1)).expand(z.shape).to(z.dtype)
                new_mean = z.mean()
                z = z * (original_mean / new_mean) if new_mean.abs() > 1e-6 else z
            zs.append(z)
            if i == 0 and self.return_pooled:
                pooled = out.text_embeds
        z = torch.hstack(zs)
        return (z, pooled) if self.return_pooled else z


def randomize_zero_init(module: nn.Module, seed: int = 0) -> None:
    """ldm zero-initialises the UNet's output projections (zero_module), so a fresh UNet predicts 0 for any input;
    give them small random values, as a trained checkpoint has, so that conditioning and adapters show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


# -- SD1 / SD2: the real LatentDiffusion -------------------------------------------------------------------------------
def _webui_fields(model: nn.Module, *, sd1: bool = False, sd2: bool = False, sdxl: bool = False,
                  filename: str = "toy.safetensors") -> nn.Module:
    from modules import sd_models

    model.is_sd1, model.is_sd2, model.is_sdxl, model.is_ssd, model.is_sd3 = sd1, sd2, sdxl, False, False
    model.is_sdxl_inpaint = False
    model.lowvram = False
    model.latent_channels = 4
    model.sd_checkpoint_info = sd_models.CheckpointInfo(filename)
    model.sd_model_checkpoint = filename
    model.sd_model_hash = "0123456789"
    return model


def build_sd(kind: str = "sd1", *, v: bool = False, seed: int = 0, full_layout: bool = False) -> nn.Module:
    """SD1 (`kind="sd1"`) or SD2 (`"sd2"`, with `v=True` the 768-v parameterization) as the webui holds it.

    `full_layout`: the real SD1/SD2 UNet block structure (slower); else a 2-level UNet of the same kind."""
    ddpm = ldm_ddpm()
    unet = dict(SD1_UNET if full_layout else SMALL_UNET, **(SD2_LINEAR if kind == "sd2" else {}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ddpm.LatentDiffusion(
            unet_config={"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": dict(unet)},
            first_stage_config={"target": "ldm.models.autoencoder.AutoencoderKL",
                                "params": {"embed_dim": 4, "ddconfig": dict(VAE),
                                           "lossconfig": {"target": "torch.nn.Identity"}}},
            cond_stage_config={"target": "a1111_stub.models.FrozenClipStandIn", "params": {"kind": kind, "seed": seed}},
            linear_start=0.00085, linear_end=0.012, num_timesteps_cond=1, log_every_t=200, timesteps=1000,
            first_stage_key="jpg", cond_stage_key="txt", image_size=8, channels=4, cond_stage_trainable=False,
            conditioning_key="crossattn", monitor=None, scale_factor=0.18215, use_ema=False,
            parameterization="v" if v else "eps")
    randomize_zero_init(model.model, seed)
    # sd_hijack.py: the embedder is replaced by the webui's wrapper, which keeps it as `.wrapped`.
    model.cond_stage_model = ClipWithCustomWords(model.cond_stage_model)
    model.eval()
    filename = f"toy-{kind}{'-v' if v else ''}.safetensors"
    return _webui_fields(model, sd1=kind == "sd1", sd2=kind == "sd2", filename=filename)


# -- SDXL: a DiffusionEngine as the webui extends it -------------------------------------------------------------------
class ConcatTimestepEmbedderND(nn.Module):
    """sgm's size embedder: each number → a sinusoidal embedding of `outdim`, concatenated."""

    def __init__(self, input_key: str, outdim: int = SIZE_DIM) -> None:
        super().__init__()
        self.input_key = input_key
        self.outdim = outdim
        self.ucg_rate = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ldm.modules.diffusionmodules.util import timestep_embedding

        b, dims = x.shape
        emb = timestep_embedding(x.reshape(-1), self.outdim)
        return emb.reshape(b, dims * self.outdim)


class GeneralConditioner(nn.Module):
    """sgm's GeneralConditioner: 3-D outputs → "crossattn" (concatenated on the channel axis), 2-D → "vector"."""

    def __init__(self, embedders: list[nn.Module]) -> None:
        super().__init__()
        self.embedders = nn.ModuleList(embedders)

    def forward(self, batch: dict, force_zero_embeddings: list | None = None) -> dict:
        out: dict[str, list[torch.Tensor]] = {}
        for embedder in self.embedders:
            emb = embedder(batch[embedder.input_key])
            for e in emb if isinstance(emb, (tuple, list)) else [emb]:
                if embedder.input_key in (force_zero_embeddings or []):
                    e = torch.zeros_like(e)
                out.setdefault({3: "crossattn", 2: "vector"}[e.dim()], []).append(e)
        return {k: torch.cat(v, dim=2 if k == "crossattn" else 1) for k, v in out.items()}

    def process_texts(self, texts: list[str]):
        for embedder in self.embedders:
            if hasattr(embedder, "process_texts"):
                return embedder.process_texts(texts)
        raise AssertionError("no tokenizer")


class OpenAIWrapper(nn.Module):
    def __init__(self, diffusion_model: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: dict) -> torch.Tensor:
        return self.diffusion_model(x, timesteps=t, context=c["crossattn"], y=c["vector"])


def _sgm_vae() -> nn.Module:
    ddpm = ldm_ddpm()  # imports ldm.models.autoencoder too (behind the same pytorch_lightning shim)

    class AutoencoderKLInferenceWrapper(ddpm.AutoencoderKL):
        def encode(self, x):
            return super().encode(x).sample()

    return AutoencoderKLInferenceWrapper(ddconfig=dict(VAE), lossconfig={"target": "torch.nn.Identity"}, embed_dim=4)


class SdxlEngine(nn.Module):
    """DiffusionEngine + the webui's extend_sdxl (sd_models_xl.py)."""

    def __init__(self, seed: int = 0) -> None:
        from ldm.modules.diffusionmodules.openaimodel import UNetModel
        from ldm.modules.diffusionmodules.util import linear

        from loraloop.trainer.schedule import scaled_linear_alphas_cumprod

        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNetModel(**SDXL_UNET)
            ted = unet.model_channels * 4
            adm = WIDTH + 3 * 2 * SIZE_DIM
            unet.num_classes = "sequential"
            unet.label_emb = nn.Sequential(nn.Sequential(linear(adm, ted), nn.SiLU(), linear(ted, ted)))
            randomize_zero_init(unet, seed)
            self.model = OpenAIWrapper(unet)
            self.first_stage_model = _sgm_vae()
            embedders = [ClipWithCustomWords(FrozenClipStandIn("sdxl-l", seed), penultimate=True),
                         ClipWithCustomWords(FrozenClipStandIn("sdxl-g", seed + 1), penultimate=True,
                                             return_pooled=True),
                         ConcatTimestepEmbedderND("original_size_as_tuple"),
                         ConcatTimestepEmbedderND("crop_coords_top_left"),
                         ConcatTimestepEmbedderND("target_size_as_tuple")]
            self.conditioner = GeneralConditioner(embedders)
        self.scale_factor = 0.13025
        self.register_buffer("alphas_cumprod", scaled_linear_alphas_cumprod())
        self.parameterization = "eps"
        self.cond_stage_model = self.conditioner  # sd_hijack sets this for SDXL
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale_factor * self.first_stage_model.encode(x)

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        return self.first_stage_model.decode(z / self.scale_factor)

    def get_first_stage_encoding(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def get_learned_conditioning(self, batch: list[str]) -> dict:
        from modules import devices, shared

        for embedder in self.conditioner.embedders:
            embedder.ucg_rate = 0.0
        width = getattr(batch, "width", 1024) or 1024
        height = getattr(batch, "height", 1024) or 1024
        args = {"device": devices.device, "dtype": devices.dtype}
        n = len(batch)
        conds = {"txt": batch,
                 "original_size_as_tuple": torch.tensor([height, width], **args).repeat(n, 1),
                 "crop_coords_top_left": torch.tensor([shared.opts.sdxl_crop_top, shared.opts.sdxl_crop_left],
                                                      **args).repeat(n, 1),
                 "target_size_as_tuple": torch.tensor([height, width], **args).repeat(n, 1)}
        return self.conditioner(conds)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.model(x, t, cond)


def build_sdxl(seed: int = 0) -> nn.Module:
    return _webui_fields(SdxlEngine(seed), sdxl=True, filename="toy-sdxl.safetensors")


# -- Forge -------------------------------------------------------------------------------------------------------------
class ForgeLinear(nn.Module):
    """backend/operations.py ForgeOperations.Linear: an nn.Module (not an nn.Linear) that computes F.linear itself."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, n))
        self.bias = nn.Parameter(torch.zeros(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


def build_forge() -> nn.Module:
    """The object Forge exposes as shared.sd_model: forge_objects, and first_stage_model/cond_stage_model = None."""
    engine = nn.Module()
    unet = nn.Sequential(ForgeLinear(8))
    engine.forge_objects = types.SimpleNamespace(unet=types.SimpleNamespace(model=types.SimpleNamespace(
        diffusion_model=unet)), clip=None, vae=None)
    engine.unet_module = unet
    engine.first_stage_model = None
    engine.cond_stage_model = None
    engine.is_sdxl, engine.is_sd1, engine.is_sd2 = False, True, False
    return engine
