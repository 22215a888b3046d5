"""STAR Sampler: the LIEM-patched STAR UNet + ControlNet sampling an LR latent (DPM++ 2M SDE, CFG + rescale)."""
from __future__ import annotations

from comfy_api.latest import io

from star_core import pipeline
from star_core.diffusion.chunking import FUSIONS
from star_core.diffusion.schedule import MODES, t_max_for_denoise
from star_core.diffusion.star_sampling import MAX_TILE, SamplerSettings
from star_core.options import AUTO
from star_core.seeds import RunNoise
from star_core.spec import FAST_MODE_STEPS, default

from . import host
from .types import STARModel

MAX_STEPS = 1000


class STARSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="STARSampler",
            display_name="STAR Sampler",
            category=host.CATEGORY,
            description="Restores the LR latent with STAR: diffuse to the start level, then DPM++ 2M SDE with "
                        "classifier-free guidance + rescale, in temporal chunks for long videos. The noise comes "
                        "from the seed set on STAR LR Encode (one seed per run).",
            inputs=[
                STARModel.Input("star_model", tooltip="From STAR Model Loader."),
                io.Conditioning.Input("positive", tooltip="Caption conditioning (STAR Text Encode positive)."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning (STAR Text Encode negative)."),
                io.Latent.Input("lr_latent", tooltip="From STAR LR Encode: the ControlNet hint and start point."),
                io.Combo.Input("solver_mode", options=list(MODES), default=default("sampler.mode"),
                               tooltip="fast: STAR's fixed 15-step schedule (official; steps must stay 15). normal: "
                                       "`steps` evenly spaced steps."),
                io.Int.Input("steps", default=default("sampler.steps"), min=2, max=MAX_STEPS,
                             tooltip="Steps in normal mode. Fast mode always runs its fixed 15-step schedule, so "
                                     "any other value there is rejected rather than silently ignored."),
                io.Float.Input("cfg", default=default("sampler.cfg"), min=1.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (official 7.5; 1 skips the negative pass)."),
                io.Float.Input("rescale", default=default("sampler.rescale"), min=0.0, max=1.0, step=0.01,
                               tooltip="CFG rescale strength (official 0.2)."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="Fraction of STAR's 900 noise levels to start from (1.0 = official t=899); "
                                       "lower keeps more of the input."),
                io.Int.Input("chunk_length", default=0, min=0, max=4096,
                             tooltip="Maximum latent frames per model call (official 32); 0 = auto: 32, or the "
                                     "longest that fits ComfyUI's free memory. Lower = less memory."),
                io.Int.Input("chunk_overlap", default=-1, min=-1, max=4096,
                             tooltip="Frames shared by neighbouring chunks; -1 = automatic (chunk_length // 4; "
                                     "the official fusion always uses half a chunk)."),
                io.Combo.Input("fusion", options=list(FUSIONS), default=default("sampler.fusion"),
                               tooltip="How overlapping chunks are joined: official hard cuts, or linear / hann "
                                       "cross-fades (smoother seams on long videos)."),
                io.Int.Input("diffusion_tile", default=0, min=0, max=MAX_TILE, step=8, optional=True,
                             tooltip="Spatial tile of every model call in pixels (square; rounded down to sizes the "
                                     "network takes); 0 = auto: whole frames when they fit ComfyUI's free memory, "
                                     "else the largest tiles that do. A value at least the frame size = whole "
                                     "frames (official). Overlapping tiles are blended."),
            ],
            outputs=[io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def validate_inputs(cls, solver_mode: str, steps: int) -> bool | str:
        # Naming these inputs turns off ComfyUI's own range/option checks for them, so all of it is checked here.
        if solver_mode not in MODES:
            return f"solver_mode: '{solver_mode}' is not one of {', '.join(MODES)}"
        if not 2 <= steps <= MAX_STEPS:
            return f"steps: {steps} is outside 2..{MAX_STEPS}"
        if solver_mode == "fast" and steps != FAST_MODE_STEPS:
            return (f"steps: {steps} does nothing in solver_mode fast, which always runs STAR's fixed "
                    f"{FAST_MODE_STEPS}-step schedule; set steps to {FAST_MODE_STEPS}, or solver_mode to normal to "
                    f"use {steps} steps")
        return True

    @classmethod
    def execute(cls, star_model, positive, negative, lr_latent, solver_mode: str, steps: int, cfg: float,
                rescale: float, denoise: float, chunk_length: int, chunk_overlap: int, fusion: str,
                diffusion_tile: int = 0) -> io.NodeOutput:
        host.geometry_of(lr_latent, "STAR Sampler lr_latent")
        seed = host.seed_of(lr_latent, "STAR Sampler lr_latent")
        with host.inputs_of("STAR Sampler"):
            settings = SamplerSettings(mode=solver_mode, steps=steps, cfg=cfg, rescale=rescale,
                                       t_max=t_max_for_denoise(denoise), chunk_len=chunk_length or AUTO,
                                       tile=(diffusion_tile, diffusion_tile) if diffusion_tile else AUTO,
                                       overlap=None if chunk_overlap < 0 else chunk_overlap, fusion=fusion)
        width = star_model.model.config.context_dim
        positive = host.conditioning_context(positive, "positive", width)
        negative = host.conditioning_context(negative, "negative", width)
        model_fn = host.model_function(star_model)
        latent = lr_latent["samples"].to(star_model.load_device)
        ctx = host.context(star_model.model)
        with ctx.scope():
            out = pipeline.sample(model_fn, latent, positive, negative, settings, RunNoise(seed), host=ctx)
        # the STAR keys (geometry, seed, the source for STAR Decode Video) travel on with the sampled latent
        return io.NodeOutput(host.star_keys(lr_latent) | {"samples": host.to_output(out)})
