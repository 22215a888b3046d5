"""Timestep embedding of the STAR UNet: cos-first sinusoids followed by a two-layer MLP."""
from __future__ import annotations

from types import ModuleType

import torch
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """
    The official ``sinusoidal_embedding``: ``[cos(t·f), sin(t·f)]`` with ``f = 10000^(-i/half)``, in float32.

    Parameters:
        t (`torch.Tensor`): timesteps ``[N]`` (integer or float).
        dim (`int`): output width (an odd width gets one zero column).

    Returns:
        `torch.Tensor`: ``[N, dim]`` float32.
    """
    half = dim // 2
    t = t.float()
    # Same operation order as the official code (pow of a float32 ratio) so the result is bit-identical.
    freqs = torch.pow(10000, -torch.arange(half, device=t.device).to(t).div(half))
    args = torch.outer(t, freqs)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb


def build_time_embed(dim: int, embed_dim: int, operations: ModuleType = nn, device=None, dtype=None) -> nn.Sequential:
    """``Linear(dim, embed_dim) → SiLU → Linear(embed_dim, embed_dim)`` (keys ``time_embed.0`` / ``.2``)."""
    return nn.Sequential(operations.Linear(dim, embed_dim, device=device, dtype=dtype), nn.SiLU(),
                         operations.Linear(embed_dim, embed_dim, device=device, dtype=dtype))
