"""STAR Colour Fix: restores the LR video's colours on the upscaled frames (AdaIN or wavelet)."""
from __future__ import annotations

from comfy_api.latest import io

from star_core import pipeline
from star_core.colour import COLOUR_METHODS
from star_core.spec import default

from . import host


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
                io.Combo.Input("method", options=list(COLOUR_METHODS), default=default("colour.method"),
                               tooltip="adain: per-frame mean/std matching (official). wavelet: keeps the restored "
                                       "detail, takes low frequencies from the LR frames. none: no change."),
                io.Float.Input("strength", default=default("colour.strength"), min=0.0, max=1.0, step=0.05,
                               tooltip="1 = the colour-fixed restored frames; 0 = the bilinear-upscaled LR frames; values between "
                                       "blend (tones down over-sharpened or invented detail)."),
            ],
            outputs=[io.Image.Output(display_name="images")],
        )

    @classmethod
    def execute(cls, images, lr_images, method: str, strength: float) -> io.NodeOutput:
        return io.NodeOutput(host.to_output(pipeline.colour_fix(images, lr_images, method, strength)))
