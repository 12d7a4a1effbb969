"""What differs between the model families we train: one literal registry, looked up by name.

SD1/SD2/SDXL are DDPM models (ε or v prediction on a discrete ᾱ schedule). The 2026 DiT families (Flux.1, Chroma,
SD3.5, Z-Image, Lumina 2, Qwen-Image) are rectified-flow models: x_σ = (1−σ)·x0 + σ·ε, trained on the velocity ε − x0
(docs/families.md §1.2). Their facts — shift, guidance, where the LoRA targets sit, the kohya/ModelSpec names — are rows
here; how a host runs the model stays in the host's bundle.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedModelError

FLOW = "flow"  # the prediction type of rectified-flow families: the network predicts the velocity ε − x0


@dataclass(frozen=True)
class Family:
    """Facts about one model family.

    Args:
        name: our id, used in configs and on the CLI (`sd1`, `sdxl`, `flux1`, `sd3`, …).
        prediction_type: `epsilon`, `v_prediction` or `flow`.
        resolution: the native training resolution (pixels per side).
        latent_scale: VAE latent scaling factor (DDPM families; flow families' hosts scale their own latents).
        te_prefixes: kohya key prefix of each text encoder, in order.
        ss_base_model_version: kohya's `ss_base_model_version` value.
        modelspec_architecture: SAI ModelSpec architecture string for a LoRA of this family.
        modelspec_implementation: SAI ModelSpec implementation string.
        unet_names: `diffusers` when kohya writes diffusers-style UNet paths (SD1/SD2), `ldm` for SGM paths (SDXL),
            `native` for DiTs (kohya/ComfyUI `lora_unet_<module path with _>` of the original implementation).
        latent_channels: channels of the model's latent.
        pooled_text: the model also takes a pooled text embedding (SDXL, Flux.1's CLIP-L, SD3's CLIP-L‖G).
        flow_shift: flow families: the time-shift α the family samples with (σ' = α·σ/(1+(α−1)·σ)); a host that
            carries its own (ComfyUI's model_sampling, a ModelSamplingFlux node) uses that instead.
        guidance: flow families with a distilled-guidance input: the value fed while training (None: no such input).
        blocks: DiTs: regex matching the transformer-block module paths whose Linears are the default LoRA targets.
        exclude: DiTs: regex of Linears inside those blocks left out by default (modulation layers, refiners).
        attention: DiTs: regex of the attention projections (the `attention` target preset).
        last_block_unused: DiTs: regex (after the last block's prefix) of Linears whose output the model discards in
            its last block (Qwen-Image's text stream): they would only train to zero.
        sample_cfg: the classifier-free guidance scale sample images use whatever `sample_cfg` says (guidance-
            distilled models sample at 1: no unconditional pass); None: the config's.
        sample_guidance: the distilled-guidance value sample images feed (Flux.1 dev: 3.5, ComfyUI's FluxGuidance
            default), where it differs from the training value `guidance`.
    """

    name: str
    prediction_type: str
    resolution: int
    latent_scale: float
    te_prefixes: tuple[str, ...]
    ss_base_model_version: str
    modelspec_architecture: str
    modelspec_implementation: str
    unet_names: str
    latent_channels: int = 4
    pooled_text: bool = False
    flow_shift: float | None = None
    guidance: float | None = None
    blocks: str | None = None
    exclude: str | None = None
    attention: str | None = None
    sample_cfg: float | None = None
    sample_guidance: float | None = None
    last_block_unused: str | None = None

    @property
    def is_sdxl(self) -> bool:
        return self.name == "sdxl"

    @property
    def is_v2(self) -> bool:
        return self.name.startswith("sd2")

    @property
    def is_flow(self) -> bool:
        return self.prediction_type == FLOW


_DIFFUSERS = "diffusers"
_SGM = "https://github.com/Stability-AI/generative-models"
_BFL = "https://github.com/black-forest-labs/flux"
_COMFY = "https://github.com/comfyanonymous/ComfyUI"
_E_115 = 3.1581929096897676  # e^1.15: ModelSamplingFlux's μ = 1.15 as a time_snr_shift α (kohya's recommended value)

# Where the LoRA targets of each DiT sit (ComfyUI/original module names; docs/families.md §2, which cites what kohya,
# musubi-tuner and diffusers default to). Flux/Chroma: every Linear of the double and single blocks (kohya; Chroma's
# blocks have no modulation Linears, and its `distilled_guidance_layer` — which modulates all 57 blocks — stays out).
_FLUX_BLOCKS = r"(double_blocks|single_blocks)\.\d+\."
_FLUX_ATTENTION = r"(img_attn|txt_attn)\.(qkv|proj)$|single_blocks\.\d+\.linear[12]$"
# Lumina 2 / Z-Image: the main layers; musubi and ai-toolkit leave the refiners and adaLN modulation out.
_NEXTDIT_BLOCKS = r"layers\.\d+\."
_NEXTDIT_EXCLUDE = r"adaLN_modulation"
_NEXTDIT_ATTENTION = r"attention\.(qkv|out)$"

FAMILIES: dict[str, Family] = {
    "sd1": Family("sd1", "epsilon", 512, 0.18215, ("lora_te",), "sd_v1",
                  "stable-diffusion-v1/lora", _DIFFUSERS, "diffusers"),
    "sd2": Family("sd2", "epsilon", 512, 0.18215, ("lora_te",), "sd_v2",
                  "stable-diffusion-v2-512/lora", _DIFFUSERS, "diffusers"),
    "sd2-v": Family("sd2-v", "v_prediction", 768, 0.18215, ("lora_te",), "sd_v2_v",
                    "stable-diffusion-v2-768-v/lora", _DIFFUSERS, "diffusers"),
    "sdxl": Family("sdxl", "epsilon", 1024, 0.13025, ("lora_te1", "lora_te2"), "sdxl_base_v1-0",
                   "stable-diffusion-xl-v1-base/lora", _SGM, "ldm", pooled_text=True),
    # Flux.1 dev/Kontext: guidance-distilled; kohya, musubi and ai-toolkit train at guidance 1.0 (docs/families.md §4.1)
    "flux1": Family("flux1", FLOW, 1024, 1.0, ("lora_te1",), "flux1", "flux-1-dev/lora", _BFL, "native",
                    latent_channels=16, pooled_text=True, flow_shift=_E_115, guidance=1.0, blocks=_FLUX_BLOCKS,
                    attention=_FLUX_ATTENTION, sample_cfg=1.0, sample_guidance=3.5),
    "flux1-schnell": Family("flux1-schnell", FLOW, 1024, 1.0, ("lora_te1",), "flux1", "flux-1-schnell/lora", _BFL,
                            "native", latent_channels=16, pooled_text=True, flow_shift=1.0, blocks=_FLUX_BLOCKS,
                            attention=_FLUX_ATTENTION, sample_cfg=1.0),
    # Chroma: guidance 0 is what its Approximator was trained on (kohya, ai-toolkit; ComfyUI's default).
    "chroma": Family("chroma", FLOW, 1024, 1.0, (), "chroma", "chroma/lora", "https://huggingface.co/lodestones/Chroma",
                     "native", latent_channels=16, flow_shift=_E_115, guidance=0.0, blocks=_FLUX_BLOCKS,
                     attention=_FLUX_ATTENTION),
    # SD3/3.5: every Linear of the joint blocks (kohya lora_sd3), adaLN included.
    "sd3": Family("sd3", FLOW, 1024, 1.0, ("lora_te1", "lora_te2", "lora_te3"), "sd3", "stable-diffusion-3/lora",
                  _SGM, "native", latent_channels=16, pooled_text=True, flow_shift=3.0, blocks=r"joint_blocks\.\d+\.",
                  attention=r"attn2?\.(qkv|proj)$"),
    "zimage": Family("zimage", FLOW, 1024, 1.0, (), "z_image", "z-image/lora", _COMFY, "native",
                     latent_channels=16, flow_shift=3.0, blocks=_NEXTDIT_BLOCKS, exclude=_NEXTDIT_EXCLUDE,
                     attention=_NEXTDIT_ATTENTION),
    "lumina2": Family("lumina2", FLOW, 1024, 1.0, (), "lumina2", "lumina-2/lora",
                      "https://github.com/Alpha-VLLM/Lumina-Image-2.0", "native", latent_channels=16, flow_shift=6.0,
                      blocks=_NEXTDIT_BLOCKS, exclude=_NEXTDIT_EXCLUDE, attention=_NEXTDIT_ATTENTION),
    # Qwen-Image: block Linears except the modulation ones (musubi-tuner lora_qwen_image).
    "qwen-image": Family("qwen-image", FLOW, 1024, 1.0, (), "qwen_image", "qwen-image/lora", _COMFY, "native",
                         latent_channels=16, flow_shift=_E_115, blocks=r"transformer_blocks\.\d+\.",
                         exclude=r"_mod\.", attention=r"attn\.(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out)$",
                         last_block_unused=r"(txt_mlp\.|attn\.to_add_out$)"),
}

ALIASES = {"sd15": "sd1", "sd1.5": "sd1", "sd_v1": "sd1", "sd21": "sd2", "sd2.1": "sd2", "sd2v": "sd2-v",
           "sd21-v": "sd2-v", "flux": "flux1", "flux-dev": "flux1", "flux1-dev": "flux1",
           "flux-schnell": "flux1-schnell",
           "sd35": "sd3", "sd3.5": "sd3", "z-image": "zimage", "lumina": "lumina2", "lumina-2": "lumina2",
           "qwen": "qwen-image", "qwen_image": "qwen-image", "qwenimage": "qwen-image"}


def get_family(name: str) -> Family:
    """Return the family called `name` (or one of its aliases); raise naming the supported ones."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in FAMILIES:
        msg = f"unknown model family {name!r}; supported: {', '.join(FAMILIES)}"
        raise UnsupportedModelError(msg)
    return FAMILIES[key]
