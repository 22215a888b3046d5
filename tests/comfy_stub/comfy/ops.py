"""Stub of `comfy.ops`: layer namespaces whose layers cast their weights to the input's dtype."""
from __future__ import annotations

import torch


class _Cast:
    comfy_cast_weights = True

    def _cast(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if getattr(self, "bias", None) is not None else None
        return w, b


class disable_weight_init:
    class Linear(torch.nn.Linear):
        comfy_cast_weights = False

    class Conv1d(torch.nn.Conv1d):
        comfy_cast_weights = False

    class Conv2d(torch.nn.Conv2d):
        comfy_cast_weights = False

    class Conv3d(torch.nn.Conv3d):
        comfy_cast_weights = False

    class GroupNorm(torch.nn.GroupNorm):
        comfy_cast_weights = False

    class LayerNorm(torch.nn.LayerNorm):
        comfy_cast_weights = False


class manual_cast(disable_weight_init):
    class Linear(_Cast, torch.nn.Linear):
        def forward(self, x):
            w, b = self._cast(x)
            return torch.nn.functional.linear(x, w, b)

    class Conv1d(_Cast, torch.nn.Conv1d):
        def forward(self, x):
            w, b = self._cast(x)
            return self._conv_forward(x, w, b)

    class Conv2d(_Cast, torch.nn.Conv2d):
        def forward(self, x):
            w, b = self._cast(x)
            return self._conv_forward(x, w, b)

    class Conv3d(_Cast, torch.nn.Conv3d):
        def forward(self, x):
            w, b = self._cast(x)
            return self._conv_forward(x, w, b)

    class GroupNorm(_Cast, torch.nn.GroupNorm):
        def forward(self, x):
            w, b = self._cast(x)
            return torch.nn.functional.group_norm(x, self.num_groups, w, b, self.eps)

    class LayerNorm(_Cast, torch.nn.LayerNorm):
        def forward(self, x):
            w, b = self._cast(x)
            return torch.nn.functional.layer_norm(x, self.normalized_shape, w, b, self.eps)


def pick_operations(weight_dtype, compute_dtype, load_device=None, disable_fast_fp8=False, fp8_optimizations=False, **kwargs):
    if weight_dtype == compute_dtype:
        return disable_weight_init
    return manual_cast
