"""Tiny REAL ComfyUI diffusion models of every flow family LoRA Loop trains (tests/test_comfy_real_families.py).

Each case is the family's own model-config class from `comfy/supported_models.py` with a hand-written `unet_config`
of the shape `comfy/model_detection.py` derives from a real checkpoint, only small: hidden 64 (Z-Image 256, the
least its 256-wide timestep modulation allows), 1-2 blocks, head dims matching the rope axes. The weights are random
(ComfyUI's ops skip init, so every parameter and buffer is written here): `1/sqrt(fan_in)` for matrices, so that the
signal keeps its scale through the layers and the output depends on the input, ones for norm scales, small normals for
biases and vectors.

Everything here imports `comfy` lazily: call `import_comfy` first, which puts the REAL checkout first on sys.path
(CPU mode) and refuses a stand-in `comfy` already imported in this process (tests/comfy_stub).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

# Shared by Flux.1 dev/schnell and Chroma: 2 heads of 32 = rope axes 8 + 12 + 12.
_FLUX = {"in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 64,
         "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 12, 12],
         "theta": 10000, "patch_size": 2, "qkv_bias": True, "txt_ids_dims": []}


@dataclass(frozen=True)
class FamilyCase:
    """One family as ComfyUI holds it.

    Args:
        config: the model-config class name in comfy/supported_models.py.
        family: LoRA Loop's family name for it (loraloop.nodes.bundle.SUPPORTED_CONFIGS).
        unet_config: passed to the config class, as model_detection would produce it.
        context_dim: width of the text context the model embeds (txt_in / context_embedder / cap_embedder).
        pooled_dim: width of the pooled text vector (`y`), None for families without one.
        latent: (h, w) of the [1, 16, h, w] latent the engine trains on.
    """

    config: str
    family: str
    unet_config: dict = field(hash=False)
    context_dim: int = 32
    pooled_dim: int | None = None
    latent: tuple[int, int] = (8, 8)


CASES = [
    FamilyCase("Flux", "flux1", {"image_model": "flux", "guidance_embed": True, **_FLUX}, pooled_dim=32),
    FamilyCase("FluxSchnell", "flux1-schnell", {"image_model": "flux", "guidance_embed": False, **_FLUX},
               pooled_dim=32),
    # Chroma takes the patchified latent (in/out 64) and modulates every block from its Approximator
    # (`distilled_guidance_layer`: in_dim 16+16+32, out_dim = hidden); no pooled vector.
    FamilyCase("Chroma", "chroma", {"image_model": "chroma", **{k: v for k, v in _FLUX.items() if k != "vec_in_dim"},
                                    "in_channels": 64, "out_channels": 64, "vec_in_dim": None, "in_dim": 64,
                                    "out_dim": 64, "hidden_dim": 64, "n_layers": 1}),
    # MMDiT: hidden = 64 x depth, one head of 64 per block; SD3.5-style rms qk-norm and one attn2 block, a pos_embed
    # table of 8 x 8 patches, pooled CLIP-L||G (here 32 wide) through y_embedder.
    FamilyCase("SD3", "sd3", {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
                              "adm_in_channels": 32, "pos_embed_scaling_factor": None, "pos_embed_max_size": 8,
                              "num_patches": 64, "qk_norm": "rms", "x_block_self_attn_layers": [0],
                              "context_embedder_config": {"target": "torch.nn.Linear",
                                                          "params": {"in_features": 32, "out_features": 128}}},
               pooled_dim=32),
    # NextDiT with Z-Image's modulation (timestep embedding 256 wide, so dim >= 256) and caption/image pad tokens.
    FamilyCase("ZImage", "zimage", {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256,
                                    "cap_feat_dim": 32, "n_layers": 1, "n_refiner_layers": 1, "qk_norm": True,
                                    "n_heads": 8, "n_kv_heads": 8, "axes_dims": [8, 12, 12],
                                    "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8 / 3,
                                    "multiple_of": 32, "z_image_modulation": True, "time_scale": 1000.0,
                                    "pad_tokens_multiple": 32}),
    FamilyCase("Lumina2", "lumina2", {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64,
                                      "cap_feat_dim": 32, "n_layers": 2, "n_refiner_layers": 1, "qk_norm": True,
                                      "n_heads": 2, "n_kv_heads": 1, "axes_dims": [8, 12, 12],
                                      "axes_lens": [300, 512, 512], "rope_theta": 10000.0, "ffn_dim_multiplier": 4.0,
                                      "multiple_of": 32}),
    # Qwen-Image: the latent is a Wan 2.1 video latent [B,16,T,H,W] (the bundle adds T=1); img_in takes 2x2 patches.
    FamilyCase("QwenImage", "qwen-image", {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64,
                                           "out_channels": 16, "num_layers": 2, "attention_head_dim": 32,
                                           "num_attention_heads": 2, "joint_attention_dim": 32,
                                           "axes_dims_rope": (8, 12, 12)}),
]


class OtherComfyLoaded(RuntimeError):
    """Another `comfy` package (the test stand-in) is already imported in this process."""


def _origins(module: ModuleType) -> list[Path]:
    paths = list(getattr(module, "__path__", None) or [])  # the checkout's `comfy` is a namespace package
    if getattr(module, "__file__", None):
        paths.append(Path(module.__file__).parent)
    return sorted({Path(p).resolve() for p in paths})


def import_comfy(comfy_dir: Path) -> ModuleType:
    """Import the real `comfy` of `comfy_dir` on CPU; returns the `comfy` package with the modules the tests use."""
    comfy_dir = comfy_dir.resolve()
    loaded = sys.modules.get("comfy")
    if loaded is not None and not any(p.parent == comfy_dir for p in _origins(loaded)):
        raise OtherComfyLoaded(f"another `comfy` ({[str(p) for p in _origins(loaded)]}) is already imported")
    if str(comfy_dir) not in sys.path:
        sys.path.insert(0, str(comfy_dir))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before model_management decides the device
    import comfy.lora
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    return comfy


def init_weights(root: nn.Module, seed: int) -> None:
    """Random weights for every floating parameter and buffer of `root` (ComfyUI's ops leave them uninitialised)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in root.modules():
            norm = "norm" in type(module).__name__.lower()
            for table in (module._parameters, module._buffers):
                for name, tensor in table.items():
                    if tensor is None or not tensor.is_floating_point():
                        continue
                    if norm and tensor.dim() == 1 and name in ("weight", "scale"):
                        value = torch.ones(tensor.shape)
                    elif tensor.dim() >= 2:
                        fan_in = tensor[0].numel() if tensor.shape[0] > 1 else tensor.shape[-1]
                        value = torch.randn(tensor.shape, generator=gen) / math.sqrt(fan_in)
                    else:
                        value = torch.randn(tensor.shape, generator=gen) * 0.02
                    tensor.copy_(value.to(tensor.dtype))
    bad = [n for n, t in [*root.named_parameters(), *root.named_buffers()]
           if t.is_floating_point() and not torch.isfinite(t.float()).all()]
    if bad:
        raise AssertionError(f"weights left non-finite after init: {bad}")


def build(case: FamilyCase, seed: int = 0, weight_dtype: torch.dtype = torch.float32) -> object:
    """The family's real ComfyUI model (CPU) with random weights, in a ModelPatcher, as a MODEL output is.

    Built under inference mode, like every MODEL a ComfyUI prompt loads: the weights are inference tensors. A narrower
    `weight_dtype` (fp8) is stored as such and computed in float32 by ComfyUI's manual-cast ops, as UNETLoader's
    `weight_dtype: fp8_e4m3fn` loads a model."""
    import comfy.model_patcher
    import comfy.supported_models

    config_class = getattr(comfy.supported_models, case.config, None)
    if config_class is None:
        raise LookupError(case.config)
    cpu = torch.device("cpu")
    with torch.inference_mode():
        config = config_class(dict(case.unet_config))
        config.set_inference_dtype(weight_dtype, None if weight_dtype == torch.float32 else torch.float32)
        model = config.get_model({})
        init_weights(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
