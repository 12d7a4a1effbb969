"""LoRA Loop: train LoRAs inside the image apps people already run.

This folder is two things at once:
- the `loraloop` package (`pip install -e .` maps the name onto this folder): `trainer/` is the host-agnostic engine,
  `nodes/` (ComfyUI), `a1111/` (AUTOMATIC1111/Forge, loaded from `scripts/`) and `cli/` are its three front doors;
- the ComfyUI custom-node pack: ComfyUI imports this file by path under a name of its own (docs/hosts.md), which is why
  every module inside imports its siblings relatively.

Importing it is cheap: ComfyUI's loader asks for `comfy_entrypoint`, and only that request (PEP 562 `__getattr__`)
imports the nodes. Needs ComfyUI 0.12.3 or newer (the V3 node API, `comfy_api.latest`); tested with 0.12.3 and 0.33.0.
"""

from typing import Any

__version__ = "0.3.0"
WEB_DIRECTORY = "./web"


def __getattr__(name: str) -> Any:
    if name == "comfy_entrypoint":
        from .nodes import comfy_entrypoint

        return comfy_entrypoint
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
