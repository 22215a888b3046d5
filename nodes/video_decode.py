"""STAR Decode Video: the sampled latent → a VIDEO decoded window by window while Save Video writes it."""
from __future__ import annotations

from comfy_api.latest import io

from . import host, options
from .types import vae_input
from .video import STARVideo


class STARVideoDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="STARVideoDecode",
            display_name="STAR Decode Video",
            category=host.CATEGORY,
            description="Returns the restored VIDEO without decoding it yet: Save Video decodes, colour-fixes and "
                        "encodes it a few frames at a time, so memory does not grow with the video's length. Nodes "
                        "that take the VIDEO's frames (Get Video Components) decode all of it at once.",
            inputs=[
                io.Latent.Input("samples", tooltip="From STAR Sampler (made from STAR Encode Video or LR Encode)."),
                vae_input("The same SVD VAE that encoded the LR latent."),
                *options.decode_inputs(),
                *options.colour_inputs(),
            ],
            outputs=[io.Video.Output(display_name="video")],
        )

    @classmethod
    def execute(cls, samples, vae, tile: int, tile_overlap: int, temporal_window: int, temporal_overlap: int,
                method: str, strength: float) -> io.NodeOutput:
        name = "STAR Decode Video samples"
        geometry = host.geometry_of(samples, name)
        spec = options.decode_spec("STAR Decode Video", tile=tile, tile_overlap=tile_overlap,
                                   temporal_window=temporal_window, temporal_overlap=temporal_overlap,
                                   method=method, strength=strength)
        source, audio_from = host.source_of(samples, name)
        return io.NodeOutput(STARVideo(samples["samples"], geometry, vae, spec, source, audio_from))
