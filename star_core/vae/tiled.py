"""Tiled, windowed encode and decode over any per-tile VAE function.

Each tile is computed on its own and added, weighted, into one float32 accumulator on the caller's device, so the
working memory of the network is bounded by the tile (and window) size; only the 3-channel output (or the
moments) of the whole video is held. Weights are feathered partitions of unity (`star_core.tiling`), so a
plan with a single tile and no temporal overlap reproduces the untiled result exactly.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..tiling import Span, feather_weights, plan_spans
from .base import ProgressCallback, SpatialTiling

# (latent window [n,C,h,w], n) -> pixels [n,3,h·f,w·f]
DecodeFn = Callable[[torch.Tensor, int], torch.Tensor]
# pixels [1,3,H,W] -> posterior moments [1,2C,H/f,W/f]
MomentsFn = Callable[[torch.Tensor], torch.Tensor]


def _axis_plan(length: int, tiling: SpatialTiling | None, factor: int) -> list[Span]:
    """Tile spans on one latent axis (the whole axis when not tiling)."""
    if tiling is None:
        return [(0, length)]
    return plan_spans(length, tiling.tile // factor, tiling.overlap // factor)


def _scaled(spans: list[Span], factor: int) -> list[Span]:
    return [(start * factor, stop * factor) for start, stop in spans]


def decode_windows(decode_fn: DecodeFn, latent: torch.Tensor, factor: int, *, window: int, window_overlap: int,
                   tiling: SpatialTiling | None = None, callback: ProgressCallback | None = None) -> torch.Tensor:
    """Decodes a latent video window by window and tile by tile, blending overlaps.

    Parameters:
        decode_fn (`DecodeFn`): decodes ``[n,C,h,w]`` latents (already divided by the scaling factor) of ``n``
            consecutive frames into ``[n,3,h·factor,w·factor]`` pixels, mixing frames only inside the call.
        latent (`torch.Tensor`): ``[1,C,T,h,w]`` unscaled latent.
        factor (`int`): the VAE's spatial factor (8).
        window (`int`): frames per temporal-decoder call (official: 3).
        window_overlap (`int`): frames shared by neighbouring windows (official: 0; then the last window may be
            shorter, as in the official code); overlapping windows are blended with linear feathering.
        tiling (`SpatialTiling`, *optional*): spatial tiles in output pixels; None decodes whole frames.
        callback (`ProgressCallback`, *optional*): called after each tile; raising interrupts the decode.

    Returns:
        `torch.Tensor`: ``[T,3,h·factor,w·factor]`` float32 on ``latent.device``.
    """
    frames, height, width = latent.shape[2], latent.shape[3], latent.shape[4]
    z = latent[0].transpose(0, 1)  # [T,C,h,w]
    windows = plan_spans(frames, window, window_overlap)
    rows, cols = _axis_plan(height, tiling, factor), _axis_plan(width, tiling, factor)
    time_w = feather_weights(windows, frames)
    row_w = feather_weights(_scaled(rows, factor), height * factor)
    col_w = feather_weights(_scaled(cols, factor), width * factor)
    total, done = len(windows) * len(rows) * len(cols), 0
    out: torch.Tensor | None = None
    for (t0, t1), wt in zip(windows, time_w):
        for (y0, y1), wy in zip(rows, row_w):
            for (x0, x1), wx in zip(cols, col_w):
                piece = decode_fn(z[t0:t1, :, y0:y1, x0:x1].contiguous(), t1 - t0)
                if out is None:
                    out = torch.zeros(frames, piece.shape[1], height * factor, width * factor,
                                      dtype=torch.float32, device=latent.device)
                weight = (wt[:, None, None, None] * wy[None, None, :, None] * wx[None, None, None, :])
                out[t0:t1, :, y0 * factor:y1 * factor, x0 * factor:x1 * factor] += (
                    piece.to(out.device, torch.float32) * weight.to(out.device))
                done += 1
                if callback is not None:
                    callback(done, total)
    assert out is not None  # plan_spans returns at least one span per axis
    return out


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
    rows, cols = _axis_plan(height, tiling, factor), _axis_plan(width, tiling, factor)
    row_w, col_w = feather_weights(rows, height), feather_weights(cols, width)
    total, done = count * len(rows) * len(cols), 0
    out: torch.Tensor | None = None
    for t in range(count):
        for (y0, y1), wy in zip(rows, row_w):
            for (x0, x1), wx in zip(cols, col_w):
                tile = frames[t:t + 1, :, y0 * factor:y1 * factor, x0 * factor:x1 * factor]
                moments = moments_fn(tile)
                if out is None:
                    out = torch.zeros(count, moments.shape[1], height, width, dtype=torch.float32,
                                      device=frames.device)
                weight = (wy[:, None] * wx[None, :]).to(out.device)
                out[t, :, y0:y1, x0:x1] += moments[0].to(out.device, torch.float32) * weight
                done += 1
                if callback is not None:
                    callback(done, total)
    assert out is not None
    return out
