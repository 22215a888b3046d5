"""Spatial and temporal transformers of the STAR UNet, with the LIEM gates inside their transformer block."""
from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from . import slicing
from .attention import attention
from .config import GROUPS
from .liem import SpatialLIEM, TemporalLIEM


def _rows_per_slice(tokens_per_row: int, width: int) -> int:
    """How many independent rows (frames or positions) of ``tokens_per_row`` tokens fit in one slice (the largest
    intermediate is the GEGLU projection: tokens x 8 x width)."""
    return slicing.rows_per_slice(tokens_per_row * width * 8)


class Attention(nn.Module):
    """
    Multi-head (cross-)attention with the official parameter names (``to_q/to_k/to_v`` without bias, ``to_out.0``).

    Parameters:
        query_dim (`int`): width of the tokens and of the output.
        heads (`int`): number of heads.
        head_dim (`int`): width of one head.
        context_dim (`int`, *optional*): width of the context tokens; ``None`` for self-attention.
        operations (`module`): layer namespace.
    """

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None,
                 operations: ModuleType = nn, device=None, dtype=None) -> None:
        super().__init__()
        inner = heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = operations.Linear(query_dim, inner, bias=False, device=device, dtype=dtype)
        self.to_k = operations.Linear(context_dim, inner, bias=False, device=device, dtype=dtype)
        self.to_v = operations.Linear(context_dim, inner, bias=False, device=device, dtype=dtype)
        # Index 1 of the official Sequential is a Dropout; keep the index so the key stays ``to_out.0``.
        self.to_out = nn.Sequential(operations.Linear(inner, query_dim, device=device, dtype=dtype), nn.Identity())

    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a context ``[N, Lc, context_dim]`` → two ``[N, Lc, heads * head_dim]``."""
        return self.to_k(context), self.to_v(context)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """
        ``x`` ``[N, L, query_dim]``; ``kv`` from `project_context` with one row per row of ``x``, or ``None`` for
        self-attention → ``[N, L, query_dim]``.
        """
        k, v = (self.to_k(x), self.to_v(x)) if kv is None else kv
        return self.to_out[0](attention(self.to_q(x), k, v, self.heads))


class GEGLU(nn.Module):
    """``a * gelu(b)`` (exact GELU) of the two halves of one projection; parameters ``proj.{weight,bias}``."""

    def __init__(self, dim_in: int, dim_out: int, operations: ModuleType = nn, device=None, dtype=None) -> None:
        super().__init__()
        self.proj = operations.Linear(dim_in, dim_out * 2, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward ``dim → 4·dim → dim`` (keys ``net.0.proj``, ``net.2``)."""

    def __init__(self, dim: int, operations: ModuleType = nn, device=None, dtype=None) -> None:
        super().__init__()
        inner = 4 * dim
        self.net = nn.Sequential(GEGLU(dim, inner, operations, device, dtype), nn.Identity(),
                                 operations.Linear(inner, dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _TransformerBlockBase(nn.Module):
    """Layers shared by both flavours of the official ``BasicTransformerBlock``."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None,
                 operations: ModuleType, device, dtype) -> None:
        super().__init__()
        self.attn1 = Attention(dim, heads, head_dim, None, operations, device, dtype)
        self.ff = FeedForward(dim, operations, device, dtype)
        self.attn2 = Attention(dim, heads, head_dim, context_dim, operations, device, dtype)
        self.norm1 = operations.LayerNorm(dim, device=device, dtype=dtype)
        self.norm2 = operations.LayerNorm(dim, device=device, dtype=dtype)
        self.norm3 = operations.LayerNorm(dim, device=device, dtype=dtype)


class SpatialTransformerBlock(_TransformerBlockBase):
    """
    Spatial flavour: the LIEM gate feeds only the self-attention input; the residual uses the ungated tokens.
    ``x = attn1(norm1(liem(x))) + x``; ``x = attn2(norm2(x), text) + x``; ``x = ff(norm3(x)) + x``.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int,
                 operations: ModuleType = nn, device=None, dtype=None) -> None:
        super().__init__(dim, heads, head_dim, context_dim, operations, device, dtype)
        self.local1 = SpatialLIEM(operations, device, dtype)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], h: int, w: int) -> torch.Tensor:
        """``x`` ``[N, h*w, C]`` (N frames), ``kv`` the projected text of each frame (``attn2.project_context``)."""
        n, _, c = x.shape
        gated = self.local1(x.transpose(1, 2).reshape(n, c, h, w)).flatten(2).transpose(1, 2)
        x = self.attn1(self.norm1(gated)) + x
        del gated
        x = self.attn2(self.norm2(x), kv) + x
        return self.ff(self.norm3(x)) + x


