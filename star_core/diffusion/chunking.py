"""Temporal chunks of the sampler: which :mod:`star_core.windows` plans a user may choose for the latent frames.

The denoiser runs on one window of frames at a time; each window's x0 is accumulated into one full-length tensor
with per-frame weights and divided by the weight sum (:class:`star_core.windows.WindowPlan`). ``"official"``
reproduces STAR's windows and hard-cut stitching bit for bit; ``"linear"`` and ``"hann"`` cross-fade over the
overlaps with ramps that are never zero at a window's first or last frame.
"""
from __future__ import annotations

from ..windows import WindowPlan, plan_windows

FUSIONS = ("official", "linear", "hann")
# From `python bench/sampling.py --fusion-study` (tiny random model, F=32, L=8, 6 steps, vs an unchunked run):
# linear/hann cross-fades deviate less (rel. RMS 0.063-0.066 vs 0.069) and jump less at seams (max extra
# frame-to-frame change 0.005-0.007 vs 0.008) than the official hard cuts; with overlap L/4 they also need 1.25x
# instead of 1.75x the frame evaluations. Linear came out marginally ahead of hann.
DEFAULT_FUSION = "linear"


def plan_chunks(frames: int, chunk_len: int, overlap: int | None = None, fusion: str = DEFAULT_FUSION) -> WindowPlan:
    """Temporal windows and fusion weights for ``frames`` latent frames processed ``chunk_len`` at a time.

    ``F <= chunk_len`` gives a single window (no chunking). See :func:`star_core.windows.plan_windows`.

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
    return plan_windows(frames, chunk_len, overlap, fusion)
