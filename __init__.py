"""ComfyUI entry point of LoRA Loop (this folder is the custom-node pack: `custom_nodes/<this repo>/`).

ComfyUI imports this file by path (hosts.md §1.1). It puts the repository root on `sys.path` only when `loraloop` is
not importable already, then exposes the nodes: V3 (`comfy_entrypoint`) when ComfyUI has `comfy_api.latest`, else
generated V1 mappings. Outside ComfyUI it imports cleanly and defines the V1 mappings, which nothing uses.
Supported: ComfyUI 0.12.3 (tested); older builds through the generated V1 classes.
"""

import importlib.util
import logging
import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
if importlib.util.find_spec("loraloop") is None:
    sys.path.insert(0, _ROOT)
else:
    _found = os.path.dirname(os.path.dirname(os.path.abspath(importlib.util.find_spec("loraloop").origin)))
    if os.path.normcase(_found) != os.path.normcase(_ROOT):
        logging.getLogger("loraloop").warning("LoRA Loop: using the loraloop package at %s, not %s", _found, _ROOT)

import loraloop.comfy as _pack  # noqa: E402

WEB_DIRECTORY = "./web"

if _pack.HAS_V3:
    comfy_entrypoint = _pack.comfy_entrypoint
    __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
else:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = _pack.v1_mappings()
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
