"""Every window plan and blend of the project, in one place.

One axis (frames of a latent, rows or columns of an image or latent) is cut into windows; each window is processed
on its own and the outputs are blended back with per-position weights: ``blend = Σ wᵢ·outᵢ / Σ wᵢ``. The same plan
serves the temporal chunks of the sampler, the temporal windows of the VAE decoder, the spatial tiles of the VAE
and the spatial tiles of the diffusion model. A :class:`Grid` is the product of several 1-D plans (tiles = rows ×
columns; a sampler evaluation = chunks × rows × columns) and one window of it is a tuple of spans.

Fusions (how a 1-D plan places its windows and weights them):

* ``"cut"`` — consecutive windows of ``size``, the last one may be shorter, weights 1 (no overlap). The official
  VAE decode (3-frame windows).
* ``"official"`` — the official ``make_chunks(F, 0, L)`` windows (overlap ⌈L/2⌉, the last window absorbs up to
  1.25·L) with hard cuts in the middle of each overlap (weights 0/1). The official temporal chunking, bit for bit.
* ``"linear"`` / ``"hann"`` — the fewest windows of exactly ``size`` elements that overlap by at least
  ``overlap``, spread evenly from the first to the last element; over each overlap the right-hand window's weight
  rises along ``k/(O+1)`` (``k = 1..O``; hann: ``sin²(π/2 · k/(O+1))``) and the left-hand one's falls by the
  complement. Weights are therefore never zero inside the axis, not even at a window's first or last element.

Blending divides by the per-position weight sum, so a window covering the whole axis reproduces its output exactly
and a ``cut`` plan reproduces concatenation exactly.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

Span = tuple[int, int]
FUSIONS = ("cut", "official", "linear", "hann")
# The fusions a user may pick for overlapping windows (the sampler's chunks, the decoder's windows, tiles).
BLENDS = ("linear", "hann")


def _check_int(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class WindowPlan:
    """
    Windows over one axis and the raw weight of every element of each window.

    Parameters:
        length (`int`): number of elements on the axis.
        spans (`tuple[tuple[int, int], ...]`): half-open windows in increasing order that cover ``[0, length)``.
        weights (`tuple[torch.Tensor, ...]`): float32 weights ``[stop - start]`` per window, ≥ 0, with a positive
            sum at every position.
    """

    length: int
    spans: tuple[Span, ...]
    weights: tuple[torch.Tensor, ...]

    def __len__(self) -> int:
        return len(self.spans)

    def weight_sum(self) -> torch.Tensor:
        """Per-position sum of the window weights, ``[length]`` float32."""
        total = torch.zeros(self.length)
        for (start, stop), weight in zip(self.spans, self.weights):
            total[start:stop] += weight
        return total

    def _view(self, weight: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
        shape = [1] * like.ndim
        shape[dim] = -1
        return weight.to(like).view(shape)

    def accumulate(self, acc: torch.Tensor, index: int, out: torch.Tensor, dim: int) -> None:
        """Adds window ``index``'s output (``out``, the window's extent along ``dim``) into ``acc`` with its weights."""
        start, stop = self.spans[index]
        acc.narrow(dim, start, stop - start).add_(out * self._view(self.weights[index], out, dim))

    def normalize(self, acc: torch.Tensor, dim: int) -> torch.Tensor:
        """Divides an accumulator filled by :meth:`accumulate` for every window by the weight sum (in place)."""
        return acc.div_(self._view(self.weight_sum(), acc, dim))

    def final_before(self, index: int) -> int:
        """Positions below this are complete once windows ``0..index`` are accumulated."""
        return self.spans[index + 1][0] if index + 1 < len(self.spans) else self.length

    def blend_stream(self, outputs: Iterable[torch.Tensor], dim: int = 0) -> Iterator[torch.Tensor]:
        """
        Blends window outputs given in plan order and yields the finished, normalised positions in order as soon as
        no later window covers them; only the overlap still open is held.

        Parameters:
            outputs (`Iterable[torch.Tensor]`): one tensor per window, the window's extent along ``dim``.
            dim (`int`): the axis of the plan in the outputs.

        Yields:
            `torch.Tensor`: consecutive pieces along ``dim`` that together cover ``[0, length)``.
        """
        if all(len(w) and bool((w == 1).all()) for w in self.weights) and all(
                a[1] == b[0] for a, b in zip(self.spans, self.spans[1:])):
            yield from outputs  # consecutive unit-weight windows: the blend is the concatenation
            return
        total = self.weight_sum()
        pending: torch.Tensor | None = None
        pending_start = 0  # axis position of pending's first element
        for index, out in enumerate(outputs):
            start, stop = self.spans[index]
            weighted = out * self._view(self.weights[index], out, dim)
            if pending is None:
                pending, pending_start = weighted, start
            else:
                held = pending.shape[dim]
                shared = pending_start + held - start
                pending.narrow(dim, held - shared, shared).add_(weighted.narrow(dim, 0, shared))
                pending = torch.cat([pending, weighted.narrow(dim, shared, weighted.shape[dim] - shared)], dim)
            ready = self.final_before(index) - pending_start
            if ready > 0:
                piece = pending.narrow(dim, 0, ready)
                yield piece / self._view(total[pending_start:pending_start + ready], piece, dim)
                pending = pending.narrow(dim, ready, pending.shape[dim] - ready)
                pending_start += ready
        if pending_start != self.length:
            raise ValueError(f"blend_stream: got outputs up to position {pending_start}, the plan has {self.length}")


def official_overlap(size: int) -> int:
    """Overlap of the official ``make_chunks(F, 0, L)``: ``int((L/2 - 1)//1 + 1)`` (L/2 for even L)."""
    return int((size * 0.5 - 1) // 1 + 1)


def official_spans(length: int, size: int) -> list[Span]:
    """Windows of the official ``make_chunks(F, 0, L)`` / ``sliding_windows_1d``, including its quirks.

    The last window absorbs up to 1.25·L frames. For ``L < F <= 1.25·L`` this is a single window ``(0, F)``, on which
    the official stitching crashes; :func:`plan_windows` replaces that case.
    """
    stride = size - official_overlap(size)
    spans, start = [], 0
    while start < length:
        if start + size * 1.25 >= length:
            spans.append((start, length))
            break
        spans.append((start, start + size))
        start += stride
    return spans


def _hard_cut_weights(spans: list[Span]) -> list[torch.Tensor]:
    # Official stitching: with O = overlap and cut = O//2, the first window keeps [:len-O+cut], middle ones
    # [cut:len-O+cut], the last [cut:].
    overlap = spans[0][1] - spans[1][0]
    cut = overlap // 2
    weights = []
    for i, (start, stop) in enumerate(spans):
        size = stop - start
        weight = torch.zeros(size)
        keep_to = size if i == len(spans) - 1 else size - overlap + cut
        weight[0 if i == 0 else cut:keep_to] = 1.0
        weights.append(weight)
    return weights


def ramp(overlap: int, fusion: str) -> torch.Tensor:
    """Rising weights of the right-hand window over an overlap of ``overlap`` elements, strictly inside (0, 1)."""
    u = torch.arange(1, overlap + 1, dtype=torch.float64) / (overlap + 1)
    rising = u if fusion == "linear" else torch.sin(u * (math.pi / 2)) ** 2
    return rising.float()


def blend_weights(spans: Sequence[Span], fusion: str = "linear") -> list[torch.Tensor]:
    """The ``"linear"``/``"hann"`` weights of windows at the given spans (each overlap ramped, see the module
    docstring), e.g. for a plan's spans scaled to a finer resolution."""
    weights = [torch.ones(stop - start) for start, stop in spans]
    for i in range(len(spans) - 1):
        (start_a, stop_a), (start_b, _) = spans[i], spans[i + 1]
        overlap = stop_a - start_b
        if overlap <= 0:
            continue
        rising = ramp(overlap, fusion)
        weights[i][start_b - start_a:] *= 1 - rising
        weights[i + 1][:overlap] *= rising
    return weights


def plan_windows(length: int, size: int, overlap: int | None = 0, fusion: str = "linear") -> WindowPlan:
    """
    Windows of at most ``size`` elements over ``range(length)`` and their blending weights.

    ``length <= size`` always gives the single window ``(0, length)``. See the module docstring for the fusions.
    For ``"official"`` with ``L < F <= 1.25·L``, where the official code raises IndexError, the plan is
    ``(0, L), (L - overlap, F)`` with the same stitching rule.

    Parameters:
        length (`int`): number of elements (≥ 1).
        size (`int`): window length (≥ 1).
        overlap (`int`, *optional*): minimum elements shared by neighbours for ``"linear"``/``"hann"``, in
            ``[0, size)``; ``None`` means ``size // 4``. Must be 0 (or None) for ``"cut"`` and the official value
            (or None) for ``"official"``.
        fusion (`str`): ``"cut"``, ``"official"``, ``"linear"`` or ``"hann"``.

    Returns:
        `WindowPlan`
    """
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    _check_int("length", length, 1)
    _check_int("window size", size, 1)
    if fusion == "official":
        if overlap is not None and overlap != official_overlap(size):
            raise ValueError(f"overlap={overlap}: the official plan always overlaps by {official_overlap(size)} "
                             f"frames for a chunk length of {size}; leave the overlap automatic or use a "
                             "'linear'/'hann' fusion")
        overlap = official_overlap(size)
    elif fusion == "cut":
        if overlap not in (None, 0):
            raise ValueError(f"overlap={overlap}: 'cut' windows do not overlap; use a 'linear'/'hann' fusion")
        overlap = 0
    elif overlap is None:
        overlap = size // 4
    if not isinstance(overlap, int) or isinstance(overlap, bool) or not 0 <= overlap < size:
        raise ValueError(f"overlap must be an integer in [0, {size}) (smaller than the window), got {overlap!r}")
    if length <= size:
        return WindowPlan(length, ((0, length),), (torch.ones(length),))
    if fusion == "cut":
        spans = [(start, min(start + size, length)) for start in range(0, length, size)]
        return WindowPlan(length, tuple(spans), tuple(torch.ones(b - a) for a, b in spans))
    if fusion == "official":
        spans = official_spans(length, size)
        if len(spans) == 1:
            spans = [(0, size), (size - overlap, length)]
        return WindowPlan(length, tuple(spans), tuple(_hard_cut_weights(spans)))
    count = math.ceil((length - overlap) / (size - overlap))
    span = length - size
    starts = [(i * span + (count - 1) // 2) // (count - 1) for i in range(count)]
    spans = [(start, start + size) for start in starts]
    return WindowPlan(length, tuple(spans), tuple(blend_weights(spans, fusion)))


@dataclass(frozen=True)
class Grid:
    """
    The product of 1-D plans over several axes of a tensor: one window = one span per axis, visited with the first
    axis outermost (so a grid over frames × rows × columns finishes frames in order).

    Parameters:
        axes (`tuple[WindowPlan, ...]`): one plan per axis.
        dims (`tuple[int, ...]`): the tensor dimension each plan applies to.
    """

    axes: tuple[WindowPlan, ...]
    dims: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.axes) != len(self.dims) or not self.axes:
            raise ValueError("Grid needs one dim per axis plan")

    def __len__(self) -> int:
        return math.prod(len(axis) for axis in self.axes)

    @property
    def shape(self) -> tuple[int, ...]:
        """Windows per axis."""
        return tuple(len(axis) for axis in self.axes)

    def indices(self) -> Iterator[tuple[int, ...]]:
        """Every window as a tuple of per-axis window indices, first axis outermost."""
        return itertools.product(*(range(len(axis)) for axis in self.axes))

    def spans(self, index: Sequence[int]) -> tuple[Span, ...]:
        """The per-axis spans of one window."""
        return tuple(axis.spans[i] for axis, i in zip(self.axes, index))

    def slice(self, tensor: torch.Tensor, index: Sequence[int]) -> torch.Tensor:
        """The part of ``tensor`` one window covers (a view)."""
        for dim, (start, stop) in zip(self.dims, self.spans(index)):
            tensor = tensor.narrow(dim, start, stop - start)
        return tensor

    def _weight(self, index: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        weight = torch.ones([1] * like.ndim)
        for axis, dim, i in zip(self.axes, self.dims, index):
            shape = [1] * like.ndim
            shape[dim] = -1
            weight = weight * axis.weights[i].view(shape)
        return weight.to(like)

    def accumulate(self, acc: torch.Tensor, index: Sequence[int], out: torch.Tensor) -> None:
        """Adds one window's output into ``acc`` (the full extent on every axis of the grid) with its weights."""
        self.slice(acc, index).add_(out * self._weight(index, out))

    def normalize(self, acc: torch.Tensor) -> torch.Tensor:
        """Divides an accumulator filled for every window by the per-position weight sum (in place)."""
        for axis, dim in zip(self.axes, self.dims):
            acc = axis.normalize(acc, dim)
        return acc

    def is_single(self) -> bool:
        """True when the grid is one window covering everything."""
        return len(self) == 1

    def part(self, dims: Sequence[int]) -> "Grid | None":
        """The grid of this grid's axes on ``dims`` only (e.g. the spatial tiles of a chunks × tiles grid); None
        when it has no axis there."""
        kept = [(axis, dim) for axis, dim in zip(self.axes, self.dims) if dim in dims]
        return Grid(tuple(a for a, _ in kept), tuple(d for _, d in kept)) if kept else None


def plan_tiles(sizes: Sequence[int], tile: Sequence[int], overlap: Sequence[int], dims: Sequence[int],
               fusion: str = "linear") -> Grid:
    """
    Overlapping tiles over several axes (e.g. latent rows and columns), each axis planned by :func:`plan_windows`.

    Parameters:
        sizes (`Sequence[int]`): axis lengths.
        tile (`Sequence[int]`): tile length per axis (clipped to the axis).
        overlap (`Sequence[int]`): minimum overlap per axis.
        dims (`Sequence[int]`): tensor dimension of each axis.
        fusion (`str`): ``"linear"`` or ``"hann"``.
    """
    return Grid(tuple(plan_windows(n, t, o, fusion) for n, t, o in zip(sizes, tile, overlap)), tuple(dims))
