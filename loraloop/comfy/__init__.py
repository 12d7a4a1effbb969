"""LoRA Loop inside ComfyUI: nodes (`nodes`), the host bundle (`host`), training orchestration (`training`).

Importing this package never imports ComfyUI; the modules that need it import `comfy.*` when a node runs.
Supported: ComfyUI 0.12.3 (V3 node API, tested); builds without `comfy_api.latest` get generated V1 classes.
"""

from .compat import HAS_V3
from .nodes import NODES, comfy_entrypoint, v1_mappings

__all__ = ["HAS_V3", "NODES", "comfy_entrypoint", "v1_mappings"]