class TemporalTransformerBlock(_TransformerBlockBase):
    """
    Temporal flavour: two self-attentions over frames, each fed through its own LIEM gate.
    ``x = attn1(norm1(local1(x))) + x``; ``x = attn2(norm2(local2(x))) + x``; ``x = ff(norm3(x)) + x``.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, operations: ModuleType = nn, device=None, dtype=None) -> None:
        super().__init__(dim, heads, head_dim, None, operations, device, dtype)
        self.local1 = TemporalLIEM(operations, device, dtype)
        self.local2 = TemporalLIEM(operations, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[N, F, C]`` with N = b·h·w positions."""
        x = self.attn1(self.norm1(self.local1(x))) + x
        x = self.attn2(self.norm2(self.local2(x))) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """
    Per-frame transformer over the h·w tokens: ``GN(eps 1e-6) → proj_in (Linear) → block → proj_out (Linear) + x``.

    Parameters:
        channels (`int`): width (heads = ``channels // head_dim``).
        head_dim (`int`): width of one head.
        context_dim (`int`): width of the text context.
        operations (`module`): layer namespace.
    """

    def __init__(self, channels: int, head_dim: int, context_dim: int,
                 operations: ModuleType = nn, device=None, dtype=None) -> None:
        super().__init__()
        heads = channels // head_dim
        self.inner = inner = heads * head_dim
        self.norm = operations.GroupNorm(GROUPS, channels, eps=1e-6, device=device, dtype=dtype)
        self.proj_in = operations.Linear(channels, inner, device=device, dtype=dtype)
        self.transformer_blocks = nn.ModuleList(
            [SpatialTransformerBlock(inner, heads, head_dim, context_dim, operations, device, dtype)])
        self.proj_out = operations.Linear(inner, channels, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """
        ``x`` ``[(b·f), C, h, w]``, ``context`` ``[b, 77, context_dim]`` → same shape as ``x``. Frames are
        independent here (GroupNorm is per frame), so they are processed in slices of bounded memory.
        """
        n, c, h, w = x.shape
        block = self.transformer_blocks[0]
        # Project the text once per sample, not once per frame; each frame then indexes its sample's row.
        k, v = block.attn2.project_context(context)
        sample_of_frame = torch.arange(n, device=x.device) // (n // context.shape[0])
        out = torch.empty_like(x)
        step = _rows_per_slice(h * w, self.inner)
        for i in range(0, n, step):
            xs = x[i:i + step]
            rows = sample_of_frame[i:i + step]
            t = self.proj_in(self.norm(xs).flatten(2).transpose(1, 2))
            t = self.proj_out(block(t, (k[rows], v[rows]), h, w))
            out[i:i + step] = t.transpose(1, 2).reshape(-1, c, h, w) + xs
        return out


class TemporalTransformer(nn.Module):
    """
    Transformer over the F frames of every spatial position (batch b·h·w), no positional encoding:
    ``GN(eps 1e-6) → proj_in (Conv1d k=1) → block → proj_out (Conv1d k=1) + x`` on ``[b, C, F, h, w]``.

    Parameters:
        channels (`int`): width of the input.
        heads (`int`): number of heads; the inner width is ``heads * head_dim`` (may differ from ``channels``).
        head_dim (`int`): width of one head.
        operations (`module`): layer namespace.
    """

    def __init__(self, channels: int, heads: int, head_dim: int,
                 operations: ModuleType = nn, device=None, dtype=None) -> None:
        super().__init__()
        self.inner = inner = heads * head_dim
        self.norm = operations.GroupNorm(GROUPS, channels, eps=1e-6, device=device, dtype=dtype)
        self.proj_in = operations.Conv1d(channels, inner, 1, device=device, dtype=dtype)
        self.transformer_blocks = nn.ModuleList(
            [TemporalTransformerBlock(inner, heads, head_dim, operations, device, dtype)])
        self.proj_out = operations.Conv1d(inner, channels, 1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        ``x`` ``[b, C, F, h, w]`` → same shape. Positions are independent after the GroupNorm, so the b·h·w
        sequences go through the block in slices of bounded memory.
        """
        b, c, f, h, w = x.shape
        tokens = self.norm(x).permute(0, 3, 4, 1, 2).reshape(b * h * w, c, f)
        out = torch.empty_like(tokens)
        step = _rows_per_slice(f, self.inner)
        for i in range(0, tokens.shape[0], step):
            t = self.transformer_blocks[0](self.proj_in(tokens[i:i + step]).transpose(1, 2))
            out[i:i + step] = self.proj_out(t.transpose(1, 2))
        del tokens
        return out.reshape(b, h, w, c, f).permute(0, 3, 4, 1, 2) + x
