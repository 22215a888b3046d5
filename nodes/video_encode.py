"""STAR Encode Video: a VIDEO → the LR latent, read and encoded window by window (the streaming path's start)."""
from __future__ import annotations

from comfy_api.latest import io

from . import host, options
from .types import vae_input
from .video import video_source


class STARVideoEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="STARVideoEncode",
            display_name="STAR Encode Video",
            category=host.CATEGORY,
            description="Reads the low-resolution VIDEO a few frames at a time, upscales them bilinearly, pads "
                        "them and encodes them with the SVD VAE; only the small latent is kept. The latent "
                        "remembers the video, so STAR Decode Video can colour-fix and keep its audio.",
            inputs=[
                vae_input("The SVD VAE: Load VAE with the SVD VAE file, or STAR VAE Loader."),
                io.Video.Input("video", tooltip="Low-resolution VIDEO (Load Video). Its fps and audio are kept."),
                *options.geometry_inputs(),
                *options.encode_inputs(),
            ],
            outputs=[io.Latent.Output(display_name="lr_latent")],
        )

    @classmethod
    def execute(cls, vae, video, scale: float, target_width: int, target_height: int, padding: str,
                posterior: str, seed: int, tile: int, tile_overlap: int) -> io.NodeOutput:
        source, audio_from = video_source(video)
        spec = options.encode_spec("STAR Encode Video", scale=scale, target_width=target_width,
                                   target_height=target_height, padding=padding, posterior=posterior, seed=seed,
                                   tile=tile, tile_overlap=tile_overlap)
        return io.NodeOutput(host.encode_latent(vae, source, audio_from, spec))

