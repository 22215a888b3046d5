"""STAR Tiled VAE Decode: the sampled latent → exactly the target frames, in temporal windows and spatial tiles."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from star_core import pipeline
from star_core.spec import DecodeSpec
from star_core.spec import default

from . import host
from .types import vae_input


class STARTiledVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="STARTiledVAEDecode",
            display_name="STAR Tiled VAE Decode",
            category=host.CATEGORY,
            description="Decodes with the SVD temporal decoder window by window (official: 3 frames) and "
                        "optionally in spatial tiles, then removes the padding: the IMAGE has exactly the original "
                        "frame count and the target size.",
            inputs=[
                io.Latent.Input("samples", tooltip="From STAR Sampler (or STAR LR Encode)."),
                vae_input("The same SVD VAE that encoded the LR latent."),
                io.Int.Input("tile", default=0, min=0, max=8192, step=8,
                             tooltip="Spatial tile edge in output pixels (multiple of 8); 0 = whole frames "
                                     "(official). Smaller tiles need less memory."),
                io.Int.Input("tile_overlap", default=default("decode.tile_overlap"), min=0, max=1024, step=8,
                             tooltip="Overlap of neighbouring tiles in pixels (multiple of 8), feather-blended."),
                io.Int.Input("temporal_window", default=default("decode.window"), min=1, max=256,
                             tooltip="Frames per temporal-decoder call (official 3)."),
                io.Int.Input("temporal_overlap", default=default("decode.window_overlap"), min=0, max=255,
                             tooltip="Frames shared by neighbouring windows, blended (official 0)."),
            ],
            outputs=[io.Image.Output(display_name="images")],
        )

    @classmethod
    def execute(cls, samples, vae, tile: int, tile_overlap: int, temporal_window: int,
                temporal_overlap: int) -> io.NodeOutput:
        geometry = host.geometry_of(samples, "STAR Tiled VAE Decode samples")
        if temporal_overlap >= temporal_window:
            raise ValueError(f"STAR Tiled VAE Decode: temporal_overlap ({temporal_overlap}) must be smaller than "
                             f"temporal_window ({temporal_window})")
        options = DecodeSpec(window=temporal_window, window_overlap=temporal_overlap, tile=tile or None,
                             tile_overlap=tile_overlap)
        ctx = host.context()
        with ctx.scope():
            windows = [w.cpu() for w in pipeline.decode(host.video_vae(vae), samples["samples"], geometry, options,
                                                        host=ctx)]
        return io.NodeOutput(host.to_output(torch.cat(windows)))
