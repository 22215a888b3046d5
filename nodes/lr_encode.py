"""STAR LR Encode: LR frames (IMAGE or VIDEO) → upscaled, padded, VAE-encoded latent that carries its geometry."""
from __future__ import annotations

from comfy_api.latest import io

from star_core import pipeline
from star_core.geometry import PADDING_MODES
from star_core.frames import TensorSource
from star_core.spec import DEFAULTS
from star_core.spec import default

from . import host
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
                io.Float.Input("scale", default=default("output.scale"), min=1.0, max=8.0, step=0.25,
                               tooltip="Upscale factor (official 4). Ignored when target width and height are set."),
                io.Int.Input("target_width", default=0, min=0, max=8192, step=2,
                             tooltip="Exact output width in pixels; 0 = use scale. Set both width and height."),
                io.Int.Input("target_height", default=0, min=0, max=8192, step=2,
                             tooltip="Exact output height in pixels; 0 = use scale. Set both width and height."),
                io.Combo.Input("padding", options=list(PADDING_MODES), default=default("output.padding"),
                               tooltip="official: pad to at least 720x1280 with white, as STAR does (results match "
                                       "the reference). minimal: pad only what the network needs (much less "
                                       "memory and time for small outputs)."),
                io.Combo.Input("posterior", options=["sample", "mean"], default=default("encode.posterior"),
                               tooltip="sample: the official VAE posterior sample (uses seed). mean: the posterior "
                                       "mean (no randomness)."),
                io.Int.Input("seed", default=default("seed"), min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The run's one seed (official: 666): the posterior sample here, then the start "
                                     "and SDE noise in STAR Sampler, which reads it from the latent. The same seed "
                                     "gives the command line's result."),
                io.Int.Input("tile", default=0, min=0, max=8192, step=8,
                             tooltip="Spatial encoder tile in pixels (multiple of 8); 0 = whole frames (official)."),
                io.Int.Input("tile_overlap", default=default("encode.tile_overlap"), min=0, max=1024, step=8,
                             tooltip="Overlap of neighbouring encoder tiles in pixels (multiple of 8)."),
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
        if (target_width > 0) != (target_height > 0):
            raise ValueError("STAR LR Encode: set both target_width and target_height, or leave both 0 to use scale")
        target = (target_height, target_width) if target_width > 0 else None
        spec = DEFAULTS.with_options({"output.scale": scale, "output.target": target, "output.padding": padding,
                                      "encode.posterior": posterior, "encode.tile": tile or None,
                                      "encode.tile_overlap": tile_overlap, "seed": seed})
        source = TensorSource(images, fps)
        geometry = pipeline.plan(source.info, spec)
        ctx = host.context()
        with ctx.scope():
            latent = pipeline.encode_source(source, geometry, host.video_vae(vae), spec, host=ctx)
        out = {"samples": host.to_output(latent), host.GEOMETRY_KEY: geometry.to_dict(), host.SEED_KEY: seed}
        return io.NodeOutput(out, images, fps)
