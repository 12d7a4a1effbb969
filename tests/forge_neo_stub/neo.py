"""Stand-ins for Forge Neo's objects, written from their interface (what LoRA Loop reads or calls), not their code.

* `Linear`: backend.operations.ForgeOperations.Linear, an nn.Module that is not an nn.Linear: `in_features`,
  `out_features`, a `weight` Parameter [out, in] and `bias`, and a forward that computes F.linear itself; with
  `parameters_manual_cast` the weight is cast to the input's dtype/device on every call (Neo's weights_manual_cast).
  `Conv2d` is an nn.Conv2d subclass that casts likewise. `ForgeOperationsBNB4bits.Linear` holds a packed uint8 weight as
  bitsandbytes/GGUF layers do; `fp8Operations.Linear` is --fast-fp8's class.
* `SD15`, `SDXL`, `Flux`, `FluxSchnell`, `Chroma`: huggingface_guess model configs (class name, `huggingface_repo`,
  `latent_format`, `inpaint_model()`).
* `Prediction` (discrete ε/v schedule) and `PredictionFlux` (μ-shifted flow table, identity `sigma`/`timestep`):
  backend/modules/k_prediction.py's interface: `prediction_type`, `sigmas`, `timestep`, `sigma`, `calculate_input`,
  `calculate_denoised`.
* `KModel`: `config`, `predictor`, `diffusion_model`, `storage_dtype`, `computation_dtype`, `apply_model(x, σ, …)` → x0.
* `UnetPatcher`, and `Engine`: the ForgeDiffusionEngine the webui holds as `shared.sd_model` (`forge_objects`,
  `forge_objects_original`, `get_learned_conditioning`, `encode_first_stage`, `decode_first_stage`, SDXL's `embedder`).

The networks are the ComfyUI stand-in's tiny UNet/Flux with every nn.Linear and nn.Conv2d swapped for these layers,
built under inference mode as Neo loads models.
"""

import math
import types
import zlib

import comfy_stub.harness  # noqa: F401 - puts the ComfyUI stand-in (whose tiny networks are reused) on sys.path
import torch
from torch import nn

TE_WIDTH = 32
SDXL_EMBED = 8
LATENT_CHANNELS = {"sd15": 4, "sdxl": 4, "flux": 16, "flux-schnell": 16}


# -- layers ------------------------------------------------------------------------------------------------------------
class Linear(nn.Module):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.parameters_manual_cast = False
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        weight, bias = self.weight, self.bias
        if self.parameters_manual_cast:
            weight = weight.to(device=x.device, dtype=x.dtype)
            bias = bias.to(device=x.device, dtype=x.dtype) if bias is not None else None
        return nn.functional.linear(x, weight, bias)


