"""The few `comfy_api.latest` names our nodes use, for ComfyUI builds that predate the V3 API (and for use outside ComfyUI).

Only the schema side is implemented: enough to declare the nodes once, in V3 style, and generate classic (V1)
`NODE_CLASS_MAPPINGS` from them (`compat.v1_node_class`). Inside a ComfyUI that ships `comfy_api.latest` this module
is never used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"


class _Input:
    io_type = "*"
    _widget_keys: tuple[str, ...] = ()

    def __init__(self, id: str, display_name: str | None = None, optional: bool = False,  # noqa: A002
                 tooltip: str | None = None, **extra: Any) -> None:
        self.id, self.display_name, self.optional, self.tooltip = id, display_name, optional, tooltip
        self.extra = extra

    def get_io_type(self) -> str:
        return self.io_type

    def as_dict(self) -> dict[str, Any]:
        out = {"display_name": self.display_name, "tooltip": self.tooltip}
        out.update({k: v for k, v in self.extra.items() if k in self._widget_keys})
        return {k: v for k, v in out.items() if v is not None}


class _Output:
    io_type = "*"

    def __init__(self, id: str | None = None, display_name: str | None = None, tooltip: str | None = None,  # noqa: A002
                 is_output_list: bool = False) -> None:
        self.id, self.display_name, self.tooltip, self.is_output_list = id, display_name or id, tooltip, is_output_list


def _type(io_type: str, widget_keys: tuple[str, ...] = ()) -> type:
    inp = type("Input", (_Input,), {"io_type": io_type, "_widget_keys": widget_keys})
    out = type("Output", (_Output,), {"io_type": io_type})
    return type(io_type.title(), (), {"io_type": io_type, "Input": inp, "Output": out})


_NUMBER = ("default", "min", "max", "step", "round", "display")
Int = _type("INT", _NUMBER + ("control_after_generate",))
Float = _type("FLOAT", _NUMBER)
Boolean = _type("BOOLEAN", ("default", "label_on", "label_off"))
String = _type("STRING", ("default", "multiline", "placeholder", "dynamicPrompts", "forceInput"))
Image = _type("IMAGE")
Model = _type("MODEL")
Clip = _type("CLIP")
Vae = _type("VAE")
Conditioning = _type("CONDITIONING")
LoraModel = _type("LORA_MODEL")


class Combo:
    io_type = "COMBO"

    class Input(_Input):
        io_type = "COMBO"
        _widget_keys = ("default",)

        def __init__(self, id: str, options: list | None = None, **kwargs: Any) -> None:  # noqa: A002
            super().__init__(id, **kwargs)
            self.options = list(options or [])

    class Output(_Output):
        io_type = "COMBO"


def Custom(io_type: str) -> type:  # noqa: N802 - mirrors comfy_api's spelling
    return _type(io_type)


@dataclass
class Schema:
    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    description: str = ""
    search_aliases: list[str] = field(default_factory=list)
    is_input_list: bool = False
    is_output_node: bool = False
    is_experimental: bool = False
    not_idempotent: bool = False


class NodeOutput:
    def __init__(self, *args: Any, ui: Any = None) -> None:
        self.args, self.ui = args, ui


class _HiddenValues:
    def __init__(self, values: dict[str, Any]) -> None:
        self.unique_id = values.get("unique_id")
        self.prompt = values.get("prompt")
        self.extra_pnginfo = values.get("extra_pnginfo")


class ComfyNode:
    hidden = _HiddenValues({})

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs: Any) -> NodeOutput:
        raise NotImplementedError


class ComfyExtension:
    async def on_load(self) -> None:
        return None

    async def get_node_list(self) -> list[type[ComfyNode]]:
        raise NotImplementedError


class _UI:
    class PreviewText:
        def __init__(self, value: str, **_: Any) -> None:
            self.value = value

        def as_dict(self) -> dict:
            return {"text": (self.value,)}

    class PreviewImage:
        """Without comfy_api there is no temp-image helper; the image still flows out of the node's IMAGE output."""

        def __init__(self, image: Any, **_: Any) -> None:
            self.image = image

        def as_dict(self) -> dict:
            return {}


class _IO:
    Hidden, Int, Float, Boolean, String, Combo, Image, Model = Hidden, Int, Float, Boolean, String, Combo, Image, Model
    Clip, Vae, Conditioning, LoraModel, Custom = Clip, Vae, Conditioning, LoraModel, staticmethod(Custom)
    Schema, NodeOutput, ComfyNode = Schema, NodeOutput, ComfyNode


io = _IO
ui = _UI
