"""`estimate_peak`: the peak device memory of a run, per stage, from its plan and its components."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..diffusion.chunking import plan_chunks
from ..model.config import STARConfig
from . import coefficients as fitted
from .activations import (UNetCoefficients, VAECoefficients, sampler_elements, unet_elements, vae_decode_elements,
                          vae_encode_elements)
from .plan import Components, PlanSizes

GIB = 2**30


@dataclass(frozen=True)
class StagePeak:
    """
    The peak of one stage and what it is made of.

    Parameters:
        stage (`str`): ``"encode"``, ``"sample"`` or ``"decode"``.
        parts (`tuple[tuple[str, int], ...]`): (what, bytes) in order, e.g. ``("UNet weights", 4082243820)``.
    """

    stage: str
    parts: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        """Bytes of the stage's peak."""
        return sum(b for _, b in self.parts)


@dataclass(frozen=True)
class MemoryEstimate:
    """
    Estimated peak device memory of a run.

    Parameters:
        plan (`PlanSizes`): the plan it was estimated for.
        stages (`tuple[StagePeak, ...]`): encode, sample and decode peaks with their breakdown.
    """

    plan: PlanSizes
    stages: tuple[StagePeak, ...]

    @property
    def peak(self) -> int:
        """Bytes: the largest stage peak."""
        return max(stage.total for stage in self.stages)

    @property
    def peak_stage(self) -> StagePeak:
        """The stage that sets the peak."""
        return max(self.stages, key=lambda stage: stage.total)

    def stage(self, name: str) -> StagePeak:
        """The peak of stage `name`."""
        for stage in self.stages:
            if stage.stage == name:
                return stage
        raise KeyError(f"no stage {name!r}; stages are {[s.stage for s in self.stages]}")

    def describe(self) -> str:
        """Multi-line breakdown in GiB."""
        lines = [f"peak {self.peak / GIB:.2f} GiB ({self.peak_stage.stage}) for {self.plan.describe()}"]
        for stage in self.stages:
            parts = ", ".join(f"{name} {size / GIB:.2f}" for name, size in stage.parts if size)
            lines.append(f"  {stage.stage}: {stage.total / GIB:.2f} GiB = {parts}")
        return "\n".join(lines)


def _size(dtype: torch.dtype) -> int:
    return dtype.itemsize


def unet_coefficients(config: STARConfig) -> UNetCoefficients:
    """The fitted UNet activation model for `config`; other configs scale the released fit by width (approximate)."""
    for known, coefficients in fitted.UNET:
        if known == config:
            return coefficients
    released = dict(fitted.UNET)[STARConfig()]
    ratio = config.dim / STARConfig().dim
    return UNetCoefficients(released.per_cell * ratio, released.per_slice, released.whole_per_cell * ratio,
                            released.constant * ratio)


def vae_coefficients(widths: tuple[int, ...]) -> VAECoefficients:
    """The fitted VAE activation model for these ``block_out_channels``; others scale the SVD fit by width."""
    for known, coefficients in fitted.VAE:
        if tuple(known) == tuple(widths):
            return coefficients
    svd_widths, svd = fitted.VAE[0]
    ratio = widths[0] / svd_widths[0]
    return VAECoefficients(svd.encode_per_pixel * ratio, svd.decode_per_pixel * ratio, svd.parked_per_pixel * ratio,
                           svd.constant * ratio)


def longest_chunk(plan: PlanSizes) -> int:
    """Frames of the longest temporal chunk the sampler will evaluate (official windows reach 1.25·chunk_len)."""
    return _longest_chunk(plan.frames, plan.chunk_len, plan.fusion)


@lru_cache(maxsize=1024)
def _longest_chunk(frames: int, chunk_len: int, fusion: str) -> int:
    chunks = plan_chunks(frames, chunk_len, None, fusion)
    return max(end - start for start, end in chunks.spans)


def unet_activation_bytes(plan: PlanSizes, config: STARConfig | None = None) -> int:
    """Peak activation bytes of one denoiser evaluation of `plan` (the longest chunk, one tile, CFG batch)."""
    config = STARConfig() if config is None else config
    h, w = plan.eval_size
    batch = 2 if plan.batch_cfg else 1
    elements = unet_elements(unet_coefficients(config), config, batch, longest_chunk(plan), h, w)
    return int(elements * _size(plan.unet_compute_dtype))


def largest_layer(config: STARConfig) -> int:
    """Elements of the network's largest weight: the first decoder ResBlock's 3x3 conv (2C -> C at the deepest
    width C; 2560 -> 1280 in the released network, 29.5 M)."""
    width = config.dim * config.dim_mult[-1]
    return 2 * width * width * 9