class Conv2d(nn.Conv2d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.parameters_manual_cast = False

    def forward(self, x):
        weight, bias = self.weight, self.bias
        if self.parameters_manual_cast:
            weight = weight.to(device=x.device, dtype=x.dtype)
            bias = bias.to(device=x.device, dtype=x.dtype) if bias is not None else None
        return self._conv_forward(x, weight, bias)


class ForgeOperationsBNB4bits:
    class Linear(nn.Module):
        """A 4-bit layer: two weights per byte, unpacked on the fly (no float weight matrix to read)."""

        def __init__(self, in_features, out_features):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(out_features * in_features // 2, 1, dtype=torch.uint8),
                                       requires_grad=False)
            self.bias = None
            self.shape = (out_features, in_features)

        def forward(self, x):
            return x.new_zeros(*x.shape[:-1], self.shape[0])


class fp8Operations:  # Neo's name for the --fast-fp8 operations
    class Linear(Linear):
        pass


def neo_layers(module, storage=torch.float32, manual_cast=False):
    """`module` with every nn.Linear/nn.Conv2d replaced by Neo's layers holding the same weights in `storage`."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            layer = Linear(child.in_features, child.out_features, bias=child.bias is not None)
        elif isinstance(child, nn.Conv2d):
            layer = Conv2d(child.in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                           padding=child.padding, bias=child.bias is not None)
        else:
            neo_layers(child, storage, manual_cast)
            continue
        layer.weight = nn.Parameter(child.weight.detach().to(storage))
        if child.bias is not None:
            layer.bias = nn.Parameter(child.bias.detach().to(storage))
        layer.parameters_manual_cast = manual_cast
        setattr(module, name, layer)
    return module


# -- configs and predictors --------------------------------------------------------------------------------------------
class LatentFormat:
    def __init__(self, channels):
        self.scale_factor = 1.0
        self.latent_rgb_factors = [[0.3, 0.2, 0.1]] * channels


class _Config:
    huggingface_repo = None
    channels = 4

    def __init__(self):
        self.latent_format = LatentFormat(self.channels)

    def inpaint_model(self):
        return False


class SD15(_Config):
    huggingface_repo = "runwayml/stable-diffusion-v1-5"


class SDXL(_Config):
    huggingface_repo = "stabilityai/stable-diffusion-xl-base-1.0"


class Flux(_Config):
    huggingface_repo = "black-forest-labs/FLUX.1-dev"
    channels = 16


class FluxSchnell(Flux):
    huggingface_repo = "black-forest-labs/FLUX.1-schnell"


class Chroma(FluxSchnell):
    huggingface_repo = "Chroma"


class Prediction(nn.Module):
    """The DDPM schedule as σ = √((1−ᾱ)/ᾱ) over scaled-linear betas; x_in = x/√(σ²+1); x0 from ε or v."""

    def __init__(self, prediction_type="epsilon", beta_start=0.00085, beta_end=0.012, steps=1000):
        super().__init__()
        self.prediction_type = prediction_type
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())

    def timestep(self, sigma):
        return (sigma.log()[None] - self.log_sigmas[:, None]).abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, timestep):
        t = timestep.float().clamp(0, len(self.sigmas) - 1)
        lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()

    def calculate_input(self, sigma, x):
        return x / (sigma.view(-1, 1, 1, 1) ** 2 + 1.0) ** 0.5

    def calculate_denoised(self, sigma, out, x):
        s = sigma.view(-1, 1, 1, 1)
        if self.prediction_type == "v_prediction":
            return x / (s**2 + 1.0) - out * s / (s**2 + 1.0) ** 0.5
        return x - out * s


class PredictionFlux(nn.Module):
    """Rectified flow: the sampler's sigma table is shifted by μ; `sigma`/`timestep` are the identity."""

    def __init__(self, mu=1.15, steps=1000):
        super().__init__()
        self.prediction_type = "const"
        self.mu = mu
        t = torch.arange(1, steps + 1) / steps
        self.register_buffer("sigmas", math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0)))

    def timestep(self, sigma):
        return sigma

    def sigma(self, timestep):
        return timestep

    def calculate_input(self, sigma, x):
        return x

    def calculate_denoised(self, sigma, out, x):
        return x - out * sigma.view(-1, 1, 1, 1)


class PredictionEDM(Prediction):
    pass


# -- model, patcher, engine --------------------------------------------------------------------------------------------
class KModel(nn.Module):
    def __init__(self, diffusion_model, predictor, config, storage_dtype, computation_dtype):
        super().__init__()
        self.config = config
        self.predictor = predictor
        self.diffusion_model = diffusion_model
        self.storage_dtype = storage_dtype
        self.computation_dtype = computation_dtype

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        sigma = t
        xc = self.predictor.calculate_input(sigma, x).to(self.computation_dtype)
        timestep = self.predictor.timestep(t).float()
        extra = {k: v.to(self.computation_dtype) if torch.is_floating_point(v) else v for k, v in kwargs.items()}
        out = self.diffusion_model(xc, timestep, context=c_crossattn.to(self.computation_dtype), control=control,
                                   transformer_options=transformer_options or {}, **extra).float()
        return self.predictor.calculate_denoised(sigma, out, x)


class UnetPatcher:
    def __init__(self, model):
        self.model = model
        self.load_device = self.offload_device = torch.device("cpu")
        self.lora_patches = {}
        self.object_patches = {}

    def get_model_object(self, name):
        return self.object_patches.get(name, getattr(self.model, name))

    def model_dtype(self):
        return None  # newest Neo: KModel has no get_dtype


