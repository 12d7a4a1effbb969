"""Stand-in for comfy/sd.py (ComfyUI 0.12.3): CLIP, VAE and load_lora_for_models, over tiny modules."""

import logging

import torch

from . import model_management
from .model_patcher import ModelPatcher

log = logging.getLogger(__name__)
CHUNK = 77


class _ClipSlot(torch.nn.Module):
    """sd1_clip.SDClipModel's shape: the text model is its `transformer` (module names `clip_l.transformer.…`)."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer


class ClipModels(torch.nn.Module):
    """SD1ClipModel / SDXLClipModel's shape: one `clip_<name>` attribute per encoder (clip_l for SD1, clip_h for SD2,
    clip_l + clip_g for SDXL), tokens keyed by <name>."""

    def __init__(self, encoders):
        super().__init__()
        self.names = list(encoders)
        for name, transformer in encoders.items():
            setattr(self, f"clip_{name}", _ClipSlot(transformer))

    def __iter__(self):
        return iter(self.names)

    def items(self):
        return [(name, getattr(self, f"clip_{name}").transformer) for name in self.names]

    def reset_clip_options(self):
        self.options = {}

    def set_clip_options(self, options):
        self.options = {**getattr(self, "options", {}), **options}

    def encode_token_weights(self, tokens):
        """(cond, pooled): penultimate hidden states of every encoder side by side, the last encoder's pooled output."""
        states, pooled = [], None
        for key, encoder in self.items():
            ids = torch.tensor([[t for t, _ in chunk] for chunk in tokens[key]])
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2].reshape(1, -1, out.hidden_states[-2].shape[-1]))
            pooled = getattr(out, "text_embeds", None)
            if pooled is None:
                pooled = out.pooler_output
            pooled = pooled[:1]
        return torch.cat(states, dim=-1), pooled


class CLIP:
    """`encoders`: {"l": CLIPTextModel} (SD1), {"h": …} (SD2) or {"l": …, "g": CLIPTextModelWithProjection} (SDXL)."""

    def __init__(self, encoders, tokenizer, no_init=False, attention_mask=False):
        if no_init:
            return
        self.cond_stage_model = ClipModels(encoders)
        self.tokenizer = tokenizer
        self.patcher = ModelPatcher(self.cond_stage_model, torch.device("cpu"), torch.device("cpu"))
        self.layer_idx = None
        self.attention_mask = attention_mask  # DiT text encoders (Lumina 2's Gemma …) also return their mask

    def clone(self):
        n = CLIP(None, None, no_init=True)
        n.cond_stage_model, n.tokenizer, n.layer_idx = self.cond_stage_model, self.tokenizer, self.layer_idx
        n.attention_mask = self.attention_mask
        n.patcher = self.patcher.clone()
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)

    def tokenize(self, text, return_word_ids=False, **kwargs):
        ids = self.tokenizer(text, truncation=False).input_ids[1:-1]
        chunks = [ids[i : i + CHUNK - 2] for i in range(0, max(len(ids), 1), CHUNK - 2)] or [[]]
        out = []
        for chunk in chunks:
            row = [self.tokenizer.bos_token_id, *chunk, self.tokenizer.eos_token_id]
            row += [self.tokenizer.pad_token_id] * (CHUNK - len(row))
            out.append([(t, 1.0) for t in row])
        return {key: out for key in self.cond_stage_model}

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        self.cond_stage_model.reset_clip_options()
        model_management.load_model_gpu(self.patcher)  # as upstream: every call goes through model management
        self.cond_stage_model.set_clip_options({"execution_device": self.patcher.load_device})
        cond, pooled = self.cond_stage_model.encode_token_weights(tokens)
        if return_dict:
            out = {"cond": cond, "pooled_output": pooled}
            if self.attention_mask:
                first = tokens[next(iter(tokens))]
                # BOS, the words and EOS are real tokens; the rest pads (CLIP pads with EOS itself).
                ends = [1 + [t for t, _ in chunk[1:]].index(self.tokenizer.pad_token_id) for chunk in first]
                out["attention_mask"] = torch.tensor([[int(i <= end) for i in range(len(chunk))]
                                                      for chunk, end in zip(first, ends, strict=True)]).reshape(1, -1)
            return out
        return (cond, pooled) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict={}, show_pbar=True):  # noqa: B006
        d = self.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        cond = d.pop("cond")
        d.update(add_dict)
        return [[cond, d]]


