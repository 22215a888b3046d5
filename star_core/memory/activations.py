"""Activation models: peak working memory of one UNet evaluation, one VAE call and the sampler state, in elements.

Each model is a few terms with a physical meaning, whose coefficients are fitted to measurements of the real
modules under ``FakeTensorMode`` (`star_core.memory.calibrate`, ``python bench/memory.py calibrate``) and stored in
`star_core.memory.coefficients`:

* UNet + ControlNet, one evaluation of ``n = batch·frames`` frames of ``h×w`` latent cells: the tensors that live
  across layers (skips, the ControlNet's residuals, a ResBlock's input and output) grow with ``n·h·w``; a
  transformer's working set is one slice of at most `star_core.model.slicing.SLICE_ELEMENTS` elements of its
  largest intermediate — or one frame's, when a single frame is bigger than that (large untiled latents). The peak
  sits either in a transformer (``per_cell·n·h·w + per_slice·S(n, h, w)``, ``S`` the largest slice the code will
  make, computed with the model's own slicing rule) or, once the slices are small beside the rest, where every
  frame's full-width maps are alive at once (``whole_per_cell·n·h·w``): the larger of the two, plus a constant.
* VAE: the SVD encoder runs one frame at a time, the temporal decoder a window of frames; both are linear in the
  pixels they see (a tile plus its halo when tiled), plus the whole-frame buffers an exact tiled VAE parks on the
  device between layers.
* Sampler: whole-video latent-sized tensors (the LR latent, the solver state and history, the fused x0), the
  chunk's tensors, and the torchsde Brownian tree's cache of latent-sized tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..model import slicing
from ..model.config import STARConfig


@dataclass(frozen=True)
class UNetCoefficients:
    """Fitted activation model of one STARUNet evaluation (elements; multiply by the compute dtype's size).

    Parameters:
        per_cell (`float`): elements per latent cell and frame while a transformer slice sets the peak.
        per_slice (`float`): elements per element of the largest transformer slice intermediate.
        whole_per_cell (`float`): elements per latent cell and frame where all frames' maps set the peak.
        constant (`float`): elements independent of the size.
    """

    per_cell: float
    per_slice: float
    whole_per_cell: float
    constant: float


@dataclass(frozen=True)
class VAECoefficients:
    """Fitted activation model of the SVD VAE (elements per pixel; multiply by the activation dtype's size).

    Parameters:
        encode_per_pixel (`float`): encoder working set per input pixel of the one frame it encodes.
        decode_per_pixel (`float`): decoder working set per output pixel and frame of its window.
        parked_per_pixel (`float`): whole-frame buffers per pixel (and frame) an exact tiled VAE parks on the
            device between layers (two full-resolution feature maps of the first level).
        constant (`float`): elements independent of the size.
    """

    encode_per_pixel: float
    decode_per_pixel: float
    parked_per_pixel: float
    constant: float


@dataclass(frozen=True)
class SamplerCoefficients:
    """Latent-sized fp32 tensors the sampler holds (counts of ``[1,4,F,h,w]`` tensors).

    Parameters:
        video_copies (`float`): whole-video tensors (LR latent / hint, start noise, x, x0, solver history, the
            fused x0 accumulator) besides the Brownian tree.
        chunk_copies (`float`): chunk-sized tensors per evaluation (the chunk's input, prediction, CFG outputs).
        brownian_copies (`float`): whole-video tensors cached by the torchsde Brownian tree (the official noise).
    """

    video_copies: float
    chunk_copies: float
    brownian_copies: float


def level_sizes(config: STARConfig, h: int, w: int) -> list[tuple[int, int]]:
    """Latent (height, width) at every resolution level of the network (the Downsample's size rule)."""
    sizes = [(h, w)]
    for _ in range(len(config.dim_mult) - 1):
        h, w = (h + 1) // 2 + 1, (w - 1) // 2 + 1
        sizes.append((h, w))
    return sizes


def largest_slice(config: STARConfig, batch: int, frames: int, h: int, w: int) -> int:
    """
    Elements of the largest intermediate any transformer slice creates in one evaluation (the GEGLU projection,
    ``8·inner`` per token), following the slicing rule of `star_core.model.transformer`: spatial transformers
    slice frames, temporal ones slice positions.

    Parameters:
        config (`STARConfig`): the architecture.
        batch (`int`), frames (`int`): the evaluation's batch and frame count.
        h (`int`), w (`int`): its latent size.
    """
    largest = 0
    for level, (lh, lw) in enumerate(level_sizes(config, h, w)):
        width = config.dim * config.dim_mult[level]
        inners = [width]
        if level == 0:
            inners.append(config.num_heads * config.head_dim)  # the first temporal transformer's own width
        if not config.level_has_attention(level) and level != len(config.dim_mult) - 1:
            continue  # the middle block (deepest level) always has attention
        tokens = lh * lw
        spatial_row = tokens * width * 8
        largest = max(largest, min(batch * frames, slicing.rows_per_slice(spatial_row)) * spatial_row)
        for inner in inners:
            temporal_row = frames * inner * 8
            largest = max(largest, min(batch * tokens, slicing.rows_per_slice(temporal_row)) * temporal_row)
    return largest


def unet_elements(coefficients: UNetCoefficients, config: STARConfig, batch: int, frames: int, h: int,
                  w: int) -> float:
    """
    Peak activation elements of one evaluation on ``[batch, 4, frames, h, w]`` (weights and inputs excluded).

    Parameters:
        coefficients (`UNetCoefficients`): the fit for `config`.
        config (`STARConfig`): the architecture.
        batch (`int`), frames (`int`), h (`int`), w (`int`): the evaluation's shape.
    """
    cells = batch * frames * h * w
    in_transformer = coefficients.per_cell * cells + coefficients.per_slice * largest_slice(config, batch, frames, h, w)
    return max(in_transformer, coefficients.whole_per_cell * cells) + coefficients.constant


def vae_encode_elements(coefficients: VAECoefficients, height: int, width: int, *, tile: int | None = None,
                        halo: int = 0, park_on_device: bool = True) -> float:
    """
    Peak activation elements of encoding one frame of ``height×width`` pixels (whole, or in exact tiles).

    Parameters:
        coefficients (`VAECoefficients`): the fit for the VAE.
        height (`int`), width (`int`): padded frame size in pixels.
        tile (`int`, *optional*): tile edge in pixels; None encodes the whole frame.
        halo (`int`): pixels a tile reads beyond its core on each side.
        park_on_device (`bool`): whole-frame buffers stay on the device between layers.
    """
    pixels, parked = _tile_pixels(height, width, tile, halo)
    return (coefficients.encode_per_pixel * pixels + (coefficients.parked_per_pixel * parked if park_on_device else 0)
            + coefficients.constant)


def vae_decode_elements(coefficients: VAECoefficients, frames: int, height: int, width: int, *,
                        tile: int | None = None, halo: int = 0, park_on_device: bool = True) -> float:
    """
    Peak activation elements of decoding a window of `frames` frames to ``height×width`` pixels.

    Parameters:
        coefficients (`VAECoefficients`): the fit for the VAE.
        frames (`int`): the window's frames.
        height (`int`), width (`int`): padded frame size in pixels.
        tile (`int`, *optional*), halo (`int`), park_on_device (`bool`): see `vae_encode_elements`.
    """
    pixels, parked = _tile_pixels(height, width, tile, halo)
    return frames * (coefficients.decode_per_pixel * pixels
                     + (coefficients.parked_per_pixel * parked if park_on_device else 0)) + coefficients.constant


def _tile_pixels(height: int, width: int, tile: int | None, halo: int) -> tuple[int, int]:
    """(pixels one tile's working set covers, pixels of the parked whole-frame buffers; 0 when untiled)."""
    if tile is None or (tile >= height and tile >= width):
        return height * width, 0
    return min(tile + 2 * halo, height) * min(tile + 2 * halo, width), height * width


def sampler_elements(coefficients: SamplerCoefficients, frames: int, chunk_frames: int, h: int, w: int, *,
                     brownian: bool = True) -> tuple[float, float]:
    """
    Elements of the sampler's own tensors (fp32): (whole-video part, chunk part).

    Parameters:
        coefficients (`SamplerCoefficients`): the fit.
        frames (`int`): the video's latent frames.
        chunk_frames (`int`): frames of the longest chunk.
        h (`int`), w (`int`): the latent size.
        brownian (`bool`): the torchsde Brownian tree supplies the noise (the official sampler).
    """
    latent = 4 * h * w
    video = coefficients.video_copies + (coefficients.brownian_copies if brownian else 0)
    return video * latent * frames, coefficients.chunk_copies * latent * chunk_frames
