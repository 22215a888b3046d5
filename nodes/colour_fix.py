"""STAR Colour Fix: restores the LR video's colours on the upscaled frames (AdaIN or wavelet)."""
from __future__ import annotations

from comfy_api.latest import io

from star_core import pipeline

from . import host, options


class STARColourFix(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="STARColourFix",
            display_name="STAR Colour Fix",
            category=host.CATEGORY,
            description="Matches each restored frame's colour statistics to its LR frame (official: AdaIN).",
            inputs=[
                io.Image.Input("images", tooltip="Restored frames (STAR Tiled VAE Decode)."),
                io.Image.Input("lr_images", tooltip="The LR frames they came from (same frame count)."),
                *options.colour_inputs(),
            ],
            outputs=[io.Image.Output(display_name="images")],
        )

    @classmethod
    def execute(cls, images, lr_images, method: str, strength: float) -> io.NodeOutput:
        return io.NodeOutput(host.to_output(pipeline.colour_fix(images, lr_images, method, strength)))
