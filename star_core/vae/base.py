"""The `VideoVAE` protocol the pipeline talks to, and the tiling options shared by every implementation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch


def validate_tile(name: str, tile: int, overlap: int, multiple: int = 8) -> None:
    """Checks a pixel tile size and overlap; raises ValueError naming the setting and the fix.

    Parameters:
        name (`str`): the setting's name as the user sees it (e.g. ``"decode tile"``).
        tile (`int`): tile edge in pixels; a positive multiple of ``multiple``.
        overlap (`int`): overlap in pixels; a multiple of ``multiple`` with ``0 <= overlap < tile``.
        multiple (`int`): the VAE's spatial factor (8 for the SVD VAE).
    """
    if tile <= 0 or tile % multiple:
        raise ValueError(f"{name} size {tile} px is invalid: use a positive multiple of {multiple} "
                         f"(e.g. {max(multiple, round(tile / multiple) * multiple)})")
    if overlap < 0 or overlap % multiple:
        raise ValueError(f"{name} overlap {overlap} px is invalid: use a multiple of {multiple} that is >= 0")
    if overlap >= tile:
        raise ValueError(f"{name} overlap {overlap} px must be smaller than the tile size {tile} px: "
                         f"lower the overlap (e.g. {tile // 4 // multiple * multiple}) or enlarge the tile")


# Progress/interrupt hook: called after each tile with (tiles done, tiles in total); raising aborts the call.
ProgressCallback = Callable[[int, int], None]

# The official decode: the SVD temporal decoder sees 3 frames at a time, windows do not overlap.
OFFICIAL_WINDOW = 3


TILING_MODES = ("exact", "fast")
PARK_CHOICES = ("auto", "device", "host")


@dataclass(frozen=True)
class SpatialTiling:
    """Spatial tiles in output pixels (decode) or input pixels (encode).

    Parameters:
        tile (`int`): tile edge in pixels, a positive multiple of 8 (the last row/column of tiles may be
            narrower).
        overlap (`int`): ``fast`` mode only: pixels shared by neighbouring tiles (multiple of 8, smaller than
            ``tile``), blended with linear ramps across the overlap (see `star_core.windows`).
        mode (`str`, *optional*, defaults to ``"exact"``): ``"exact"`` equals the untiled VAE up to float
            rounding: the tiles run in lockstep, every GroupNorm uses the statistics of the whole frame (window)
            and the mid-block attention attends over the whole frame (`star_core.vae.exact`); ``"fast"`` decodes
            independent overlapping tiles and blends them (less memory traffic, but each tile normalises with its
            own statistics: visibly different from untiled on non-uniform content).
        park (`str`, *optional*, defaults to ``"auto"``): ``exact`` mode only: where the full-frame activations
            wait between layers: ``"device"``, ``"host"`` (CPU memory; one host-device round trip per layer) or
            ``"auto"`` (on the device while it keeps room for a tile's working set).
    """

    tile: int
    overlap: int
    mode: str = "exact"
    park: str = "auto"

    def __post_init__(self) -> None:
        # exact tiles do not overlap (their halos follow from the network): the overlap matters to fast tiles only
        validate_tile("VAE tile", self.tile, self.overlap if self.mode == "fast" else 0)
        if self.mode not in TILING_MODES:
            raise ValueError(f"VAE tiling mode {self.mode!r} is invalid: use 'exact' (equals untiled) or 'fast' "
                             "(independent feathered tiles)")
        if self.park not in PARK_CHOICES:
            raise ValueError(f"VAE tiling park={self.park!r} is invalid: use 'auto', 'device' or 'host'")


class VideoVAE(Protocol):
    """A video VAE between pixel frames ``[T,3,H,W]`` in [-1, 1] and scaled latents ``[1,C,T,H/8,W/8]``."""

    scaling_factor: float
    latent_channels: int
    downscale: int

    def posterior(self, frames: torch.Tensor, *, tiling: SpatialTiling | None = None,
                  callback: ProgressCallback | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame posterior ``(mean, std)``, each ``[T,C,h,w]``, unscaled."""
        ...

    def encode(self, frames: torch.Tensor, eps: torch.Tensor | None = None, *, sample: bool = True,
               generator: torch.Generator | None = None, tiling: SpatialTiling | None = None,
               callback: ProgressCallback | None = None) -> torch.Tensor:
        """Frames → scaled latent ``[1,C,T,h,w]`` (posterior sample ``mean + std·eps``, or the mean)."""
        ...

    def decode(self, latent: torch.Tensor, window: int = OFFICIAL_WINDOW, window_overlap: int = 0, *,
               tiling: SpatialTiling | None = None, callback: ProgressCallback | None = None) -> torch.Tensor:
        """Scaled latent ``[1,C,T,h,w]`` → frames ``[T,3,h·8,w·8]`` (float32, not clamped)."""
        ...
