"""AUTOMATIC1111 stable-diffusion-webui (and Forge) entry point of LoRA Loop: the "LoRA Loop" tab and /loraloop/v1 API.

The extension folder is the `loraloop` package itself (its root `__init__.py`). The webui imports `scripts/*.py` by
path, so the folder is imported here under the name `loraloop` (unless an installed `loraloop` already is, e.g.
`pip install -e`); its submodules resolve through the package from then on. Nothing is added to sys.path, so the
folders inside (`nodes`, `trainer`) never become top-level names. ComfyUI never imports this file.
"""

import importlib.util
import logging
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def _import_package():  # noqa: ANN202 - a module
    found = sys.modules.get("loraloop")
    if found is None:
        spec = importlib.util.find_spec("loraloop")
        if spec is None:
            spec = importlib.util.spec_from_file_location("loraloop", _ROOT / "__init__.py",
                                                          submodule_search_locations=[str(_ROOT)])
        found = importlib.util.module_from_spec(spec)
        sys.modules["loraloop"] = found
        try:
            spec.loader.exec_module(found)
        except BaseException:
            del sys.modules["loraloop"]
            raise
    where = Path(found.__file__).resolve().parent
    if where != _ROOT:
        logging.getLogger("loraloop").warning("LoRA Loop: using the loraloop package at %s, not %s", where, _ROOT)
    return found


_import_package()

from modules import script_callbacks  # noqa: E402 - the webui's module, importable only inside the webui

import loraloop.a1111.entry as _entry  # noqa: E402 - the package is importable only after _import_package()

_entry.register(script_callbacks)
