"""STAR Tiled VAE Decode: the sampled latent → exactly the target frames, in temporal windows and spatial tiles."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from star_core import pipeline

from . import host, options
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
                *options.decode_inputs(),
            ],
            outputs=[io.Image.Output(display_name="images")],
        )

    @classmethod
    def execute(cls, samples, vae, tile: int, tile_overlap: int, temporal_window: int,
                temporal_overlap: int) -> io.NodeOutput:
        geometry = host.geometry_of(samples, "STAR Tiled VAE Decode samples")
        spec = options.decode_spec("STAR Tiled VAE Decode", tile=tile, tile_overlap=tile_overlap,
                                   temporal_window=temporal_window, temporal_overlap=temporal_overlap)
        video = host.video_vae(vae)
        ctx = host.context(video.model)
        with ctx.scope():
            windows = [w.cpu() for w in pipeline.decode(video, samples["samples"], geometry, spec.decode, host=ctx)]
        return io.NodeOutput(host.to_output(torch.cat(windows)))
