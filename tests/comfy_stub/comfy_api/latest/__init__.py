"""Stand-in for comfy_api/latest (ComfyUI 0.12.3): ComfyExtension, io, ui."""

from abc import ABC, abstractmethod

from . import _io as io
from . import _ui as ui


class ComfyExtension(ABC):
    async def on_load(self) -> None:
        return None

    @abstractmethod
    async def get_node_list(self):
        ...


__all__ = ["ComfyExtension", "io", "ui"]