def weight_copies(plan: PlanSizes, components: Components) -> int:
    """
    Bytes of the transient copy of one layer's weight in the compute dtype during its call (cast operations, when
    the compute dtype differs from the storage dtype), at the largest layer.
    """
    copies = plan.unet_compute_dtype != plan.unet_dtype
    return copies * largest_layer(components.unet_config) * _size(plan.unet_compute_dtype)


def _weights(plan: PlanSizes, components: Components, stage: str) -> list[tuple[str, int]]:
    unet = components.unet_params * _size(plan.unet_dtype)
    vae = components.vae_params * _size(plan.vae_dtype)
    text = components.text_params * _size(components.text_dtype)
    keep = {"sample": {"unet"}, "encode": {"vae"}, "decode": {"vae"}}[stage]
    if components.resident:
        keep = {"unet", "vae", "text"}
    return [("UNet weights", unet if "unet" in keep else 0), ("VAE weights", vae if "vae" in keep else 0),
            ("text encoder weights", text if "text" in keep else 0)]


STAGES = ("encode", "sample", "decode")


def stage_peak(plan: PlanSizes, stage: str, components: Components | None = None, *, overhead: int = 0,
               brownian: bool = True) -> StagePeak:
    """
    The peak of one stage of a run (see `estimate_peak`).

    Parameters:
        plan (`PlanSizes`): the run's sizes.
        stage (`str`): ``"encode"``, ``"sample"`` or ``"decode"``.
        components (`Components`, *optional*), overhead (`int`), brownian (`bool`): see `estimate_peak`.
    """
    components = Components() if components is None else components
    height, width = plan.pixel_size
    latent = 4 * plan.frames * plan.latent_h * plan.latent_w * 4  # one fp32 latent of the whole video
    extra = [("runtime overhead", overhead)] if overhead else []
    if stage == "encode":
        vae = vae_coefficients(components.vae_widths)
        encoder = vae_encode_elements(vae, height, width, tile=plan.encode_tile, halo=plan.vae_halo,
                                      park_on_device=plan.encode_park == "device") * _size(plan.vae_encode_dtype)
        parts = [("LR latent", latent), ("LR frames", plan.encode_window * 3 * height * width * 4),
                 ("VAE encoder activations", int(encoder))]
    elif stage == "sample":
        chunk = longest_chunk(plan)
        video, per_chunk = sampler_elements(fitted.SAMPLER, plan.frames, chunk, plan.latent_h, plan.latent_w,
                                            brownian=brownian)
        activations = unet_activation_bytes(plan, components.unet_config)
        copies = weight_copies(plan, components)  # at the deepest layers, where activations are small
        parts = [("sampler state", int(video * 4) if plan.state_on_device else 0),
                 ("chunk tensors", int(per_chunk * 4) * (2 if plan.batch_cfg else 1)),
                 ("UNet activations", activations) if activations >= copies else ("UNet weight copies", copies)]
    elif stage == "decode":
        vae = vae_coefficients(components.vae_widths)
        window = min(plan.decode_window, plan.frames)
        decoder = vae_decode_elements(vae, window, height, width, tile=plan.decode_tile, halo=plan.vae_halo,
                                      park_on_device=plan.decode_park == "device") * _size(plan.vae_decode_dtype)
        parts = [("latent", latent), ("decoded window", window * 3 * height * width * 4),
                 ("VAE decoder activations", int(decoder))]
    else:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    return StagePeak(stage, tuple(_weights(plan, components, stage) + parts + extra))


def estimate_peak(plan: PlanSizes, components: Components | None = None, *, overhead: int = 0,
                  brownian: bool = True) -> MemoryEstimate:
    """
    Estimates the peak device memory of a run: the weights that are resident, plus, per stage, its own tensors:

    * encode: the LR latent, one window of LR frames, the encoder's activations for one frame (or one tile);
    * sample: the sampler state (whole-video latents, the Brownian tree's cache) when it lives on the device, the
      chunk's tensors, and one evaluation's activations (longest chunk × one tile × CFG batch) or, when larger, the
      transient copies of the largest layer's weight (`weight_copies`);
    * decode: the sampled latent, one window of decoded frames, the decoder's activations for one window (or tile).

    Parameters:
        plan (`PlanSizes`): the run's sizes.
        components (`Components`, *optional*): the models (default: the released ones, all resident).
        overhead (`int`): bytes to add to every stage (e.g. a process's own memory when comparing with RSS).
        brownian (`bool`): the sampler's noise comes from the torchsde Brownian tree (the official sampler).

    Returns:
        `MemoryEstimate`: per-stage peaks with their breakdown; ``.peak`` is the run's peak in bytes.
    """
    return MemoryEstimate(plan, tuple(stage_peak(plan, stage, components, overhead=overhead, brownian=brownian)
                                      for stage in STAGES))
