"""AUTOMATIC1111 stable-diffusion-webui (and Forge) entry point of LoRA Loop: the "LoRA Loop" tab and /loraloop/v1 API.

The webui imports every `scripts/*.py` of an extension with the extension's folder first on sys.path, and only while
that import runs (modules/scripts.py), so the `loraloop` package is imported here, eagerly, under its unique name;
its submodules are found later through the package itself. This folder is also a ComfyUI node pack (the root
__init__.py); the webui never imports that file, and ComfyUI never imports this one.
"""

import logging
import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
_added = _ROOT not in sys.path
if _added:  # imported by something other than the webui's script loader
    sys.path.insert(0, _ROOT)
try:
    import loraloop
    import loraloop.a1111.entry as _entry
finally:
    if _added:
        sys.path.remove(_ROOT)

_found = str(Path(loraloop.__file__).resolve().parent.parent)
if Path(_found) != Path(_ROOT):
    logging.getLogger("loraloop").warning("LoRA Loop: using the loraloop package at %s, not %s", _found, _ROOT)

from modules import script_callbacks  # noqa: E402 - the webui's module, importable only inside the webui

_entry.register(script_callbacks)
