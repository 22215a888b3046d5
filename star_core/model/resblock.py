"""Convolutional blocks of the STAR UNet: ResBlock with its temporal conv stack, Downsample, Upsample."""
from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from . import slicing
from .config import GROUPS


def run_conv(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """
    Calls a 2-D conv layer. On CPU, feature maps with fewer pixels than output channels bypass oneDNN: it would
    reorder a full copy of the weight on every call (118 MB for the widest decoder conv), more memory than the
    activations, while the plain path's per-image unfold buffer stays small and is as fast there.
    """
    if x.device.type != "cpu" or x.shape[-2] * x.shape[-1] >= layer.out_channels:
        return layer(x)
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        return layer(x)
    finally:
        torch.backends.mkldnn.enabled = previous


def _temporal_stage(channels: int, first: bool, operations: ModuleType, device, dtype) -> nn.Sequential:
    # Official layout: conv1 = [GN, SiLU, Conv3d]; conv2..4 = [GN, SiLU, Dropout, Conv3d] (key index 2 vs 3).
    layers = [operations.GroupNorm(GROUPS, channels, device=device, dtype=dtype), nn.SiLU()]
    if not first:
        layers.append(nn.Identity())
    layers.append(operations.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0), device=device, dtype=dtype))
    return nn.Sequential(*layers)


class TemporalConvBlock(nn.Module):
    """
    Four ``GN → SiLU → Conv3d(k=(3,1,1))`` stages over the frame axis plus identity (official
    ``TemporalConvBlock_v2``); operates on ``[b, C, F, h, w]``.
    """

    def __init__(self, channels: int, operations: ModuleType = nn, device=None, dtype=None) -> None:
        super().__init__()
        self.conv1 = _temporal_stage(channels, True, operations, device, dtype)
        self.conv2 = _temporal_stage(channels, False, operations, device, dtype)
        self.conv3 = _temporal_stage(channels, False, operations, device, dtype)
        self.conv4 = _temporal_stage(channels, False, operations, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv4(self.conv3(self.conv2(self.conv1(x))))
        return x + h


class ResBlock(nn.Module):
    """
    ``skip(x) + conv(SiLU(GN(conv(SiLU(GN(x))) + Linear(SiLU(emb)))))`` followed by the temporal conv block.

    Parameters:
        channels (`int`): input width.
        emb_channels (`int`): timestep-embedding width.
        out_channels (`int`): output width (a 1x1 ``skip_connection`` conv when it differs from ``channels``).
        operations (`module`): layer namespace.
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int,
                 operations: ModuleType = nn, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_layers = nn.Sequential(operations.GroupNorm(GROUPS, channels, **kw), nn.SiLU(),
                                       operations.Conv2d(channels, out_channels, 3, padding=1, **kw))
        self.emb_layers = nn.Sequential(nn.SiLU(), operations.Linear(emb_channels, out_channels, **kw))
        self.out_layers = nn.Sequential(operations.GroupNorm(GROUPS, out_channels, **kw), nn.SiLU(), nn.Identity(),
                                        operations.Conv2d(out_channels, out_channels, 3, padding=1, **kw))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else operations.Conv2d(channels, out_channels, 1, **kw))
        self.temopral_conv = TemporalConvBlock(out_channels, operations, device, dtype)  # sic: official key name

    def _spatial(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The per-frame part on ``x`` ``[n, C, H, W]`` with the projected embedding ``emb`` ``[n, out, 1, 1]``."""
        h = run_conv(self.in_layers[2], self.in_layers[1](self.in_layers[0](x)))
        h = h + emb.to(h.dtype)
        h = self.out_layers[1](self.out_layers[0](h))
        skip = x if isinstance(self.skip_connection, nn.Identity) else run_conv(self.skip_connection, x)
        return skip + run_conv(self.out_layers[3], h)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, batch: int) -> torch.Tensor:
        """
        ``x`` ``[(b·f), C, H, W]``, ``emb`` ``[(b·f), emb_channels]``, ``batch`` = b → ``[(b·f), out, H, W]``.
        Frames are independent until the temporal convs (GroupNorm is per frame), so large inputs go through the
        spatial part in frame slices of bounded memory (`star_core.model.slicing`).
        """
        emb = self.emb_layers(emb)[:, :, None, None]
        n, _, hh, ww = x.shape
        step = slicing.rows_per_slice(max(x.shape[1], emb.shape[1]) * hh * ww)
        if step >= n:
            h = self._spatial(x, emb)
        else:
            first = self._spatial(x[:step], emb[:step])
            h = first.new_empty(n, *first.shape[1:])
            h[:step] = first
            del first
            for i in range(step, n, step):
                h[i:i + step] = self._spatial(x[i:i + step], emb[i:i + step])
        n, c, hh, ww = h.shape
        f = n // batch
        h = h.view(batch, f, c, hh, ww).transpose(1, 2)
        h = self.temopral_conv(h)
        return h.transpose(1, 2).reshape(n, c, hh, ww)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with the official asymmetric padding (2, 1): H → ⌊(H+1)/2⌋+1, W → ⌊(W-1)/2⌋+1."""

    def __init__(self, channels: int, operations: ModuleType = nn, device=None, dtype=None) -> None:
        super().__init__()
        self.op = operations.Conv2d(channels, channels, 3, stride=2, padding=(2, 1), device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_conv(self.op, x)


class Upsample(nn.Module):
    """Nearest x2, then drop the first and last row (undoing the Downsample's extra rows), then a 3x3 conv."""

    def __init__(self, channels: int, operations: ModuleType = nn, device=None, dtype=None) -> None:
        super().__init__()
        self.conv = operations.Conv2d(channels, channels, 3, padding=1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")[..., 1:-1, :]
        return run_conv(self.conv, x)
