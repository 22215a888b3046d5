"""The one attention function every transformer in the model calls; hosts may replace it."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F

AttentionFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]

# Largest number of attention scores (batch * heads * Lq * Lk) one call may cover: bounds the memory of
# implementations that materialise the score matrix (and of the temporal attention's huge b*h*w batch).
MAX_SCORES_PER_CALL = 1 << 25


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """
    Multi-head attention through ``torch.nn.functional.scaled_dot_product_attention`` (scale ``1/sqrt(head_dim)``).

    Parameters:
        q (`torch.Tensor`): queries ``[B, Lq, heads * head_dim]``.
        k (`torch.Tensor`): keys ``[B, Lk, heads * head_dim]``.
        v (`torch.Tensor`): values ``[B, Lk, heads * head_dim]``.
        heads (`int`): number of heads the channel axis is split into.

    Returns:
        `torch.Tensor`: ``[B, Lq, heads * head_dim]``.
    """
    b, lq, inner = q.shape
    d = inner // heads
    q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, lq, inner)


_attention_function: ContextVar[AttentionFunction] = ContextVar("star_attention_function", default=sdpa_attention)


@contextmanager
def use_attention(fn: AttentionFunction | None) -> Iterator[None]:
    """
    Runs the enclosed code with another attention implementation (e.g. a host's optimised kernel). The choice is
    scoped to the current thread/context and undone on exit, so two hosts or runs never see each other's choice.

    Parameters:
        fn (`Callable[[q, k, v, heads], Tensor]` or `None`): same contract as `sdpa_attention`; ``None`` keeps SDPA.
    """
    token = _attention_function.set(sdpa_attention if fn is None else fn)
    try:
        yield
    finally:
        _attention_function.reset(token)


def get_attention_function() -> AttentionFunction:
    """Returns the attention implementation in use in the current context."""
    return _attention_function.get()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """
    Multi-head attention with the batch processed in slices of at most `MAX_SCORES_PER_CALL` scores.

    Parameters:
        q (`torch.Tensor`): ``[B, Lq, heads * head_dim]``.
        k (`torch.Tensor`): ``[B, Lk, heads * head_dim]``.
        v (`torch.Tensor`): ``[B, Lk, heads * head_dim]``.
        heads (`int`): number of heads.

    Returns:
        `torch.Tensor`: ``[B, Lq, heads * head_dim]``.
    """
    fn = _attention_function.get()
    b, lq, _ = q.shape
    per_item = heads * lq * k.shape[1]
    step = max(1, MAX_SCORES_PER_CALL // per_item)
    if b <= step:
        return fn(q, k, v, heads)
    out = q.new_empty(q.shape[0], lq, v.shape[2])
    for i in range(0, b, step):
        out[i:i + step] = fn(q[i:i + step], k[i:i + step], v[i:i + step], heads)
    return out
