"""``cast_ops``: a layer namespace that stores weights in one dtype and computes in the input's dtype.

Pass it as ``operations`` (with ``compute_dtype``) to keep bf16/fp16 weights in memory while computing in float32,
e.g. on CPUs without native bf16 matmuls. Each layer casts its own weights for the duration of its call, so only
one layer's converted copy exists at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _cast(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.to(like.dtype)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _cast(self.weight, x), _cast(self.bias, x))


class Conv1d(nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, _cast(self.weight, x), _cast(self.bias, x))


class Conv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, _cast(self.weight, x), _cast(self.bias, x))


class Conv3d(nn.Conv3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, _cast(self.weight, x), _cast(self.bias, x))


class GroupNorm(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, _cast(self.weight, x), _cast(self.bias, x), self.eps)


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, _cast(self.weight, x), _cast(self.bias, x), self.eps)


class cast_ops:  # noqa: N801 - used like the ``torch.nn`` namespace it stands in for
    """The namespace to pass as ``operations``."""

    Linear = Linear
    Conv1d = Conv1d
    Conv2d = Conv2d
    Conv3d = Conv3d
    GroupNorm = GroupNorm
    LayerNorm = LayerNorm
