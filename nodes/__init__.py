"""LoRA Loop inside ComfyUI: the nodes (`definitions`), the host bundle (`bundle`), one training run (`training`).

Importing this package needs ComfyUI (0.12.3 or newer, the V3 node API); the root `__init__.py` imports it only when
ComfyUI asks for `comfy_entrypoint`. Modules that touch ComfyUI's models import `comfy.*` when a node runs.
"""

from .definitions import NODES, comfy_entrypoint

__all__ = ["NODES", "comfy_entrypoint"]