class PoolingEncoder(torch.nn.Module):
    """The stand-in's `first_stage_model`: [B,3,H,W] in [-1,1] → raw latents [B,C,H/8,W/8] (C = 4, or 16 for the
    Flux-family VAE: the 4 pooled channels repeated with fixed per-channel gains)."""

    def __init__(self, channels=4):
        super().__init__()
        self.calls = 0
        self.channels = channels

    def encode(self, x):
        self.calls += 1
        pooled = torch.nn.functional.avg_pool2d(x, 8)
        four = torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1) * 4.0
        if self.channels == 4:
            return four
        gains = torch.linspace(1.0, 0.25, self.channels, device=x.device).view(1, -1, 1, 1)
        return four.repeat(1, self.channels // 4, 1, 1) * gains


class VAE:
    """A fixed 8x pooling 'VAE': [B,H,W,3] in [0,1] → raw latents [B,4,H/8,W/8] and back. `encode` as 0.12.3's:
    load through model management, `process_input` (x·2-1), `first_stage_model.encode` in `vae_dtype` on `device`."""

    def __init__(self, channels=4):
        self.first_stage_model = PoolingEncoder(channels)
        self.patcher = ModelPatcher(self.first_stage_model, torch.device("cpu"), torch.device("cpu"))
        self.device = self.output_device = torch.device("cpu")
        self.vae_dtype = torch.float32
        self.encode_calls = 0
        self.decode_calls = 0

    def process_input(self, image):
        return image * 2.0 - 1.0

    def encode(self, pixel_samples):
        model_management.load_models_gpu([self.patcher])
        self.encode_calls += 1
        x = self.process_input(pixel_samples.movedim(-1, 1)).to(self.vae_dtype).to(self.device)
        return self.first_stage_model.encode(x).to(self.output_device).float()

    def decode(self, samples_in, vae_options={}):  # noqa: B006
        model_management.load_models_gpu([self.patcher])
        self.decode_calls += 1
        rgb = torch.nn.functional.interpolate(samples_in[:, :3] / 4.0, scale_factor=8)
        return ((rgb + 1) / 2).clamp(0, 1).movedim(1, -1)


def load_lora_for_models(model, clip, lora, strength_model, strength_clip):
    """Clones with the LoRA recorded as patches per kohya module stem; unknown prefixes are 'lora key not loaded'."""
    stems = {}
    for key, value in lora.items():
        stem, _, part = key.partition(".")
        stems.setdefault(stem, {})[part] = value
    unet = {s: v for s, v in stems.items() if s.startswith("lora_unet_")}
    known = _generic_unet_keys(model)
    if known is not None:  # comfy/lora.py's generic map, the one every DiT's LoRA goes through
        for stem in [s for s in unet if s not in known]:
            log.warning("lora key not loaded: %s", stem)
            del unet[stem]
    te = {s: v for s, v in stems.items() if s.startswith("lora_te")}
    for stem in set(stems) - set(unet) - set(te):
        log.warning("lora key not loaded: %s", stem)
    new_model = None if model is None else model.clone()
    if new_model is not None and unet:
        new_model.add_patches(unet, strength_model)
    new_clip = None if clip is None else clip.clone()
    if new_clip is not None and te:
        new_clip.add_patches(te, strength_clip)
    return new_model, new_clip


def _generic_unet_keys(model):
    """`lora_unet_<path with _>` for every diffusion_model weight of a flow model (comfy/lora.py
    model_lora_keys_unet); None for the SD UNets, whose kohya names go through a diffusers↔ldm map we do not mirror."""
    base = getattr(model, "model", None)
    if base is None or base.model_type.name not in ("FLOW", "FLUX"):
        return None
    return {"lora_unet_" + k[: -len(".weight")].replace(".", "_")
            for k in base.diffusion_model.state_dict() if k.endswith(".weight")}
