"""The ComfyUI node API this pack is written against: V3 (`comfy_api.latest`), ComfyUI 0.12.3 and newer.

ComfyUI builds without `comfy_api.latest` predate the V3 API; the pack refuses them with one clear line rather than a
traceback (the classic V1 API is not supported: README, pyproject `[tool.comfy]`).
"""

from __future__ import annotations

MIN_COMFYUI = "0.12.3"

try:
    from comfy_api.latest import ComfyExtension, io, ui
except ImportError as err:  # not inside ComfyUI, or a ComfyUI that predates the V3 node API
    msg = (f"LoRA Loop's nodes need ComfyUI {MIN_COMFYUI} or newer (the V3 node API, comfy_api.latest); "
           "update ComfyUI, or use LoRA Loop from the command line (`loraloop train`)")
    raise ImportError(msg) from err

# `io.LoraModel` appeared with the built-in trainer; the wire type is the same string either way.
LoraModelType = getattr(io, "LoraModel", None) or io.Custom("LORA_MODEL")

__all__ = ["MIN_COMFYUI", "ComfyExtension", "LoraModelType", "io", "ui"]
