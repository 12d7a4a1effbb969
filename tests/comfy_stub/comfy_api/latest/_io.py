"""Stand-in for comfy_api/latest/_io.py (ComfyUI 0.12.3): node schema types with upstream's as_dict/V1 info rules."""

from collections import Counter
from dataclasses import dataclass, field
from enum import Enum


def prune_dict(d):
    return {k: v for k, v in d.items() if v is not None}


class Input:
    Parent = None

    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, extra_dict=None,
                 raw_link=None, advanced=None):
        self.id, self.display_name, self.optional, self.tooltip, self.lazy = id, display_name, optional, tooltip, lazy
        self.extra_dict = extra_dict or {}

    @property
    def io_type(self):
        return self.Parent.io_type

    def as_dict(self):
        return prune_dict({"display_name": self.display_name, "optional": self.optional, "tooltip": self.tooltip,
                           "lazy": self.lazy}) | prune_dict(self.extra_dict)

    def get_io_type(self):
        return self.io_type

    def validate(self):
        pass


class WidgetInput(Input):
    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                 socketless=None, widget_type=None, force_input=None, extra_dict=None, raw_link=None, advanced=None):
        super().__init__(id, display_name, optional, tooltip, lazy, extra_dict)
        self.default, self.socketless, self.widget_type, self.force_input = default, socketless, widget_type, force_input

    def as_dict(self):
        return super().as_dict() | prune_dict({"default": self.default, "socketless": self.socketless,
                                               "forceInput": self.force_input})


class Output:
    Parent = None

    def __init__(self, id=None, display_name=None, tooltip=None, is_output_list=False):
        self.id, self.display_name, self.tooltip, self.is_output_list = id, display_name if display_name else id, tooltip, is_output_list

    @property
    def io_type(self):
        return self.Parent.io_type

    def validate(self):
        pass


def comfytype(io_type):
    def decorator(cls):
        cls.io_type = io_type
        if not hasattr(cls, "Input") or cls.Input is Input:
            cls.Input = type("Input", (Input,), {})
        if not hasattr(cls, "Output") or cls.Output is Output:
            cls.Output = type("Output", (Output,), {})
        cls.Input.Parent = cls
        cls.Output.Parent = cls
        return cls

    return decorator


class ComfyTypeIO:
    Input = Input
    Output = Output


def Custom(io_type):
    @comfytype(io_type)
    class CustomComfyType(ComfyTypeIO):
        pass

    return CustomComfyType


@comfytype("BOOLEAN")
class Boolean(ComfyTypeIO):
    class Input(WidgetInput):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                     label_on=None, label_off=None, socketless=None, force_input=None, extra_dict=None, raw_link=None,
                     advanced=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input, extra_dict)
            self.label_on, self.label_off = label_on, label_off

        def as_dict(self):
            return super().as_dict() | prune_dict({"label_on": self.label_on, "label_off": self.label_off})


@comfytype("INT")
class Int(ComfyTypeIO):
    class Input(WidgetInput):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None, min=None,
                     max=None, step=None, control_after_generate=None, display_mode=None, socketless=None,
                     force_input=None, extra_dict=None, raw_link=None, advanced=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input, extra_dict)
            self.min, self.max, self.step, self.control_after_generate = min, max, step, control_after_generate

        def as_dict(self):
            return super().as_dict() | prune_dict({"min": self.min, "max": self.max, "step": self.step,
                                                   "control_after_generate": self.control_after_generate})


@comfytype("FLOAT")
class Float(ComfyTypeIO):
    class Input(WidgetInput):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None, min=None,
                     max=None, step=None, round=None, display_mode=None, socketless=None, force_input=None,
                     extra_dict=None, raw_link=None, advanced=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input, extra_dict)
            self.min, self.max, self.step, self.round = min, max, step, round

        def as_dict(self):
            return super().as_dict() | prune_dict({"min": self.min, "max": self.max, "step": self.step,
                                                   "round": self.round})


