"""Stand-in for comfy/model_base.py (ComfyUI 0.12.3): BaseModel.apply_model returns the x0 prediction."""

import math
from enum import Enum

import torch

from . import conds
from . import model_sampling as ms


class ModelType(Enum):
    EPS = 1
    V_PREDICTION = 2
    FLOW = 6
    FLUX = 8


def model_sampling(model_config, model_type):
    c = {ModelType.EPS: ms.EPS, ModelType.V_PREDICTION: ms.V_PREDICTION, ModelType.FLOW: ms.CONST,
         ModelType.FLUX: ms.CONST}[model_type]
    s = {ModelType.FLOW: ms.ModelSamplingDiscreteFlow, ModelType.FLUX: ms.ModelSamplingFlux}.get(
        model_type, ms.ModelSamplingDiscrete)

    class ModelSampling(s, c):
        pass

    return ModelSampling(model_config)


def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class BaseModel(torch.nn.Module):
    def __init__(self, model_config, model_type=ModelType.EPS, diffusion_model=None):
        super().__init__()
        self.model_config = model_config
        self.latent_format = model_config.latent_format
        self.manual_cast_dtype = model_config.manual_cast_dtype
        self.diffusion_model = diffusion_model
        self.model_type = model_type
        self.model_sampling = model_sampling(model_config, model_type)
        self.concat_keys = ()

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        sigma = t
        xc = self.model_sampling.calculate_input(sigma, x)
        dtype = self.manual_cast_dtype or self.get_dtype()
        xc = xc.to(dtype)
        timestep = self.model_sampling.timestep(t).float()
        context = None if c_crossattn is None else c_crossattn.to(xc.device, dtype)
        extra = {k: v.to(xc.device, dtype) for k, v in kwargs.items() if hasattr(v, "dtype")}
        self.last_transformer_options = transformer_options  # what a caller asked of attention (for assertions)
        out = self.diffusion_model(xc, timestep, context=context, **extra)
        return self.model_sampling.calculate_denoised(sigma, out.float(), x)

    def get_dtype(self):
        return next(self.diffusion_model.parameters()).dtype

    def encode_adm(self, **kwargs):
        return None

    def extra_conds(self, **kwargs):
        out = {}
        adm = self.encode_adm(**kwargs)
        if adm is not None:
            out["y"] = conds.CONDRegular(adm)
        cross_attn = kwargs.get("cross_attn")
        if cross_attn is not None:
            out["c_crossattn"] = conds.CONDCrossAttn(cross_attn)
        return out

    def process_latent_in(self, latent):
        return self.latent_format.process_in(latent)

    def process_latent_out(self, latent):
        return self.latent_format.process_out(latent)


class SDXL(BaseModel):
    embed_dim = 256  # ComfyUI's Timestep(256); the tiny test model passes a smaller one

    def encode_adm(self, **kwargs):
        pooled = kwargs["pooled_output"]
        width, height = kwargs.get("width", 768), kwargs.get("height", 768)
        values = [height, width, kwargs.get("crop_h", 0), kwargs.get("crop_w", 0),
                  kwargs.get("target_height", height), kwargs.get("target_width", width)]
        flat = torch.cat([timestep_embedding(torch.Tensor([v]), self.embed_dim) for v in values]).flatten()
        return torch.cat((pooled, flat.unsqueeze(0).repeat(pooled.shape[0], 1).to(pooled.device)), dim=1)


class Flux(BaseModel):
    """0.12.3/0.33 `model_base.Flux`: pooled CLIP-L as `y`, `guidance` (3.5 when the conditioning has none)."""

    def __init__(self, model_config, model_type=ModelType.FLUX, diffusion_model=None):
        super().__init__(model_config, model_type, diffusion_model=diffusion_model)

    def encode_adm(self, **kwargs):
        return kwargs.get("pooled_output")

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        cross_attn = kwargs.get("cross_attn")
        if cross_attn is not None:
            out["c_crossattn"] = conds.CONDRegular(cross_attn)
        guidance = kwargs.get("guidance", 3.5)
        if guidance is not None:
            out["guidance"] = conds.CONDRegular(torch.FloatTensor([guidance]))
        return out
