"""STAR Sampler: the LIEM-patched STAR UNet + ControlNet sampling an LR latent (DPM++ 2M SDE, CFG + rescale)."""
from __future__ import annotations

from comfy_api.latest import io

from star_core import pipeline
from star_core.diffusion.chunking import FUSIONS
from star_core.diffusion.schedule import MODES, t_max_for_denoise
from star_core.diffusion.star_sampling import SamplerSettings
from star_core.seeds import RunNoise
from star_core.spec import default

from . import host
from .types import STARModel


class STARSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="STARSampler",
            display_name="STAR Sampler",
            category=host.CATEGORY,
            description="Restores the LR latent with STAR: diffuse to the start level, then DPM++ 2M SDE with "
                        "classifier-free guidance + rescale, in temporal chunks for long videos.",
            inputs=[
                STARModel.Input("star_model", tooltip="From STAR Model Loader."),
                io.Conditioning.Input("positive", tooltip="Caption conditioning (STAR Text Encode positive)."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning (STAR Text Encode negative)."),
                io.Latent.Input("lr_latent", tooltip="From STAR LR Encode: the ControlNet hint and start point."),
                io.Int.Input("seed", default=default("seed"), min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the start noise and the SDE noise (official: 666)."),
                io.Combo.Input("solver_mode", options=list(MODES), default=default("sampler.mode"),
                               tooltip="fast: the official 14 model evaluations (steps ignored). normal: `steps` "
                                       "evenly spaced evaluations."),
                io.Int.Input("steps", default=default("sampler.steps"), min=2, max=1000,
                             tooltip="Model evaluations in normal mode (ignored in fast mode)."),
                io.Float.Input("cfg", default=default("sampler.cfg"), min=1.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (official 7.5; 1 skips the negative pass)."),
                io.Float.Input("rescale", default=default("sampler.rescale"), min=0.0, max=1.0, step=0.01,
                               tooltip="CFG rescale strength (official 0.2)."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="Fraction of STAR's 900 noise levels to start from (1.0 = official t=899); "
                                       "lower keeps more of the input."),
                io.Int.Input("chunk_length", default=default("sampler.chunk_len"), min=1, max=4096,
                             tooltip="Maximum latent frames per model call (official 32). Lower = less memory."),
                io.Int.Input("chunk_overlap", default=-1, min=-1, max=4096,
                             tooltip="Frames shared by neighbouring chunks; -1 = automatic (chunk_length // 4; "
                                     "the official fusion always uses half a chunk)."),
                io.Combo.Input("fusion", options=list(FUSIONS), default=default("sampler.fusion"),
                               tooltip="How overlapping chunks are joined: official hard cuts, or linear / hann "
                                       "cross-fades (smoother seams on long videos)."),
            ],
            outputs=[io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, star_model, positive, negative, lr_latent, seed: int, solver_mode: str, steps: int, cfg: float,
                rescale: float, denoise: float, chunk_length: int, chunk_overlap: int, fusion: str) -> io.NodeOutput:
        host.geometry_of(lr_latent, "STAR Sampler lr_latent")
        settings = SamplerSettings(mode=solver_mode, steps=steps, cfg=cfg, rescale=rescale,
                                   t_max=t_max_for_denoise(denoise), chunk_len=chunk_length,
                                   overlap=None if chunk_overlap < 0 else chunk_overlap, fusion=fusion)
        width = star_model.model.config.context_dim
        positive = host.conditioning_context(positive, "positive", width)
        negative = host.conditioning_context(negative, "negative", width)
        model_fn = host.model_function(star_model)
        latent = lr_latent["samples"].to(star_model.load_device)
        ctx = host.context()
        with ctx.scope():
            out = pipeline.sample(model_fn, latent, positive, negative, settings, RunNoise(seed), host=ctx)
        return io.NodeOutput({"samples": host.to_output(out), host.GEOMETRY_KEY: lr_latent[host.GEOMETRY_KEY]})
