"""The `VideoVAE` protocol the pipeline talks to, and the tiling options shared by every implementation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..tiling import validate_tile

# Progress/interrupt hook: called after each tile with (tiles done, tiles in total); raising aborts the call.
ProgressCallback = Callable[[int, int], None]

# The official decode: the SVD temporal decoder sees 3 frames at a time, windows do not overlap.
OFFICIAL_WINDOW = 3


@dataclass(frozen=True)
class SpatialTiling:
    """Spatial tiles in output pixels (decode) or input pixels (encode).

    Parameters:
        tile (`int`): tile edge in pixels, a positive multiple of 8.
        overlap (`int`, *optional*, defaults to 32): pixels shared by neighbouring tiles (multiple of 8,
            smaller than ``tile``); the tiles are blended with linear feathering across the overlap.
    """

    tile: int
    overlap: int = 32

    def __post_init__(self) -> None:
        validate_tile("VAE tile", self.tile, self.overlap)


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
