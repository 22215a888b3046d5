"""Temporal chunk plans for long videos and the per-frame weights that fuse the chunks' x0 predictions.

The denoiser runs on one window of frames at a time; each window's x0 is added into one full-length accumulator
with per-frame weights, which is finally divided by the weight sum. ``"official"`` reproduces STAR's windows and
hard-cut stitching (weights 0/1, so the result is bit-identical to slicing and concatenating); ``"linear"`` and
``"hann"`` cross-fade over the overlaps with ramps that are never zero at a window's first or last frame.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FUSIONS = ("official", "linear", "hann")
# From `python bench/sampling.py --fusion-study` (tiny random model, F=32, L=8, 6 steps, vs an unchunked run):
# linear/hann cross-fades deviate less (rel. RMS 0.063-0.066 vs 0.069) and jump less at seams (max extra
# frame-to-frame change 0.005-0.007 vs 0.008) than the official hard cuts; with overlap L/4 they also need 1.25x
# instead of 1.75x the frame evaluations. Linear came out marginally ahead of hann.
DEFAULT_FUSION = "linear"


@dataclass(frozen=True)
class ChunkPlan:
    """Windows ``[start, end)`` over ``frames`` and one weight per window frame (float32, summing > 0 per frame).

    Parameters:
        frames (`int`): latent frame count F.
        windows (`tuple[tuple[int, int], ...]`): increasing windows covering ``[0, F)``.
        weights (`tuple[torch.Tensor, ...]`): fusion weight of every frame of each window.
    """

    frames: int
    windows: tuple[tuple[int, int], ...]
    weights: tuple[torch.Tensor, ...]

    def weight_sum(self) -> torch.Tensor:
        """Per-frame sum of the window weights, ``[F]``."""
        total = torch.zeros(self.frames)
        for (start, end), weight in zip(self.windows, self.weights):
            total[start:end] += weight
        return total

    def accumulate(self, acc: torch.Tensor, index: int, x0: torch.Tensor) -> None:
        """Adds window ``index``'s prediction ``x0`` ``[B,C,f,H,W]`` into ``acc`` ``[B,C,F,H,W]`` with its weights."""
        start, end = self.windows[index]
        acc[:, :, start:end] += x0 * self.weights[index].to(x0).view(1, 1, -1, 1, 1)

    def normalize(self, acc: torch.Tensor) -> torch.Tensor:
        """Divides an accumulator filled by :meth:`accumulate` for every window by the per-frame weight sum."""
        return acc.div_(self.weight_sum().to(acc).view(1, 1, -1, 1, 1))


