"""Encoder and middle block shared by the UNet and its ControlNet copy, and the per-layer dispatch."""
from __future__ import annotations

from types import ModuleType
from typing import NamedTuple

import torch
from torch import nn

from .config import STARConfig
from .embedding import sinusoidal_embedding
from .resblock import Downsample, ResBlock
from .transformer import SpatialTransformer, TemporalTransformer


class Conditioning(NamedTuple):
    """What the conditioned layers read besides the activations."""

    emb: torch.Tensor  # timestep embedding [(b·f), 4·dim]
    context: torch.Tensor  # text context [b, 77, context_dim] (the cross-attention shares each row across frames)
    batch: int  # b, to split (b·f) for the temporal layers


def make_conditioning(time_embed: nn.Module, dim: int, t: torch.Tensor, context: torch.Tensor,
                      frames: int, dtype: torch.dtype) -> Conditioning:
    """
    Embeds ``t`` and repeats it per frame (``(b f)`` order: frames of one sample together); casts the context.

    Parameters:
        time_embed (`nn.Module`): the timestep MLP.
        dim (`int`): sinusoid width.
        t (`torch.Tensor`): ``[b]`` timesteps.
        context (`torch.Tensor`): ``[b, 77, context_dim]``.
        frames (`int`): f.
        dtype (`torch.dtype`): compute dtype.
    """
    emb = time_embed(sinusoidal_embedding(t, dim).to(dtype))
    return Conditioning(emb.repeat_interleave(frames, dim=0), context.to(dtype), t.shape[0])


def apply_layer(layer: nn.Module, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """Runs one layer of a block on ``[(b·f), C, H, W]`` activations, giving it what its type needs."""
    if isinstance(layer, ResBlock):
        return layer(x, cond.emb, cond.batch)
    if isinstance(layer, SpatialTransformer):
        return layer(x, cond.context)
    if isinstance(layer, TemporalTransformer):
        n, c, h, w = x.shape
        x = layer(x.view(cond.batch, n // cond.batch, c, h, w).transpose(1, 2))
        return x.transpose(1, 2).reshape(n, c, h, w)
    return layer(x)


def run_block(block: nn.Module, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """Runs a block (a ModuleList of layers, or a single layer such as Downsample)."""
    if isinstance(block, nn.ModuleList):
        for layer in block:
            x = apply_layer(layer, x, cond)
        return x
    return apply_layer(block, x, cond)


def _attention_layers(config: STARConfig, width: int, ops: ModuleType, device, dtype) -> list[nn.Module]:
    return [SpatialTransformer(width, config.head_dim, config.context_dim, ops, device, dtype),
            TemporalTransformer(width, width // config.head_dim, config.head_dim, ops, device, dtype)]


def build_input_blocks(config: STARConfig, operations: ModuleType = nn, device=None,
                       dtype=None) -> tuple[nn.ModuleList, list[int]]:
    """
    The encoder: ``[Conv2d, TemporalTransformer]``, then per level ``num_res_blocks`` × ``[ResBlock(, ST, TT)]`` and
    a Downsample between levels.

    Returns:
        `tuple[nn.ModuleList, list[int]]`: the blocks and the output width of each (skip / zero-conv widths).
    """
    kw = {"device": device, "dtype": dtype}
    first_tt = TemporalTransformer(config.dim, config.num_heads, config.head_dim, operations, **kw)
    blocks = nn.ModuleList([nn.ModuleList([operations.Conv2d(config.in_dim, config.dim, 3, padding=1, **kw),
                                           first_tt])])
    widths = [config.dim]
    in_ch = config.dim
    last = len(config.dim_mult) - 1
    for level, mult in enumerate(config.dim_mult):
        out_ch = config.dim * mult
        for _ in range(config.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(in_ch, config.embed_dim, out_ch, operations, **kw)]
            if config.level_has_attention(level):
                layers += _attention_layers(config, out_ch, operations, device, dtype)
            blocks.append(nn.ModuleList(layers))
            widths.append(out_ch)
            in_ch = out_ch
        if level != last:
            blocks.append(Downsample(out_ch, operations, **kw))
            widths.append(out_ch)
    return blocks, widths


def build_middle_block(config: STARConfig, operations: ModuleType = nn, device=None, dtype=None) -> nn.ModuleList:
    """``[ResBlock, SpatialTransformer, TemporalTransformer, ResBlock]`` at the deepest width (always with attention)."""
    width = config.dim * config.dim_mult[-1]
    return nn.ModuleList([ResBlock(width, config.embed_dim, width, operations, device, dtype),
                          *_attention_layers(config, width, operations, device, dtype),
                          ResBlock(width, config.embed_dim, width, operations, device, dtype)])
