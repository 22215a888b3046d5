"""STAR's VideoControlNet: a trainable copy of the encoder whose zero-conv outputs are added to the UNet skips."""
from __future__ import annotations

from types import ModuleType
from typing import Iterator

import torch
from torch import nn

from .config import STARConfig
from .embedding import build_time_embed
from .encoder import Conditioning, apply_layer, build_input_blocks, build_middle_block, make_conditioning, run_block


class VideoControlNet(nn.Module):
    """
    Encoder copy (own ``time_embed``, ``input_blocks``, ``middle_block``, LIEM included) plus one 1x1 ``zero_convs``
    per input block, ``middle_block_out`` and ``input_hint_block`` (3x3 conv of the LR latent, added right after
    the first conv of ``input_blocks.0``, before its temporal transformer).

    Parameters:
        config (`STARConfig`): architecture.
        operations (`module`): layer namespace.
        device, dtype: factory arguments.
        compute_dtype (`torch.dtype`, *optional*): dtype of the forward pass; default the parameter dtype.
    """

    def __init__(self, config: STARConfig, operations: ModuleType = nn, device=None, dtype=None,
                 compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.compute_dtype = compute_dtype
        self.dim = config.dim
        self.time_embed = build_time_embed(config.dim, config.embed_dim, operations, **kw)
        self.input_blocks, widths = build_input_blocks(config, operations, **kw)
        self.zero_convs = nn.ModuleList([nn.Sequential(operations.Conv2d(c, c, 1, **kw)) for c in widths])
        self.middle_block = build_middle_block(config, operations, **kw)
        width = config.dim * config.dim_mult[-1]
        self.middle_block_out = nn.Sequential(operations.Conv2d(width, width, 1, **kw))
        # Official hard-codes 320 output channels (= dim in the released config); dim is what keeps shapes valid.
        self.input_hint_block = operations.Conv2d(config.in_dim, config.dim, 3, padding=1, **kw)

    def residuals(self, x: torch.Tensor, hint: torch.Tensor | None, cond: Conditioning) -> Iterator[torch.Tensor]:
        """
        Yields the residuals one by one (one per input block, then the middle one), so a caller can consume each
        before the next is computed.

        Parameters:
            x (`torch.Tensor`): ``[(b·f), in_dim, H, W]`` noisy latent in frame-major layout.
            hint (`torch.Tensor`, *optional*): ``[(b·f), in_dim, H, W]`` LR latent, or ``None`` (no injection).
            cond (`Conditioning`): this network's own per-frame timestep embedding and the text context.
        """
        first = self.input_blocks[0]
        h = first[0](x)
        if hint is not None:
            h = h + self.input_hint_block(hint)
        for layer in first[1:]:
            h = apply_layer(layer, h, cond)
        yield self.zero_convs[0](h)
        for block, zero_conv in zip(self.input_blocks[1:], self.zero_convs[1:]):
            h = run_block(block, h, cond)
            yield zero_conv(h)
        for layer in self.middle_block:
            h = apply_layer(layer, h, cond)
        yield self.middle_block_out(h)

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype: ``compute_dtype`` if set, else the parameter dtype."""
        return self.compute_dtype or self.input_hint_block.weight.dtype

    def conditioning(self, t: torch.Tensor, context: torch.Tensor, frames: int) -> Conditioning:
        """This network's per-frame timestep embedding with the text context."""
        return make_conditioning(self.time_embed, self.dim, t, context, frames, self.dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                hint: torch.Tensor | None = None) -> list[torch.Tensor]:
        """
        All residuals at once (the official ``VideoControlNet.forward``).

        Parameters:
            x (`torch.Tensor`): ``[b, in_dim, f, H, W]``.
            t (`torch.Tensor`): ``[b]`` timesteps.
            context (`torch.Tensor`): ``[b, 77, context_dim]``.
            hint (`torch.Tensor`, *optional*): ``[b, in_dim, f, H, W]``.

        Returns:
            `list[torch.Tensor]`: one ``[(b·f), C, h, w]`` tensor per input block, then the middle-block residual.
        """
        b, c, f, hh, ww = x.shape
        dtype = self.dtype
        x = x.to(dtype).transpose(1, 2).reshape(b * f, c, hh, ww)
        if hint is not None:
            hint = hint.to(dtype).transpose(1, 2).reshape(b * f, c, hh, ww)
        return list(self.residuals(x, hint, self.conditioning(t, context, f)))
