"""Flux.1 (dev, schnell, Kontext as text-to-image) on diffusers' `FluxTransformer2DModel`.

Conditioning as the Flux pipeline builds it: T5-XXL's last hidden states, padded to the sequence length (512 for
dev, 256 for schnell; no mask: Flux was trained on padded T5), and CLIP-L's pooled output as `pooled_projections`.
Latents are packed 2×2 into tokens with (0, row, column) position ids; `timestep` is σ (the model scales by 1000) and
`guidance` the distilled-guidance value (1.0 while training, as kohya/ai-toolkit/musubi feed it).
"""

from __future__ import annotations

import torch

from ..bundle import Conditioning

T5_LENGTH = {"flux1": 512, "flux1-schnell": 256}


class FluxArchitecture:
    blocks = r"(transformer_blocks|single_transformer_blocks)\.\d+\."
    exclude = None  # every Linear of the blocks, modulation included (kohya's Flux default)
    attention = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$"

    def encode_text(self, bundle, captions: list[str]) -> Conditioning:  # noqa: ANN001 - FlowBundle
        clip, t5 = (slot.module for slot in bundle.text_encoders)
        pooled = clip(bundle.token_ids(0, captions), output_hidden_states=False).pooler_output
        length = min(T5_LENGTH.get(bundle.family.name, 512), bundle.tokenizers[1].model_max_length)
        context = t5(bundle.token_ids(1, captions, length))[0]
        return Conditioning(context.to(bundle.dtype), pooled.to(bundle.dtype))

    def velocity(self, bundle, noisy: torch.Tensor, sigmas: torch.Tensor,  # noqa: ANN001
                 cond: Conditioning) -> torch.Tensor:
        b, c, h, w = noisy.shape
        dtype, device = bundle.dtype, noisy.device
        tokens = noisy.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=device)
        img_ids[..., 1] += torch.arange(h // 2, device=device)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=device)[None, :]
        txt_ids = torch.zeros(cond.context.shape[1], 3, device=device)
        guidance = None
        if bundle.unet.config.guidance_embeds:
            guidance = torch.full((b,), float(bundle.guidance if bundle.guidance is not None else 1.0), device=device)
        out = bundle.unet(hidden_states=tokens.to(dtype), encoder_hidden_states=cond.context.to(dtype),
                          pooled_projections=cond.pooled.to(dtype), timestep=sigmas.to(dtype),  # type: ignore[union-attr]
                          img_ids=img_ids.reshape(-1, 3).to(dtype), txt_ids=txt_ids.to(dtype), guidance=guidance,
                          return_dict=False)[0]
        return out.float().view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