class Timestep(nn.Module):
    """SDXL's size embedder: sinusoidal features of a scalar."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Engine:
    """`shared.sd_model` in Forge Neo: a ForgeDiffusionEngine (no `.model`; first/cond stage models are None)."""

    def __init__(self, kind, unet_patcher, config):
        self.kind = kind
        objects = types.SimpleNamespace(unet=unet_patcher, clip=types.SimpleNamespace(cond_stage_model=nn.ModuleDict()),
                                        vae=types.SimpleNamespace(), clipvision=None)
        self.forge_objects = objects
        self.forge_objects_original = types.SimpleNamespace(**vars(objects))
        self.model_config = config
        self.first_stage_model = self.cond_stage_model = None
        self.is_sd1, self.is_sd2, self.is_sdxl = kind == "sd15", False, kind == "sdxl"
        self.sd_checkpoint_info = types.SimpleNamespace(filename=f"random-neo-{kind}.safetensors",
                                                        title=f"random-neo-{kind}")
        self.embedder = Timestep(SDXL_EMBED) if kind == "sdxl" else None
        self.prompts = []
        channels = LATENT_CHANNELS[kind]
        self._to_latent = torch.linspace(-1.0, 1.0, channels * 3).reshape(channels, 3)

    @torch.inference_mode()
    def get_learned_conditioning(self, prompts):
        self.prompts += list(prompts)
        rows = [self._text(p) for p in prompts]
        context = torch.cat([c for c, _ in rows])
        pooled = torch.cat([p for _, p in rows])
        if self.kind == "sd15":
            return context
        if self.kind == "sdxl":
            sizes = torch.cat([self.embedder(torch.tensor([v])) for v in (1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0)])
            sizes = sizes.flatten()[None].repeat(len(prompts), 1)
            return {"crossattn": context, "vector": torch.cat([pooled, sizes], dim=1)}
        return {"crossattn": context, "vector": pooled, "guidance": torch.full((len(prompts),), 3.5)}

    def _text(self, prompt):
        generator = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
        tokens, width = (77, 2 * TE_WIDTH) if self.kind == "sdxl" else (77, TE_WIDTH)
        if self.kind.startswith("flux"):
            tokens = 8
        return torch.randn(1, tokens, width, generator=generator), torch.randn(1, TE_WIDTH, generator=generator)

    @torch.inference_mode()
    def encode_first_stage(self, x):
        rgb = nn.functional.avg_pool2d(x.float(), 8)
        return torch.einsum("bchw,lc->blhw", rgb, self._to_latent).to(x)

    @torch.inference_mode()
    def decode_first_stage(self, z):
        rgb = torch.einsum("blhw,lc->bchw", z.float(), torch.linalg.pinv(self._to_latent).T)
        return nn.functional.interpolate(rgb, scale_factor=8).clamp(-1, 1).to(z)


def _tiny_unet(sdxl):
    from comfy_stub import stub_models
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = dict(stub_models.TINY_UNET)
    if sdxl:
        config.update(context_dim=2 * TE_WIDTH, num_classes="continuous", use_linear_in_transformer=True)
    unet = UNetModel(**config)
    if sdxl:
        width = 4 * config["model_channels"]
        unet.label_emb = nn.Sequential(nn.Sequential(nn.Linear(TE_WIDTH + 6 * SDXL_EMBED, width), nn.SiLU(),
                                                     nn.Linear(width, width)))
    for param in unet.parameters():  # ldm zero-initialises output layers; a "trained" model has none
        if not param.any():
            param.normal_(0.0, 0.05)
    return unet


def _tiny_flux(schnell):
    from comfy.ldm.flux.model import Flux as FluxModel

    return FluxModel(in_channels=16, hidden_size=32, num_heads=4, context_in_dim=TE_WIDTH, vec_in_dim=TE_WIDTH,
                     depth=2, depth_single_blocks=2, guidance_embed=not schnell)


def build(kind="sd15", storage=torch.float32, manual_cast=False, seed=0, config=None, predictor=None):
    """A Neo engine for kind ∈ sd15, sdxl, flux, flux-schnell: its UNet/Flux made of Neo's layers, weights stored in
    `storage` (computed in float32), built under inference mode."""
    configs = {"sd15": SD15, "sdxl": SDXL, "flux": Flux, "flux-schnell": FluxSchnell}
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        net = _tiny_flux(kind == "flux-schnell") if kind.startswith("flux") else _tiny_unet(kind == "sdxl")
        net = neo_layers(net.eval(), storage, manual_cast or storage != torch.float32)
        if predictor is None:
            predictor = PredictionFlux(mu=1.0 if kind == "flux-schnell" else 1.15) if kind.startswith("flux") \
                else Prediction()
        kmodel = KModel(net, predictor, config or configs[kind](), storage, torch.float32)
    return Engine(kind, UnetPatcher(kmodel), kmodel.config)


class FakeMemory(types.ModuleType):
    """Forge Neo's backend.memory_management, as far as LoRA Loop calls it."""

    def __init__(self):
        super().__init__("backend.memory_management")
        self.calls = []

    def unload_all_models(self):
        self.calls.append("unload_all_models")

    def load_models_gpu(self, models, memory_required=0, hard_memory_preservation=0):
        self.calls.append(("load_models_gpu", len(models)))

    def soft_empty_cache(self, force=False):
        self.calls.append("soft_empty_cache")
