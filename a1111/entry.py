"""Registration with the webui: the tab (on_ui_tabs) and the HTTP API (on_app_started).

Called by scripts/loraloop_tab.py while the webui imports extension scripts. The Gradio UI is built only when the webui
asks for tabs, so `--nowebui` (API only) never imports the tab code.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def on_ui_tabs() -> list[tuple[Any, str, str]]:
    from .ui import TAB_ID, TAB_TITLE, build_tab

    return [(build_tab(), TAB_TITLE, TAB_ID)]


def on_app_started(demo: Any, app: Any) -> None:
    from . import api

    api.register(app)


def register(script_callbacks: Any) -> None:
    script_callbacks.on_ui_tabs(on_ui_tabs)
    script_callbacks.on_app_started(on_app_started)
