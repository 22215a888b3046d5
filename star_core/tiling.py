"""Overlapping 1-D span plans and feathered partition-of-unity weights.

A span plan splits one axis (image rows, image columns or frames) into windows; the feather weights blend the
windows' outputs back together. The same two functions serve spatial tiles (one plan per axis, weights as an
outer product) and temporal windows (one plan over frames).
"""
from __future__ import annotations

import math

import torch

Span = tuple[int, int]


def plan_spans(length: int, size: int, overlap: int) -> list[Span]:
    """Splits ``range(length)`` into windows of at most ``size`` elements.

    With ``overlap == 0`` the windows are consecutive chunks and the last one may be shorter (the official STAR
    3-frame VAE decode). With ``overlap > 0`` every window has exactly ``min(size, length)`` elements and
    neighbours share at least ``overlap`` elements; the starts are spread evenly so the first window begins at 0
    and the last ends at ``length``.

    Parameters:
        length (`int`): number of elements on the axis (≥ 1).
        size (`int`): window length (≥ 1).
        overlap (`int`): minimum number of elements shared by neighbouring windows (0 ≤ overlap < size).

    Returns:
        `list[tuple[int, int]]`: half-open ``(start, stop)`` windows in increasing order, covering the axis.
    """
    if length < 1:
        raise ValueError(f"plan_spans: length must be >= 1, got {length}")
    if size < 1:
        raise ValueError(f"plan_spans: size must be >= 1, got {size}")
    if not 0 <= overlap < size:
        raise ValueError(f"plan_spans: overlap must satisfy 0 <= overlap < size, got overlap={overlap}, size={size}")
    if overlap == 0:
        return [(start, min(start + size, length)) for start in range(0, length, size)]
    if size >= length:
        return [(0, length)]
    count = math.ceil((length - overlap) / (size - overlap))
    return [(round(i * (length - size) / (count - 1)), round(i * (length - size) / (count - 1)) + size)
            for i in range(count)]


def feather_weights(spans: list[Span], length: int) -> list[torch.Tensor]:
    """Per-window blending weights that sum to exactly one at every position of the axis.

    Inside the region a window shares with a neighbour its raw weight ramps linearly towards that neighbour
    (sampled at element centres, so it never reaches zero); elsewhere, and at both ends of the axis, it is 1.
    Normalising by the sum over windows makes the weights a partition of unity, so blending identical window
    outputs reproduces them exactly and no position is ever weighted zero.

    Parameters:
        spans (`list[tuple[int, int]]`): windows from `plan_spans` (sorted, covering ``range(length)``).
        length (`int`): number of elements on the axis.

    Returns:
        `list[torch.Tensor]`: one float32 vector of length ``stop - start`` per window.
    """
    raw = []
    for i, (start, stop) in enumerate(spans):
        position = torch.arange(start, stop, dtype=torch.float64) + 0.5
        weight = torch.ones(stop - start, dtype=torch.float64)
        if i > 0 and spans[i - 1][1] > start:
            weight = torch.minimum(weight, (position - start) / (spans[i - 1][1] - start))
        if i + 1 < len(spans) and spans[i + 1][0] < stop:
            weight = torch.minimum(weight, (stop - position) / (stop - spans[i + 1][0]))
        raw.append(weight)
    total = torch.zeros(length, dtype=torch.float64)
    for (start, stop), weight in zip(spans, raw):
        total[start:stop] += weight
    if bool((total <= 0).any()):
        raise ValueError(f"feather_weights: spans {spans} do not cover range({length})")
    return [(weight / total[start:stop]).float() for (start, stop), weight in zip(spans, raw)]


def validate_tile(name: str, tile: int, overlap: int, multiple: int = 8) -> None:
    """Checks a pixel tile size and overlap; raises ValueError naming the setting and the fix.

    Parameters:
        name (`str`): the setting's name as the user sees it (e.g. ``"decode tile"``).
        tile (`int`): tile edge in pixels; a positive multiple of ``multiple``.
        overlap (`int`): overlap in pixels; a multiple of ``multiple`` with ``0 <= overlap < tile``.
        multiple (`int`): the VAE's spatial factor (8 for the SVD VAE).
    """
    if tile <= 0 or tile % multiple:
        raise ValueError(f"{name} size {tile} px is invalid: use a positive multiple of {multiple} "
                         f"(e.g. {max(multiple, round(tile / multiple) * multiple)})")
    if overlap < 0 or overlap % multiple:
        raise ValueError(f"{name} overlap {overlap} px is invalid: use a multiple of {multiple} that is >= 0")
    if overlap >= tile:
        raise ValueError(f"{name} overlap {overlap} px must be smaller than the tile size {tile} px: "
                         f"lower the overlap (e.g. {tile // 4 // multiple * multiple}) or enlarge the tile")
