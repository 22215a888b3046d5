"""Classifier-free guidance with STAR's std rescale."""
from __future__ import annotations

import torch


def cfg_rescale(cond: torch.Tensor, uncond: torch.Tensor, scale: float, rescale: float) -> torch.Tensor:
    """``uncond + scale·(cond - uncond)``, then pulled towards the std of ``cond`` by ``rescale``.

    The ratio ``std(cond) / (std(out) + 1e-12)`` is the unbiased std over all of C·F·H·W per batch item (computed on
    whatever frames the caller passes: one temporal chunk in the official chunked sampler), and the output is
    multiplied by ``rescale·ratio + (1 - rescale)``.

    Parameters:
        cond (`torch.Tensor`): prediction with the positive prompt, ``[B, ...]``.
        uncond (`torch.Tensor`): prediction with the negative prompt, same shape.
        scale (`float`): guidance scale (official 7.5).
        rescale (`float`): rescale strength in [0, 1] (official 0.2).
    """
    if not 0 <= rescale <= 1:
        raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
    out = uncond + scale * (cond - uncond)
    shape = (-1,) + (1,) * (cond.ndim - 1)
    ratio = (cond.flatten(1).std(dim=1) / (out.flatten(1).std(dim=1) + 1e-12)).view(shape)
    out *= rescale * ratio + (1 - rescale) * 1.0
    return out