def official_overlap(chunk_len: int) -> int:
    """Overlap of the official ``make_chunks(F, 0, L)``: ``int((L/2 - 1)//1 + 1)`` (L/2 for even L)."""
    return int((chunk_len * 0.5 - 1) // 1 + 1)


def official_windows(frames: int, chunk_len: int) -> list[tuple[int, int]]:
    """Windows of the official ``make_chunks(F, 0, L)`` / ``sliding_windows_1d``, including its quirks.

    The last window absorbs up to 1.25·L frames. For ``L < F <= 1.25·L`` this is a single window ``(0, F)``, on which
    the official stitching crashes; :func:`plan_chunks` replaces that case.
    """
    stride = chunk_len - official_overlap(chunk_len)
    windows, start = [], 0
    while start < frames:
        if start + chunk_len * 1.25 >= frames:
            windows.append((start, frames))
            break
        windows.append((start, start + chunk_len))
        start += stride
    return windows


def _hard_cut_weights(windows: list[tuple[int, int]]) -> list[torch.Tensor]:
    # Official stitching: with O = overlap and cut = O//2, the first window keeps [:len-O+cut], middle ones
    # [cut:len-O+cut], the last [cut:].
    overlap = windows[0][1] - windows[1][0]
    cut = overlap // 2
    weights = []
    for i, (start, end) in enumerate(windows):
        length = end - start
        weight = torch.zeros(length)
        keep_from = 0 if i == 0 else cut
        keep_to = length if i == len(windows) - 1 else length - overlap + cut
        weight[keep_from:keep_to] = 1.0
        weights.append(weight)
    return weights


def _ramp(overlap: int, fusion: str) -> torch.Tensor:
    # Rising weights of the right-hand window over an overlap, strictly inside (0, 1); the left-hand window gets
    # 1 - ramp, so the pair sums to 1 on every overlapped frame.
    u = torch.arange(1, overlap + 1, dtype=torch.float64) / (overlap + 1)
    ramp = u if fusion == "linear" else torch.sin(u * (math.pi / 2)) ** 2
    return ramp.float()


def _blend_weights(windows: list[tuple[int, int]], fusion: str) -> list[torch.Tensor]:
    weights = [torch.ones(end - start) for start, end in windows]
    for i in range(len(windows) - 1):
        (start_a, end_a), (start_b, _) = windows[i], windows[i + 1]
        overlap = end_a - start_b
        if overlap <= 0:
            continue
        ramp = _ramp(overlap, fusion)
        weights[i][start_b - start_a:] *= 1 - ramp
        weights[i + 1][:overlap] *= ramp
    return weights


def plan_chunks(frames: int, chunk_len: int, overlap: int | None = None, fusion: str = DEFAULT_FUSION) -> ChunkPlan:
    """Temporal windows and fusion weights for ``frames`` latent frames processed ``chunk_len`` at a time.

    ``F <= chunk_len`` gives a single window (no chunking). ``fusion="official"`` gives the official windows and
    hard cuts wherever the official code works (``F > 1.25·L``); for ``L < F <= 1.25·L``, where the official code
    raises IndexError, it uses ``(0, L), (L - overlap, F)`` with the same stitching rule. ``"linear"``/``"hann"``
    use the fewest windows of exactly ``chunk_len`` frames that overlap by at least ``overlap`` frames, spread evenly.

    Parameters:
        frames (`int`): number of latent frames F >= 1.
        chunk_len (`int`): maximum window length L >= 1 (the official ``max_chunk_len``, default 32).
        overlap (`int`, *optional*): frames shared by neighbouring windows for ``"linear"``/``"hann"``, in
            [0, chunk_len); default ``chunk_len // 4``. Fixed to the official value for ``"official"``.
        fusion (`str`, *optional*): ``"official"``, ``"linear"`` or ``"hann"``.
    """
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be a positive integer, got {frames!r}")
    if not isinstance(chunk_len, int) or chunk_len < 1:
        raise ValueError(f"chunk_len must be a positive integer, got {chunk_len!r}")
    if fusion == "official" and overlap is not None and overlap != official_overlap(chunk_len):
        raise ValueError(f"overlap={overlap}: the official plan always overlaps by {official_overlap(chunk_len)} "
                         f"frames for chunk_len={chunk_len}; leave overlap=None or use fusion='linear'/'hann'")
    if overlap is None:
        overlap = chunk_len // 4
    if not isinstance(overlap, int) or not 0 <= overlap < chunk_len:
        raise ValueError(f"overlap must be an integer in [0, chunk_len={chunk_len}), got {overlap!r}")
    if frames <= chunk_len:
        return ChunkPlan(frames, ((0, frames),), (torch.ones(frames),))
    if fusion == "official":
        windows = official_windows(frames, chunk_len)
        if len(windows) == 1:
            windows = [(0, chunk_len), (chunk_len - official_overlap(chunk_len), frames)]
        weights = _hard_cut_weights(windows)
    else:
        count = math.ceil((frames - overlap) / (chunk_len - overlap))
        span = frames - chunk_len
        starts = [(i * span + (count - 1) // 2) // (count - 1) for i in range(count)]
        windows = [(start, start + chunk_len) for start in starts]
        weights = _blend_weights(windows, fusion)
    return ChunkPlan(frames, tuple(windows), tuple(weights))
