"""Stable Diffusion 3 / 3.5 on diffusers' `SD3Transformer2DModel`.

Conditioning as the SD3 pipeline builds it: the penultimate hidden states of CLIP-L and CLIP-G side by side (768 +
1280), zero-padded to T5's width and followed by T5-XXL's 256 tokens (zeros when there is no T5, as SD3 allows);
`pooled_projections` is CLIP-L's and CLIP-G's projected pooled outputs side by side. `timestep` is σ·1000.
"""

from __future__ import annotations

import torch

from ..bundle import Conditioning

T5_LENGTH = 256


class SD3Architecture:
    blocks = r"transformer_blocks\.\d+\."
    exclude = None  # every Linear of the joint blocks, adaLN included (kohya's SD3 default)
    attention = r"attn2?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$"

    def encode_text(self, bundle, captions: list[str]) -> Conditioning:  # noqa: ANN001 - FlowBundle
        states, pooled = [], []
        for index in (0, 1):
            out = bundle.text_encoders[index].module(bundle.token_ids(index, captions), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip = torch.cat(states, dim=-1)
        width = int(bundle.unet.config.joint_attention_dim)
        clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
        if len(bundle.text_encoders) > 2:
            length = min(T5_LENGTH, bundle.tokenizers[2].model_max_length)
            t5 = bundle.text_encoders[2].module(bundle.token_ids(2, captions, length))[0]
        else:
            t5 = torch.zeros(len(captions), T5_LENGTH, width, device=clip.device, dtype=clip.dtype)
        context = torch.cat([clip, t5.to(clip.dtype)], dim=1)
        return Conditioning(context.to(bundle.dtype), torch.cat(pooled, dim=-1).to(bundle.dtype))

    def velocity(self, bundle, noisy: torch.Tensor, sigmas: torch.Tensor,  # noqa: ANN001
                 cond: Conditioning) -> torch.Tensor:
        dtype = bundle.dtype
        out = bundle.unet(hidden_states=noisy.to(dtype), encoder_hidden_states=cond.context.to(dtype),
                          pooled_projections=cond.pooled.to(dtype), timestep=(sigmas * 1000).to(dtype),  # type: ignore[union-attr]
                          return_dict=False)[0]
        return out.float()
