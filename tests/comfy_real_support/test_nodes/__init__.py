"""TEST-ONLY ComfyUI nodes (tests/test_comfy_real_flow.py links this package into a temporary custom_nodes folder; it
is never installed with LoRA Loop).

`LoRALoopTest_TinyCLIPLoader` is DualCLIPLoader/TripleCLIPLoader for tiny text-encoder files. ComfyUI's own loaders
detect each file's kind from its keys but build the encoder from a fixed JSON config (CLIP-L 768 wide, T5-XXL 4096
wide with 24 layers: 9.5 GB), so a small file cannot load through them (a shape mismatch). This node does what
`comfy.sd.load_text_encoder_state_dicts` does for `flux` (CLIP-L + T5) and `sd3` (CLIP-L + CLIP-G + T5) with the same
classes (`flux_clip`/`FluxTokenizer`, `sd3_clip`/`SD3Tokenizer`, `comfy.sd.CLIP` loading the state dicts through each
encoder's `load_sd`), and passes each file's size through ComfyUI's own per-encoder config override
(`model_options["<clip_l|clip_g|t5xxl>_model_config"]`, read by `comfy.sd1_clip.SDClipModel`). The sizes come from the
files' metadata (`loraloop_test_config`, written by tests/comfy_real_support/flow_checkpoints.py). The result is a
normal ComfyUI CLIP: CLIPTextEncode, LoraLoader and LoRA Loop's TrainLoRA use it as they use a stock one.

(The stock path cannot take the override: `load_text_encoder_state_dicts` replaces `clip_l_model_config`/
`clip_g_model_config` with one shared `model_config` dict when it reads the position-embedding size.)
"""

from __future__ import annotations

import json

NONE = "none"
TYPES = ("flux", "sd3")


def _text_encoder_names() -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list("text_encoders")


def load_tiny_clip(paths: list[str], clip_type: str, embedding_directory: object = None) -> object:
    import comfy.sd
    import comfy.text_encoders.flux
    import comfy.text_encoders.sd3_clip
    import comfy.utils
    from safetensors import safe_open

    clip_data, model_options, parameters = [], {}, 0
    for path in paths:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
        if "loraloop_test_config" not in meta:
            raise ValueError(f"{path} has no loraloop_test_config metadata: not a LoRA Loop test text encoder")
        model_options[f"{meta['loraloop_test_model']}_model_config"] = json.loads(meta["loraloop_test_config"])
        sd = comfy.utils.load_torch_file(path, safe_load=True)
        parameters += comfy.utils.calculate_parameters(sd)
        clip_data.append(sd)

    class Target:
        params: dict = {}  # noqa: RUF012

    t5 = comfy.sd.t5xxl_detect  # dtype of a T5 with 24 blocks (none here: the CLIP's dtype)
    if clip_type == "flux":
        Target.clip = comfy.text_encoders.flux.flux_clip(**t5(clip_data))
        Target.tokenizer = comfy.text_encoders.flux.FluxTokenizer
    elif clip_type == "sd3":
        Target.clip = comfy.text_encoders.sd3_clip.sd3_clip(**t5(clip_data))
        Target.tokenizer = comfy.text_encoders.sd3_clip.SD3Tokenizer
    else:
        raise ValueError(f"type {clip_type!r}: one of {TYPES}")
    return comfy.sd.CLIP(Target, embedding_directory=embedding_directory, parameters=parameters,
                         state_dict=clip_data, model_options=model_options)


class TinyCLIPLoader:
    @classmethod
    def INPUT_TYPES(cls) -> dict:
        names = _text_encoder_names()
        return {"required": {"clip_name1": (names,), "clip_name2": (names,), "type": (list(TYPES),)},
                "optional": {"clip_name3": ([NONE, *names], {"default": NONE})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "loraloop_test"

    def load(self, clip_name1: str, clip_name2: str, type: str, clip_name3: str = NONE) -> tuple:
        import folder_paths

        names = [clip_name1, clip_name2] + ([clip_name3] if clip_name3 != NONE else [])
        paths = [folder_paths.get_full_path_or_raise("text_encoders", n) for n in names]
        return (load_tiny_clip(paths, type, folder_paths.get_folder_paths("embeddings")),)


NODE_CLASS_MAPPINGS = {"LoRALoopTest_TinyCLIPLoader": TinyCLIPLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"LoRALoopTest_TinyCLIPLoader": "TinyCLIPLoader (LoRA Loop tests)"}
