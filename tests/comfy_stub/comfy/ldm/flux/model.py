"""A tiny stand-in for comfy/ldm/flux/model.py: Flux.1's module names and call signature, simplified maths.

What LoRA Loop depends on is kept: the module tree (`double_blocks.N.{img,txt}_{mod.lin,attn.qkv,attn.proj,mlp.0,mlp.2}`,
`single_blocks.N.{linear1,linear2,modulation.lin}`, `img_in`, `txt_in`, `time_in`, `vector_in`, `guidance_in`,
`final_layer`), 2x2 patchified latents, joint text+image attention, `forward(x, timestep, context, y, guidance, …)`
returning the velocity-shaped output [B,C,H,W]. Not the real Flux: no RoPE, a plain MLP time embedding.
"""

import math

import torch
from torch import nn


def timestep_embedding(t, dim, time_factor=1000.0):
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim, hidden):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.out_layer(nn.functional.silu(self.in_layer(x)))


class Modulation(nn.Module):
    def __init__(self, dim, n):
        super().__init__()
        self.n = n
        self.lin = nn.Linear(dim, n * dim)

    def forward(self, vec):
        return self.lin(nn.functional.silu(vec))[:, None, :].chunk(self.n, dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


def _attention(q, k, v, heads):
    b, _, d = q.shape
    split = [t.view(b, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v)]
    out = nn.functional.scaled_dot_product_attention(*split)
    return out.transpose(1, 2).reshape(b, -1, d)


class DoubleStreamBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        for side in ("img", "txt"):
            setattr(self, f"{side}_mod", Modulation(dim, 6))
            setattr(self, f"{side}_norm1", nn.LayerNorm(dim, elementwise_affine=False))
            setattr(self, f"{side}_attn", SelfAttention(dim))
            setattr(self, f"{side}_norm2", nn.LayerNorm(dim, elementwise_affine=False))
            setattr(self, f"{side}_mlp", nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)))

    def forward(self, img, txt, vec):
        (i_s1, i_b1, i_g1, i_s2, i_b2, i_g2) = self.img_mod(vec)
        (t_s1, t_b1, t_g1, t_s2, t_b2, t_g2) = self.txt_mod(vec)
        i_qkv = self.img_attn.qkv((1 + i_s1) * self.img_norm1(img) + i_b1)
        t_qkv = self.txt_attn.qkv((1 + t_s1) * self.txt_norm1(txt) + t_b1)
        q, k, v = (torch.cat([t, i], dim=1) for t, i in zip(t_qkv.chunk(3, -1), i_qkv.chunk(3, -1), strict=True))
        attn = _attention(q, k, v, self.heads)
        t_attn, i_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + i_g1 * self.img_attn.proj(i_attn)
        img = img + i_g2 * self.img_mlp((1 + i_s2) * self.img_norm2(img) + i_b2)
        txt = txt + t_g1 * self.txt_attn.proj(t_attn)
        txt = txt + t_g2 * self.txt_mlp((1 + t_s2) * self.txt_norm2(txt) + t_b2)
        return img, txt


class SingleStreamBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.modulation = Modulation(dim, 3)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.linear1 = nn.Linear(dim, 3 * dim + 2 * dim)
        self.linear2 = nn.Linear(dim + 2 * dim, dim)

    def forward(self, x, vec):
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1((1 + scale) * self.pre_norm(x) + shift).split([3 * self.dim, 2 * self.dim], dim=-1)
        attn = _attention(*qkv.chunk(3, -1), self.heads)
        return x + gate * self.linear2(torch.cat([attn, nn.functional.gelu(mlp)], dim=-1))


class LastLayer(nn.Module):
    def __init__(self, dim, out):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear((1 + scale) * self.norm_final(x) + shift)


class Flux(nn.Module):
    def __init__(self, in_channels=16, hidden_size=32, num_heads=4, context_in_dim=24, vec_in_dim=16, depth=1,
                 depth_single_blocks=1, guidance_embed=True, patch_size=2, **_ignored):
        super().__init__()
        self.patch_size, self.in_channels = patch_size, in_channels
        patch = in_channels * patch_size * patch_size
        self.img_in = nn.Linear(patch, hidden_size)
        self.time_in = MLPEmbedder(64, hidden_size)
        self.vector_in = MLPEmbedder(vec_in_dim, hidden_size)
        self.guidance_in = MLPEmbedder(64, hidden_size) if guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(context_in_dim, hidden_size)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(hidden_size, num_heads) for _ in range(depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(hidden_size, num_heads)
                                           for _ in range(depth_single_blocks))
        self.final_layer = LastLayer(hidden_size, patch)

    @property
    def dtype(self):
        return self.img_in.weight.dtype

    def forward(self, x, timestep, context, y=None, guidance=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        b, c, h, w = x.shape
        p = self.patch_size
        img = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timestep, 64).to(img.dtype))
        if isinstance(self.guidance_in, MLPEmbedder) and guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 64).to(img.dtype))
        if y is not None:
            vec = vec + self.vector_in(y.to(img.dtype))
        txt = self.txt_in(context)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec)
        x_all = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x_all = block(x_all, vec)
        out = self.final_layer(x_all[:, txt.shape[1]:], vec)
        return out.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
