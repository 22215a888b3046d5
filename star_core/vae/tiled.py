"""Tiled, windowed encode and decode over any per-tile VAE function, planned and blended by :mod:`star_core.windows`
(the ``fast`` tiling, and the temporal windows of every decode).

The tiles here are independent (each normalises with its own statistics and attends only to itself), so they
approximate the untiled VAE; `star_core.vae.exact` is the exact tiling (it runs inside one call of the functions
below, with ``tiling=None`` here).

Each tile is computed on its own and added, weighted, into one float32 accumulator on the caller's device, so the
working memory of the network is bounded by the tile (and window) size. A plan with a single tile and no temporal
overlap reproduces the untiled result exactly.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..windows import Grid, WindowPlan, blend_weights, plan_windows
from .base import ProgressCallback, SpatialTiling

# (latent window [n,C,h,w], n) -> pixels [n,3,h·f,w·f]
DecodeFn = Callable[[torch.Tensor, int], torch.Tensor]
# pixels [1,3,H,W] -> posterior moments [1,2C,H/f,W/f]
MomentsFn = Callable[[torch.Tensor], torch.Tensor]


def temporal_plan(frames: int, window: int, window_overlap: int) -> WindowPlan:
    """The decoder's temporal windows: consecutive ``window``-frame calls (official, the last may be shorter) when
    ``window_overlap`` is 0, else full windows spread evenly and cross-faded over at least ``window_overlap``."""
    return plan_windows(frames, window, window_overlap, "cut" if window_overlap == 0 else "linear")


def spatial_grid(height: int, width: int, tiling: SpatialTiling | None, factor: int, dims: tuple[int, int]) -> Grid:
    """Tiles over a latent-resolution ``height`` x ``width`` (tile and overlap given in pixels, ``factor`` px per
    latent cell); one tile covering everything when not tiling."""
    if tiling is None:
        return Grid((plan_windows(height, height), plan_windows(width, width)), dims)
    size, overlap = tiling.tile // factor, tiling.overlap // factor
    return Grid((plan_windows(height, size, overlap), plan_windows(width, size, overlap)), dims)


def decode_window(decode_fn: DecodeFn, z: torch.Tensor, factor: int, *, tiling: SpatialTiling | None = None,
                  callback: ProgressCallback | None = None) -> torch.Tensor:
    """Decodes one temporal window tile by tile.

    Parameters:
        decode_fn (`DecodeFn`): decodes ``[n,C,h,w]`` latents of ``n`` consecutive frames into pixels.
        z (`torch.Tensor`): ``[n,C,h,w]`` unscaled latent of the window's frames.
        factor (`int`): the VAE's spatial factor (8).
        tiling (`SpatialTiling`, *optional*): spatial tiles in output pixels; None decodes whole frames.
        callback (`ProgressCallback`, *optional*): ``callback(done, tiles)`` after each tile; raising interrupts.

    Returns:
        `torch.Tensor`: ``[n,3,h·factor,w·factor]`` float32 on ``z.device``.
    """
    count, height, width = z.shape[0], z.shape[2], z.shape[3]
    grid = spatial_grid(height, width, tiling, factor, (2, 3))
    pixels = Grid(tuple(_scaled(axis, factor) for axis in grid.axes), grid.dims)  # the same tiles in pixels
    out: torch.Tensor | None = None
    for done, index in enumerate(grid.indices(), start=1):
        (y0, y1), (x0, x1) = grid.spans(index)
        piece = decode_fn(z[:, :, y0:y1, x0:x1].contiguous(), count).to(z.device, torch.float32)
        if grid.is_single():
            out = piece
        else:
            if out is None:
                out = torch.zeros(count, piece.shape[1], height * factor, width * factor, device=z.device)
            pixels.accumulate(out, index, piece)
        if callback is not None:
            callback(done, len(grid))
    assert out is not None  # a grid has at least one tile
    return out if grid.is_single() else pixels.normalize(out)


def _scaled(plan: WindowPlan, factor: int) -> WindowPlan:
    """A latent-resolution tile plan at pixel resolution: the spans ×``factor``, ramped over the pixel overlaps."""
    spans = tuple((a * factor, b * factor) for a, b in plan.spans)
    return WindowPlan(plan.length * factor, spans, tuple(blend_weights(spans)))


def decode_windows(decode_fn: DecodeFn, latent: torch.Tensor, factor: int, *, window: int, window_overlap: int,
                   tiling: SpatialTiling | None = None, callback: ProgressCallback | None = None) -> torch.Tensor:
    """Decodes a latent video window by window (:func:`temporal_plan`) and tile by tile, blending overlaps.

    Parameters:
        decode_fn (`DecodeFn`): decodes ``[n,C,h,w]`` latents (already divided by the scaling factor) of ``n``
            consecutive frames into ``[n,3,h·factor,w·factor]`` pixels, mixing frames only inside the call.
        latent (`torch.Tensor`): ``[1,C,T,h,w]`` unscaled latent.
        factor (`int`): the VAE's spatial factor (8).
        window (`int`): frames per temporal-decoder call (official: 3).
        window_overlap (`int`): frames shared by neighbouring windows (official: 0).
        tiling (`SpatialTiling`, *optional*): spatial tiles in output pixels; None decodes whole frames.
        callback (`ProgressCallback`, *optional*): called after each tile with the video's tiles done and in all;
            raising interrupts the decode.

    Returns:
        `torch.Tensor`: ``[T,3,h·factor,w·factor]`` float32 on ``latent.device``.
    """
    z = latent[0].transpose(0, 1)  # [T,C,h,w]
    plan = temporal_plan(z.shape[0], window, window_overlap)

    def windows():
        for index, (start, stop) in enumerate(plan.spans):
            progress = None if callback is None else (
                lambda done, tiles, i=index: callback(i * tiles + done, len(plan) * tiles))
            yield decode_window(decode_fn, z[start:stop], factor, tiling=tiling, callback=progress)

    return torch.cat(list(plan.blend_stream(windows())))


def pad_to_multiple(frames: torch.Tensor, factor: int) -> torch.Tensor:
    """Replicates the last row/column so H and W become multiples of ``factor`` (no-op when they are)."""
    pad_h, pad_w = -frames.shape[2] % factor, -frames.shape[3] % factor
    if pad_h == 0 and pad_w == 0:
        return frames
    return F.pad(frames, (0, pad_w, 0, pad_h), mode="replicate")


def encode_moments(moments_fn: MomentsFn, frames: torch.Tensor, factor: int, *,
                   tiling: SpatialTiling | None = None, callback: ProgressCallback | None = None) -> torch.Tensor:
    """Encodes frames one at a time (the official chunk of 1), tile by tile, blending the posterior moments.

    Parameters:
        moments_fn (`MomentsFn`): pixels ``[1,3,H,W]`` → moments ``[1,2C,H/factor,W/factor]`` (mean ‖ logvar).
        frames (`torch.Tensor`): ``[T,3,H,W]`` in [-1, 1]; H and W not divisible by ``factor`` are padded by
            replicating the last row/column, so the latent is ``ceil(H/factor) × ceil(W/factor)``.
        factor (`int`): the VAE's spatial factor (8).
        tiling (`SpatialTiling`, *optional*): spatial tiles in input pixels; None encodes whole frames.
        callback (`ProgressCallback`, *optional*): called after each tile; raising interrupts the encode.

    Returns:
        `torch.Tensor`: ``[T,2C,h,w]`` float32 moments on ``frames.device``.
    """
    frames = pad_to_multiple(frames, factor)
    count, height, width = frames.shape[0], frames.shape[2] // factor, frames.shape[3] // factor
    grid = spatial_grid(height, width, tiling, factor, (1, 2))
    total, done = count * len(grid), 0
    out: torch.Tensor | None = None
    for t in range(count):
        for index in grid.indices():
            (y0, y1), (x0, x1) = grid.spans(index)
            moments = moments_fn(frames[t:t + 1, :, y0 * factor:y1 * factor, x0 * factor:x1 * factor])
            moments = moments[0].to(frames.device, torch.float32)
            if out is None:
                out = torch.zeros(count, moments.shape[0], height, width, device=frames.device)
            if grid.is_single():
                out[t] = moments
            else:
                grid.accumulate(out[t], index, moments)
            done += 1
            if callback is not None:
                callback(done, total)
        if not grid.is_single():
            grid.normalize(out[t])
    assert out is not None
    return out