@comfytype("STRING")
class String(ComfyTypeIO):
    class Input(WidgetInput):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, multiline=False,
                     placeholder=None, default=None, dynamic_prompts=None, socketless=None, force_input=None,
                     extra_dict=None, raw_link=None, advanced=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input, extra_dict)
            self.multiline, self.placeholder, self.dynamic_prompts = multiline, placeholder, dynamic_prompts

        def as_dict(self):
            return super().as_dict() | prune_dict({"multiline": self.multiline, "placeholder": self.placeholder,
                                                   "dynamicPrompts": self.dynamic_prompts})


@comfytype("COMBO")
class Combo(ComfyTypeIO):
    class Input(WidgetInput):
        def __init__(self, id, options=None, display_name=None, optional=False, tooltip=None, lazy=None,
                     default=None, control_after_generate=None, upload=None, image_folder=None, remote=None,
                     socketless=None, extra_dict=None, raw_link=None, advanced=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, None, extra_dict)
            self.options, self.multiselect = options, False

        def as_dict(self):
            return super().as_dict() | prune_dict({"multiselect": self.multiselect, "options": self.options})


def _plain(io_type):
    return comfytype(io_type)(type(io_type.title(), (ComfyTypeIO,), {}))


Image, Model, Clip, Vae = _plain("IMAGE"), _plain("MODEL"), _plain("CLIP"), _plain("VAE")
Conditioning, Latent, LoraModel = _plain("CONDITIONING"), _plain("LATENT"), _plain("LORA_MODEL")


class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    description: str = ""
    search_aliases: list = field(default_factory=list)
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_dev_only: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False
    accept_all_inputs: bool = False

    def validate(self):
        input_ids = [i.id for i in self.inputs]
        output_ids = [o.id for o in self.outputs]
        issues = []
        if len(set(input_ids)) != len(input_ids):
            issues.append(f"Input ids must be unique, but {[i for i, c in Counter(input_ids).items() if c > 1]} are not.")
        if len(set(output_ids)) != len(output_ids):
            issues.append(f"Output ids must be unique, but {[i for i, c in Counter(output_ids).items() if c > 1]} are not.")
        if issues:
            raise ValueError("\n".join(issues))

    def finalize(self):
        if self.is_output_node:
            for h in (Hidden.prompt, Hidden.extra_pnginfo):
                if h not in self.hidden:
                    self.hidden.append(h)
        for i, output in enumerate(self.outputs):
            if output.id is None:
                output.id = f"_{i}_{output.io_type}_"

    def get_v1_info(self, cls=None):
        inputs = {"required": {}}
        for i in self.inputs:
            d = i.as_dict()
            d.pop("optional", None)
            inputs.setdefault("optional" if i.optional else "required", {})[i.id] = (i.get_io_type(), d)
        for h in self.hidden:
            inputs.setdefault("hidden", {})[h.name] = (h.value,)
        return {
            "input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
            "output": [o.io_type for o in self.outputs],
            "output_name": [o.display_name if o.display_name else o.io_type for o in self.outputs],
            "output_is_list": [o.is_output_list for o in self.outputs],
            "output_tooltips": [o.tooltip for o in self.outputs], "name": self.node_id,
            "display_name": self.display_name, "category": self.category, "description": self.description,
            "output_node": self.is_output_node,
        }


class HiddenHolder:
    def __init__(self, values):
        self._values = values

    def __getattr__(self, key):
        return self._values.get(key)


class NodeOutput:
    def __init__(self, *args, ui=None, expand=None, block_execution=None):
        self.args, self.ui, self.expand, self.block_execution = args, ui, expand, block_execution

    @property
    def result(self):
        return self.args if self.args else None


class ComfyNode:
    hidden = HiddenHolder({})

    @classmethod
    def define_schema(cls):
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs):
        raise NotImplementedError

    @classmethod
    def GET_SCHEMA(cls):
        schema = cls.define_schema()
        schema.finalize()
        schema.validate()
        return schema

    @classmethod
    def PREPARE_CLASS_CLONE(cls, hidden_inputs):
        """Upstream clones the class per execution and sets `hidden` on the clone (execution.py)."""
        return type(cls.__name__, (cls,), {"hidden": HiddenHolder(hidden_inputs)})
