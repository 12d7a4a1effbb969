"""What differs between the model families we train: one literal registry, looked up by name."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class Family:
    """Facts about one model family (SD1.x, SD2.x, SD2.x-v, SDXL).

    Args:
        name: our id, used in configs and on the CLI (`sd1`, `sd2`, `sd2-v`, `sdxl`).
        prediction_type: `epsilon` or `v_prediction`.
        resolution: the native training resolution (pixels per side).
        latent_scale: VAE latent scaling factor.
        te_prefixes: kohya key prefix of each text encoder, in order.
        ss_base_model_version: kohya's `ss_base_model_version` value.
        modelspec_architecture: SAI ModelSpec architecture string for a LoRA of this family.
        modelspec_implementation: SAI ModelSpec implementation string.
        unet_names: `diffusers` when kohya writes diffusers-style UNet paths (SD1/SD2), `ldm` for SGM paths (SDXL).
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

    @property
    def is_sdxl(self) -> bool:
        return self.name == "sdxl"

    @property
    def is_v2(self) -> bool:
        return self.name.startswith("sd2")


_DIFFUSERS = "diffusers"
_SGM = "https://github.com/Stability-AI/generative-models"

FAMILIES: dict[str, Family] = {
    "sd1": Family("sd1", "epsilon", 512, 0.18215, ("lora_te",), "sd_v1",
                  "stable-diffusion-v1/lora", _DIFFUSERS, "diffusers"),
    "sd2": Family("sd2", "epsilon", 512, 0.18215, ("lora_te",), "sd_v2",
                  "stable-diffusion-v2-512/lora", _DIFFUSERS, "diffusers"),
    "sd2-v": Family("sd2-v", "v_prediction", 768, 0.18215, ("lora_te",), "sd_v2_v",
                    "stable-diffusion-v2-768-v/lora", _DIFFUSERS, "diffusers"),
    "sdxl": Family("sdxl", "epsilon", 1024, 0.13025, ("lora_te1", "lora_te2"), "sdxl_base_v1-0",
                   "stable-diffusion-xl-v1-base/lora", _SGM, "ldm"),
}

ALIASES = {"sd15": "sd1", "sd1.5": "sd1", "sd_v1": "sd1", "sd21": "sd2", "sd2.1": "sd2", "sd2v": "sd2-v",
           "sd21-v": "sd2-v"}


def get_family(name: str) -> Family:
    """Return the family called `name` (or one of its aliases); raise naming the supported ones."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in FAMILIES:
        msg = f"unknown model family {name!r}; supported: {', '.join(FAMILIES)}"
        raise UnsupportedModelError(msg)
    return FAMILIES[key]
