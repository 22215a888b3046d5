"""STAR LR Encode: LR frames (IMAGE or VIDEO) → upscaled, padded, VAE-encoded latent that carries its geometry."""
from __future__ import annotations

from comfy_api.latest import io

from star_core.frames import TensorSource

from . import host, options
from .types import vae_input

# Frame rate assumed for IMAGE frames (they carry none); CreateVideo's default.
DEFAULT_FPS = 30.0


class STARLREncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="STARLREncode",
            display_name="STAR LR Encode",
            category=host.CATEGORY,
            description="Upscales the low-resolution frames bilinearly to the target size, pads them for the "
                        "network and encodes them with the SVD VAE. The latent remembers the original size, the "
                        "target, the padding, the fps and the run's seed, so STAR Sampler continues the same "
                        "random stream and STAR Tiled VAE Decode returns exactly that video.",
            inputs=[
                vae_input("The SVD VAE: Load VAE with the SVD VAE file, or STAR VAE Loader."),
                io.Image.Input("images", optional=True,
                               tooltip="Low-resolution frames (IMAGE batch = frames). Connect this or video."),
                io.Video.Input("video", optional=True,
                               tooltip="Low-resolution VIDEO (its frames and fps are used); overrides images."),
                io.Float.Input("fps", default=DEFAULT_FPS, min=1.0, max=1000.0, step=0.001,
                               tooltip="Frame rate of the images (an IMAGE batch has none). A connected video's "
                                       "own frame rate is used instead."),
                *options.geometry_inputs(),
                *options.encode_inputs(),
            ],
            outputs=[io.Latent.Output(display_name="lr_latent"),
                     io.Image.Output(display_name="lr_images"),
                     io.Float.Output(display_name="fps")],
        )

    @classmethod
    def execute(cls, vae, fps: float, scale: float, target_width: int, target_height: int, padding: str,
                posterior: str, seed: int, tile: int, tile_overlap: int, images=None, video=None) -> io.NodeOutput:
        if video is not None:
            components = video.get_components()
            images, fps = components.images, float(components.frame_rate)
        if images is None:
            raise ValueError("STAR LR Encode: connect images (IMAGE frames) or video (VIDEO)")
        spec = options.encode_spec("STAR LR Encode", scale=scale, target_width=target_width,
                                   target_height=target_height, padding=padding, posterior=posterior, seed=seed,
                                   tile=tile, tile_overlap=tile_overlap)
        return io.NodeOutput(host.encode_latent(vae, TensorSource(images, fps), None, spec), images, fps)
