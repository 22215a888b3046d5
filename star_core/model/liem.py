"""STAR's Local Information Enhancement Modules: per-position sigmoid gates computed from channel max and mean."""
from __future__ import annotations

from types import ModuleType

import torch
from torch import nn


class SpatialLIEM(nn.Module):
    """
    CBAM-style spatial gate (official ``SpatialAttention``): ``x * sigmoid(conv7x7([max_c x, mean_c x]))``.

    Parameters:
        operations (`module`): layer namespace (``torch.nn`` or a host's cast ops).
        device, dtype: factory arguments of the weight (``conv1.weight [1, 2, 7, 7]``, no bias).
    """

    def __init__(self, operations: ModuleType = nn, device=None, dtype=None) -> None:
        super().__init__()
        self.conv1 = operations.Conv2d(2, 1, 7, padding=3, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[N, C, H, W]`` → same shape, gated."""
        stats = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv1(stats)) * x


class TemporalLIEM(nn.Module):
    """
    Temporal gate (official ``TemporalLocalAttention``): ``x * sigmoid(Linear(2→1)([max_c x, mean_c x]))``.
    It mixes nothing across frames: each (position, frame) token gets a scalar gate from its own channels.

    Parameters:
        operations (`module`): layer namespace.
        device, dtype: factory arguments of the weight (``conv1.weight [1, 2]``, no bias).
    """

    def __init__(self, operations: ModuleType = nn, device=None, dtype=None) -> None:
        super().__init__()
        self.conv1 = operations.Linear(2, 1, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[N, F, C]`` → same shape, gated."""
        stats = torch.cat([x.amax(dim=-1, keepdim=True), x.mean(dim=-1, keepdim=True)], dim=-1)
        return torch.sigmoid(self.conv1(stats)) * x
