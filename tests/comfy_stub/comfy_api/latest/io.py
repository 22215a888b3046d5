"""Stub of the V3 `io` module: typed inputs/outputs, Schema, ComfyNode, NodeOutput.

`Schema.v1_info()` renders a schema the way the server lists it in `/object_info`, so tests can compare it with
entries recorded from a real ComfyUI.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


def _prune(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


class Input:
    io_type = "*"

    def __init__(self, id: str, display_name: str | None = None, optional: bool = False, tooltip: str | None = None,
                 lazy: bool | None = None, default: Any = None, min: Any = None, max: Any = None, step: Any = None,
                 round: Any = None, multiline: bool | None = None, options: list | None = None,
                 control_after_generate: bool | None = None, display_mode: Any = None, force_input: bool | None = None,
                 socketless: bool | None = None, extra_dict: dict | None = None):
        self.id = id
        self.display_name = display_name
        self.optional = optional
        self.tooltip = tooltip
        self.lazy = lazy
        self.default = default
        self.min, self.max, self.step, self.round = min, max, step, round
        self.multiline = multiline
        self.options = options
        self.control_after_generate = control_after_generate
        self.display_mode = display_mode.value if isinstance(display_mode, Enum) else display_mode
        self.force_input = force_input
        self.socketless = socketless

    def get_io_type(self) -> str:
        return self.io_type

    def as_dict(self) -> dict:
        return _prune({
            "display_name": self.display_name, "optional": self.optional or None, "tooltip": self.tooltip,
            "lazy": self.lazy, "default": self.default, "min": self.min, "max": self.max, "step": self.step,
            "round": self.round, "multiline": self.multiline, "control_after_generate": self.control_after_generate,
            "display": self.display_mode, "forceInput": self.force_input, "socketless": self.socketless,
        })


class Output:
    io_type = "*"

    def __init__(self, id: str | None = None, display_name: str | None = None, tooltip: str | None = None,
                 is_output_list: bool = False):
        self.id = id
        self.display_name = display_name
        self.tooltip = tooltip
        self.is_output_list = is_output_list


def _comfytype(io_type: str):
    def make(name: str):
        ns = {"io_type": io_type}
        return type(name, (), {
            "io_type": io_type,
            "Input": type("Input", (Input,), ns),
            "Output": type("Output", (Output,), ns),
        })
    return make


Image = _comfytype("IMAGE")("Image")
Latent = _comfytype("LATENT")("Latent")
Conditioning = _comfytype("CONDITIONING")("Conditioning")
Clip = _comfytype("CLIP")("Clip")
Vae = _comfytype("VAE")("Vae")
Model = _comfytype("MODEL")("Model")
Video = _comfytype("VIDEO")("Video")
Audio = _comfytype("AUDIO")("Audio")
Int = _comfytype("INT")("Int")
Float = _comfytype("FLOAT")("Float")
String = _comfytype("STRING")("String")
Boolean = _comfytype("BOOLEAN")("Boolean")


class Combo:
    io_type = "COMBO"

    class Input(Input):
        io_type = "COMBO"

        def as_dict(self) -> dict:
            return super().as_dict() | {"multiselect": False, "options": self.options}

    class Output(Output):
        io_type = "COMBO"


def Custom(io_type: str):
    return _comfytype(io_type)(io_type)


class MultiType:
    class Input(Input):
        def __init__(self, id: str, types: list, **kwargs):
            super().__init__(id, **kwargs)
            self.types = types

        def get_io_type(self) -> str:
            return ",".join(dict.fromkeys(t.io_type for t in self.types))


class NumberDisplay(str, Enum):
    number = "number"
    slider = "slider"


class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"


@dataclass
class Schema:
    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    description: str = ""
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    not_idempotent: bool = False

    def v1_info(self) -> dict:
        """The node's `/object_info` entry (inputs, outputs, names, category) as the real server renders it."""
        inp: dict = {"required": {}}
        for i in self.inputs:
            opts = {k: v for k, v in i.as_dict().items() if k != "optional"}
            inp.setdefault("optional" if i.optional else "required", {})[i.id] = [i.get_io_type(), opts]
        return {
            "input": inp,
            "input_order": {k: list(v) for k, v in inp.items()},
            "output": [o.io_type for o in self.outputs],
            "output_is_list": [o.is_output_list for o in self.outputs],
            "output_name": [o.display_name or o.io_type for o in self.outputs],
            "output_tooltips": [o.tooltip for o in self.outputs],
            "name": self.node_id,
            "display_name": self.display_name,
            "description": self.description,
            "category": self.category,
            "output_node": self.is_output_node,
        }


class ComfyNode:
    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs):
        raise NotImplementedError


class NodeOutput:
    def __init__(self, *args, ui=None, expand=None, block_execution=None):
        self.args = args
        self.ui = ui

    @property
    def result(self):
        return self.args if self.args else None
