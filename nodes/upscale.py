"""STAR Upscale: the whole STAR run in one node (model + VAE + text encoder + video → video), official defaults."""
from __future__ import annotations

from comfy_api.latest import io

from star_core import pipeline
from star_core.options import AUTO
from star_core.spec import DEFAULTS, default

from . import host, options
from .text_encode import conditioning
from .types import STARModel, vae_input
from .video import STARVideo, video_source


class STARUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="STARUpscale",
            display_name="STAR Upscale",
            category=host.CATEGORY,
            description="Upscales a video with STAR using the official settings: reads and encodes it a few frames "
                        "at a time, samples the small latent, and returns a VIDEO that Save Video decodes and writes "
                        "window by window (fps and audio kept). For every option, use the separate STAR nodes.",
            inputs=[
                STARModel.Input("star_model", tooltip="From STAR Model Loader."),
                vae_input("The SVD VAE: Load VAE with the SVD VAE file, or STAR VAE Loader."),
                io.Clip.Input("clip", tooltip="SD 2.x CLIP-H text encoder (Load CLIP, type stable_diffusion)."),
                io.Video.Input("video", tooltip="Low-resolution VIDEO (Load Video)."),
                io.String.Input("prompt", default=default("prompt.prompt"), multiline=True,
                                tooltip="What the video shows; the official default is 'a good video'."),
                io.Float.Input("scale", default=default("output.scale"), min=1.0, max=8.0, step=0.25,
                               tooltip="Upscale factor (official 4)."),
                io.Combo.Input("padding", options=["official", "minimal"], default=default("output.padding"),
                               tooltip="official: pad to at least 720x1280 as STAR does (matches the reference). "
                                       "minimal: only what the network needs (much faster for small videos)."),
                options.seed_input(),
                io.Int.Input("vae_tile", default=0, min=0, max=8192, step=8,
                             tooltip="Spatial VAE tile in pixels for encoding and decoding (multiple of 8); 0 = "
                                     "auto: whole frames (official) when they fit ComfyUI's free memory, else the "
                                     "largest exact tile that does (chunks and diffusion tiles are auto too)."),
            ],
            outputs=[io.Video.Output(display_name="video")],
        )

    @classmethod
    def execute(cls, star_model, vae, clip, video, prompt: str, scale: float, padding: str, seed: int,
                vae_tile: int) -> io.NodeOutput:
        positive, negative = conditioning(clip, prompt, default("prompt.suffix"), default("prompt.negative_prompt"),
                                          "STAR Upscale")
        with host.inputs_of("STAR Upscale"):
            spec = DEFAULTS.with_options({"output.scale": scale, "output.padding": padding, "seed": seed,
                                          "encode.tile": vae_tile or AUTO, "decode.tile": vae_tile or AUTO})
        # a text encoder of another width than the model's context is refused before the video is encoded
        width = star_model.model.config.context_dim
        positive = host.conditioning_context(positive, "prompt", width)
        negative = host.conditioning_context(negative, "negative prompt", width)
        source, audio_from = video_source(video)
        lr = host.encode_latent(vae, source, audio_from, spec)
        components = pipeline.Components(host.model_function(star_model), vae, positive, negative)
        ctx = host.context(star_model.model)
        with ctx.scope():
            latent = pipeline.sample_latent(components, lr["samples"], spec, host=ctx)
        geometry = host.geometry_of(lr, "STAR Upscale")
        return io.NodeOutput(STARVideo(host.to_output(latent), geometry, vae, spec, source, audio_from))
