"""STAR's sampling composition: start latent, CFG + rescale denoiser over temporal chunks and spatial tiles,
DPM++(2M) SDE.

One denoiser evaluation visits a :class:`~star_core.windows.Grid` of windows, chunks × rows × columns of the latent
``[B,C,F,h,w]`` (:func:`plan_evaluations`). Every window is one network call per CFG pass, with its own slice of
the noisy latent and of the hint. The tiles of a chunk are blended first (the positive and the negative
predictions separately, MultiDiffusion style, with ramps that are never zero inside the frame); CFG and its std
rescale then act on the whole chunk, exactly as on an untiled chunk, so the rescale's std is the official per-chunk
one whatever the tiling. The chunks' x0 are blended last.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..geometry import VAE_FACTOR
from ..model.unet import latent_size_fits
from ..options import AUTO, Section, SpecError, option
from ..windows import BLENDS, Grid, WindowPlan, official_overlap, plan_windows
from .chunking import DEFAULT_FUSION, FUSIONS, plan_chunks
from .guidance import cfg_rescale
from .noise import BrownianTreeNoiseSampler, InjectedNoiseSampler
from .sampler import StepCallback, sample_dpmpp_2m_sde
from .schedule import MODES, T_MAX, alphas_vp, c_in, diffuse, discretized_timesteps, k_sigmas, model_timestep, sigmas_vp

if TYPE_CHECKING:
    from ..distributed import Distributed

# model_fn(x [B,4,f,h,w], t LongTensor [B], context [B,77,1024], hint [B,4,f,h,w]) -> v-prediction [B,4,f,h,w]
ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
MAX_TILE = 16384  # pixels per side of a diffusion tile
# The latent dims a diffusion tile cuts (rows, columns of [B,C,F,h,w]); the other grid axes are temporal chunks.
TILE_DIMS = (3, 4)


@dataclass(frozen=True)
class SamplerSettings(Section):
    """User-facing sampler options (official defaults).

    Parameters:
        mode (`str`): ``"fast"`` (the official 15-step schedule: fixed 14 model evaluations, ``steps`` ignored) or
            ``"normal"``.
        steps (`int`): steps in normal mode.
        cfg (`float`): guidance scale; 1 runs the positive pass only.
        rescale (`float`): CFG std rescale strength in [0, 1].
        t_max (`int`): start timestep (899 = the official 900 levels; see ``schedule.t_max_for_denoise``).
        chunk_len (`int`): maximum latent frames per denoiser call.
        overlap (`int | None`): frames shared by neighbouring chunks (None: ``chunk_len // 4``; official: fixed L/2).
        fusion (`str`): ``"official"`` hard cuts, or ``"linear"``/``"hann"`` cross-fades of the chunks' x0.
        batch_cfg (`bool`): run the positive and negative passes as one batch of 2 (same numbers, faster on GPU).
        tile (`tuple[int, int] | None`): diffusion tile (height, width) in pixels of the padded frame; each side is
            rounded down to a size the network accepts (:func:`tile_cells`). None: whole frames (official).
        tile_overlap (`int | None`): pixels shared by neighbouring tiles, rounded down to latent cells (None: a
            quarter of the tile, at least one cell).
        tile_blend (`str`): ``"linear"`` or ``"hann"`` ramps across the tile overlaps.
    """

    PREFIX = "sampler"

    mode: str = option("fast", "fast: the official 15-step schedule (14 model evaluations; steps is not used). "
                       "normal: `steps` evenly spaced steps.", choices=MODES)
    steps: int = option(15, "Solver steps in normal mode (the official fast mode always runs 15).",
                        minimum=1, maximum=1000)
    cfg: float = option(7.5, "Classifier-free guidance scale (official 7.5; 1 skips the negative pass).",
                        minimum=0.0, maximum=100.0, step=0.1)
    rescale: float = option(0.2, "CFG rescale strength (official 0.2).", minimum=0.0, maximum=1.0, step=0.01)
    t_max: int = option(T_MAX, "Start timestep (899 = all of STAR's 900 noise levels, official).",
                        minimum=1, maximum=999)
    chunk_len: int = option(32, "Maximum latent frames per model call (official 32); lower needs less memory. auto: "
                            "32, or the longest that fits the memory budget.", minimum=1, maximum=100_000, kind=int,
                            auto=True)
    overlap: int | None = option(None, "Frames shared by neighbouring chunks (automatic: chunk length // 4; the "
                                 "official fusion always uses half a chunk).", minimum=0, kind=int)
    fusion: str = option(DEFAULT_FUSION, "How overlapping chunks are joined: official hard cuts, or linear / hann "
                         "cross-fades (smoother seams on long videos).", choices=FUSIONS)
    batch_cfg: bool = option(False, "Run the positive and negative passes as one batch of 2 (same numbers, "
                             "faster on GPUs, more memory).")
    tile: tuple[int, int] | None = option(
        None, "Diffusion tile (height, width) in pixels: every model call sees at most this much of the frame, "
        "rounded down to sizes the network accepts (STAR: heights 16 + 64k, widths 64k px). Unset: whole frames "
        "(official). auto: whole frames when they fit the memory budget, else the largest tiles that do. Smaller "
        "tiles need less memory; overlapping tiles are blended.", kind=tuple, auto=True)
    tile_overlap: int | None = option(None, "Pixels shared by neighbouring diffusion tiles (automatic: a quarter of "
                                      "the tile).", minimum=0, maximum=MAX_TILE, kind=int)
    tile_blend: str = option("linear", "How overlapping diffusion tiles are blended: linear or hann ramps (never "
                             "zero inside the frame).", choices=BLENDS)

    @property
    def has_auto(self) -> bool:
        """Whether an option is still ``auto`` (to be chosen for a memory budget by :mod:`star_core.autosize`)."""
        return AUTO in (self.chunk_len, self.tile)

    def check(self) -> None:
        if self.tile is not None and self.tile != AUTO:
            if not isinstance(self.tile, tuple) or len(self.tile) != 2 or any(
                    not isinstance(v, int) or isinstance(v, bool) or not VAE_FACTOR <= v <= MAX_TILE
                    for v in self.tile):
                raise SpecError(self.path("tile"), f"must be two integers (height, width) in [{VAE_FACTOR}, "
                                f"{MAX_TILE}] pixels, got {self.tile!r}")
            if self.tile_overlap is not None and self.tile_overlap >= min(self.tile):
                raise SpecError(self.path("tile_overlap"), f"({self.tile_overlap} px) must be smaller than the tile "
                                f"({self.tile[0]}x{self.tile[1]} px)")
        if self.chunk_len == AUTO:
            return  # the overlap is checked against the chunk length chosen for the budget
        if self.overlap is not None and self.fusion != "official" and self.overlap >= self.chunk_len:
            raise SpecError(self.path("overlap"), f"({self.overlap}) must be smaller than the chunk length "
                            f"({self.chunk_len})")
        if self.overlap is not None and self.fusion == "official" and self.overlap != official_overlap(self.chunk_len):
            raise SpecError(self.path("overlap"), f"must be left automatic with the official fusion (it always "
                            f"overlaps by {official_overlap(self.chunk_len)} frames for a chunk length of "
                            f"{self.chunk_len}); use fusion linear or hann for another overlap")


class SharedOutOfMemory(MemoryError):
    """Some rank's network calls ran out of memory during a shared evaluation (the message names the ranks):
    every rank raises it, so that all of them repeat the evaluation with smaller windows (:class:`Replan`)."""


# on_evaluation(done, total): called before each network call with the calls finished so far; raising stops the run.
EvaluationCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Replan:
    """
    What the denoiser does when an evaluation fails for lack of memory: it asks for smaller windows and evaluates
    again (the solver state is kept, so finished steps are not lost).

    Parameters:
        matches (`Callable[[BaseException], bool]`): whether an error means "out of memory" (others propagate).
        smaller (`Callable[[Grid, BaseException], Grid]`): the next, smaller grid after ``grid`` ran out of memory;
            raises (e.g. `star_core.memory.NoPlanFits`, chained to the error) when nothing smaller is left.
    """

    matches: Callable[[BaseException], bool]
    smaller: Callable[[Grid, BaseException], Grid]


def tile_cells(pixels: int, length: int, levels: int | None, axis: str) -> int:
    """
    Latent cells of a diffusion tile on one axis: the largest size of at most ``pixels // 8`` cells that the
    network accepts (:func:`star_core.model.unet.latent_size_fits`; the smallest accepted size when none is that
    small), or the whole axis when that is not longer.

    Parameters:
        pixels (`int`): the requested tile side in pixels.
        length (`int`): latent cells on the axis.
        levels (`int`, *optional*): resolution levels of the network; None accepts every size.
        axis (`str`): ``"h"`` or ``"w"``.
    """
    cells = max(1, pixels // VAE_FACTOR)
    if cells >= length:
        return length
    if levels is None:
        return cells
    fitting = [size for size in range(cells, 0, -1) if latent_size_fits(size, levels, axis)]
    if fitting:
        return fitting[0]
    return next((size for size in range(cells + 1, length) if latent_size_fits(size, levels, axis)), length)


def plan_tile_axis(length: int, settings: SamplerSettings, levels: int | None, axis: str) -> WindowPlan:
    """
    The diffusion tiles of ``settings`` along one latent axis (a single window when tiling is off or the tile
    covers the axis).

    Parameters:
        length (`int`): latent cells on the axis.
        settings (`SamplerSettings`): tile, overlap and blend.
        levels (`int`, *optional*): resolution levels of the network (its size rule); None accepts every size.
        axis (`str`): ``"h"`` (rows) or ``"w"`` (columns).
    """
    if settings.tile is None:
        return plan_windows(length, length)
    size = tile_cells(settings.tile[0 if axis == "h" else 1], length, levels, axis)
    if size >= length:
        return plan_windows(length, length)
    if settings.tile_overlap is None:  # automatic: a quarter of the tile, at least one cell so seams blend
        overlap = min(max(1, size // 4), size - 1)
    else:
        overlap = settings.tile_overlap // VAE_FACTOR
    if overlap >= size:
        name = "height" if axis == "h" else "width"
        raise ValueError(f"sampler.tile_overlap ({settings.tile_overlap} px) must be smaller than the tile {name} "
                         f"the network accepts ({size * VAE_FACTOR} px for a tile of {settings.tile[0]}x"
                         f"{settings.tile[1]} px): lower the overlap or enlarge the tile")
    return plan_windows(length, size, overlap, settings.tile_blend)


def plan_evaluations(latent_shape: Sequence[int], settings: SamplerSettings, levels: int | None = None) -> Grid:
    """
    The windows one denoiser evaluation visits on a latent ``[B,C,F,h,w]``: the temporal chunks of ``settings``
    (dim 2) × the spatial tiles (rows, dim 3; columns, dim 4), chunk-major. One window means one network call per
    CFG pass; without tiles the spatial axes are single windows.

    Parameters:
        latent_shape (`Sequence[int]`): shape of the latent.
        settings (`SamplerSettings`): chunk length, overlap and fusion; tile, tile overlap and blend.
        levels (`int`, *optional*): resolution levels of the network (:func:`network_levels`), whose size rule
            every tile obeys; None accepts every tile size (a model without size rules).
    """
    if settings.has_auto:
        raise ValueError("sampler settings with 'auto' options must be sized for a memory budget first "
                         "(star_core.autosize.sampler_sizing, as star_core.pipeline.sample does)")
    frames, height, width = (int(n) for n in latent_shape[2:5])
    return Grid((plan_chunks(frames, settings.chunk_len, settings.overlap, settings.fusion),
                 plan_tile_axis(height, settings, levels, "h"), plan_tile_axis(width, settings, levels, "w")),
                (2, 3, 4))


def network_levels(model: object) -> int | None:
    """Resolution levels of a STAR network, or of a ``model_fn`` carrying its ``config`` (as
    :func:`star_core.pipeline.model_function` makes); None for a model without a STAR config."""
    config = getattr(model, "config", None)
    dim_mult = getattr(config, "dim_mult", None)
    return len(dim_mult) if dim_mult is not None else None


def model_passes(cfg: float, batch_cfg: bool) -> int:
    """Network calls per window and evaluation: 2 with CFG (positive and negative), 1 without or when batched."""
    return 1 if cfg == 1 or batch_cfg else 2


class StarDenoiser:
    """The official ``model_fn``/``model_chunk_fn``: ``(x, sigma) -> x0`` with CFG + rescale per chunk.

    The network gets ``x·c_in(sigma)`` (continuous sigma) and the rounded integer t; x0 uses alpha/sigma of that
    rounded t (the official quirk). Chunks are denoised one after another and their x0 blended into one full-size
    x0 by the grid's weights; within a chunk the network runs tile by tile, the tiles' positive and negative
    predictions are blended over the chunk, and CFG + rescale act on the blended chunk (module docstring). A single
    window is the plain official call.

    Parameters:
        model_fn (`ModelFn`): v-prediction network call.
        hint (`torch.Tensor`): clean LR latent ``[1,4,F,h,w]`` (ControlNet hint).
        positive (`torch.Tensor`): positive text context ``[1,77,D]``.
        negative (`torch.Tensor`): negative text context ``[1,77,D]``.
        grid (`Grid`): the windows of one evaluation and their blending weights (see :func:`plan_evaluations`);
            axes on dims 3 and 4 are spatial tiles, the others temporal chunks.
        cfg (`float`): guidance scale.
        rescale (`float`): std rescale strength.
        batch_cfg (`bool`): one batch of 2 instead of two passes.
        on_evaluation (`Callable`, *optional*): ``on_evaluation(done, total)`` before every network call, with
            ``total`` = calls per denoiser evaluation × ``evaluations``; raising stops the run.
        evaluations (`int`): denoiser evaluations the run will make (for ``total``).
        replan (`Replan`, *optional*): smaller windows after an out-of-memory error; the failed evaluation is
            repeated with them, and they are kept for the rest of the run. With several ranks, an out-of-memory
            error in any rank's network calls makes every rank repeat the evaluation with rank 0's smaller grid.
        work (`Distributed`, *optional*): several ranks share every evaluation (see :meth:`_shared_passes`);
            ``total`` then counts this rank's calls.
    """

    def __init__(self, model_fn: ModelFn, hint: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                 grid: Grid, cfg: float, rescale: float, batch_cfg: bool = False, *,
                 on_evaluation: EvaluationCallback | None = None, evaluations: int = 1,
                 replan: Replan | None = None, work: Distributed | None = None) -> None:
        self.model_fn = model_fn
        self.hint = hint
        self.positive = positive
        self.negative = negative
        self.cfg = cfg
        self.rescale = rescale
        self.batch_cfg = batch_cfg
        self.on_evaluation = on_evaluation
        self.replan = replan
        self.calls = 0
        self.evaluations = evaluations
        self.evaluated = 0  # evaluations finished
        self.work = work if work is not None and work.active else None
        # the (positive, negative) v of the next window; the shared path swaps in the exchanged results
        self._window_passes = self._passes
        self.use_grid(grid)
        self._sigmas_vp = sigmas_vp().to(hint.device)
        self._alphas_vp = alphas_vp().to(hint.device)

    def use_grid(self, grid: Grid) -> None:
        """Evaluates with ``grid``'s windows from now on (the call total counts the remaining evaluations with it)."""
        self.grid = grid
        self.chunks = grid.part([dim for dim in grid.dims if dim not in TILE_DIMS])
        self.tiles = grid.part(TILE_DIMS)
        per_evaluation = len(grid) * model_passes(self.cfg, self.batch_cfg)
        if self.work is not None:
            per_evaluation = self._share(grid)
        self.total_calls = self.calls + (self.evaluations - self.evaluated) * per_evaluation

    def _share(self, grid: Grid) -> int:
        """Gives every work item of ``grid`` (window × CFG pass) its rank; returns this rank's calls per
        evaluation. Each window's passes stay on one rank, or each pass is an item of its own when that spreads
        the calls better (e.g. one window on two ranks)."""
        passes = model_passes(self.cfg, self.batch_cfg)
        self._outputs = 1 if self.cfg == 1 else 2  # v per window
        self._split = passes == 2 and self.work.split_passes(len(grid), 2)
        count = len(grid) * self._outputs
        self._owners = [self.work.owner(k if self._split else k // self._outputs) for k in range(count)]
        mine = self._owners.count(self.work.rank)
        return mine if self._split else mine // self._outputs * passes

    def _call(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
        if self.on_evaluation is not None:
            self.on_evaluation(self.calls, self.total_calls)
        v = self.model_fn(x, t, context, hint).to(x.dtype)
        self.calls += 1
        return v

    def _passes(self, xt: torch.Tensor, t: torch.Tensor,
                hint: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The positive and negative v of one window (no negative when ``cfg == 1``)."""
        if self.cfg == 1:
            return self._call(xt, t, self.positive, hint), None
        if self.batch_cfg:
            both = self._call(torch.cat([xt, xt]), t.repeat(2), torch.cat([self.positive, self.negative]),
                              torch.cat([hint, hint]))
            cond, uncond = both.chunk(2)
            return cond, uncond
        return self._call(xt, t, self.positive, hint), self._call(xt, t, self.negative, hint)

    def _guide(self, cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
        return cond if uncond is None else cfg_rescale(cond, uncond, self.cfg, self.rescale)

    def _v(self, xt: torch.Tensor, t: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
        """The guided v of one chunk: the network on every tile, the tiles blended, then CFG + rescale."""
        if self.tiles is None or self.tiles.is_single():
            return self._guide(*self._window_passes(xt, t, hint))
        cond = torch.zeros_like(xt)
        uncond = None if self.cfg == 1 else torch.zeros_like(xt)
        for index in self.tiles.indices():
            tile_cond, tile_uncond = self._window_passes(self.tiles.slice(xt, index).contiguous(), t,
                                                         self.tiles.slice(hint, index).contiguous())
            self.tiles.accumulate(cond, index, tile_cond)
            if uncond is not None:
                self.tiles.accumulate(uncond, index, tile_uncond)
            del tile_cond, tile_uncond  # free this tile's predictions before the next tile's forward
        return self._guide(self.tiles.normalize(cond), None if uncond is None else self.tiles.normalize(uncond))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        while True:
            start = self.calls
            try:
                x0 = self._evaluate(x, sigma)
                self.evaluated += 1
                return x0
            except BaseException as error:
                if self.replan is None or not (isinstance(error, SharedOutOfMemory) if self.work is not None
                                               else self.replan.matches(error)):
                    raise
                failure = error.with_traceback(None)  # its frames would keep the failed evaluation's tensors
            self.calls = start  # the repeated evaluation's calls replace the failed one's
            if self.work is None:
                smaller = self.replan.smaller(self.grid, failure)
            else:  # every rank must fuse the same windows: rank 0 chooses them
                smaller = self.work.broadcast(self.replan.smaller(self.grid, failure) if self.work.is_main else None,
                                              what=f"the smaller windows after: {failure}")
            self.use_grid(smaller)

    def _evaluate(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        xt = x * c_in(sigma)
        t = model_timestep(sigma, len(xt)).to(x.device)
        shape = (-1,) + (1,) * (xt.ndim - 1)
        alpha_t, sigma_t = self._alphas_vp[t].view(shape), self._sigmas_vp[t].view(shape)
        if self.work is not None:
            self._window_passes = self._shared_passes(xt, t)
        try:
            if self.chunks is None or self.chunks.is_single():
                return alpha_t * xt - sigma_t * self._v(xt, t, self.hint)
            acc = torch.zeros_like(xt)
            for index in self.chunks.indices():
                xt_window = self.chunks.slice(xt, index).contiguous()
                v = self._v(xt_window, t, self.chunks.slice(self.hint, index).contiguous())
                self.chunks.accumulate(acc, index, alpha_t * xt_window - sigma_t * v)
                del v  # free this window's prediction before the next window's forward
            return self.chunks.normalize(acc)
        finally:
            self._window_passes = self._passes

    def _shared_passes(self, xt: torch.Tensor, t: torch.Tensor) -> Callable:
        """
        The network work of one evaluation shared by the ranks: this rank runs the work items it owns (windows =
        chunks × tiles, or single CFG passes of them), every rank receives every item's v, and the returned
        function hands them to the fusion of :meth:`_evaluate` in grid order (chunk-major, tiles row-major: the
        order in which :meth:`_v` visits them) — the same operations on the same numbers as one process, so the x0
        (and the latent) is bit-identical on every rank. Exchanged per evaluation: every window's positive and
        negative v (the positive only without CFG), in the latent's dtype.

        With a :class:`Replan`, the ranks first tell each other whether their network calls ran out of memory;
        if any did, every rank raises :class:`SharedOutOfMemory` so that all of them repeat the evaluation.
        """
        windows = list(self.grid.indices())
        contexts = (self.positive, self.negative)
        outputs: dict[int, torch.Tensor] = {}
        failure: BaseException | None = None
        try:
            for w, index in enumerate(windows):
                first = w * self._outputs
                owned = [k for k in range(first, first + self._outputs) if self._owners[k] == self.work.rank]
                if not owned:
                    continue
                xt_window = self.grid.slice(xt, index).contiguous()
                hint = self.grid.slice(self.hint, index).contiguous()
                if self._split:
                    for k in owned:
                        outputs[k] = self._call(xt_window, t, contexts[k - first], hint)
                else:
                    for k, v in zip(owned, self._passes(xt_window, t, hint)):
                        outputs[k] = v
        except BaseException as error:
            if self.replan is None or not self.replan.matches(error):
                raise
            failure, outputs = error.with_traceback(None), {}
        what = f"sampler evaluation {self.evaluated + 1}"
        if self.replan is not None:
            failed = self.work.flagged(failure is not None, what=f"{what} (out-of-memory check)")
            if failed:
                ranks = ", ".join(f"rank {r}" for r in failed)
                raise SharedOutOfMemory(f"{ranks} ran out of memory at {what}") from failure
        shapes = [tuple(self.grid.slice(xt, windows[k // self._outputs]).shape) for k in range(len(self._owners))]
        received = iter(self.work.exchange(outputs, shapes, self._owners, stage="sample", what=what,
                                           dtype=xt.dtype, device=xt.device))
        del outputs

        def window_passes(xt_window: torch.Tensor, t: torch.Tensor, hint: torch.Tensor):
            passes = [next(received) for _ in range(self._outputs)]
            assert passes[0].shape == xt_window.shape, "windows must be fused in grid order"
            return passes[0], (passes[1] if self._outputs == 2 else None)

        return window_passes


def solver_sigmas(settings: SamplerSettings, device: torch.device | str = "cpu") -> torch.Tensor:
    """The k-sigmas the solver walks for ``settings`` (one denoiser evaluation per sigma but the last 0)."""
    return k_sigmas(discretized_timesteps(settings.mode, settings.steps, settings.t_max)).to(device)


def _check_latent(name: str, tensor: torch.Tensor, like: torch.Tensor) -> None:
    if tensor.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)} but must match lr_latent {tuple(like.shape)}")


@torch.no_grad()
def sample_star(
    model_fn: ModelFn,
    lr_latent: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    settings: SamplerSettings,
    *,
    start_noise: torch.Tensor,
    brownian: int | Sequence[torch.Tensor],
    callback: StepCallback | None = None,
    on_evaluation: EvaluationCallback | None = None,
    grid: Grid | None = None,
    replan: Replan | None = None,
    work: Distributed | None = None,
) -> torch.Tensor:
    """STAR's ``sample_sr``: noise the LR latent to ``t_max``, then DPM++(2M) SDE with CFG + rescale and chunking.

    Parameters:
        model_fn (`ModelFn`): ``(x, t, context, hint) -> v``; called with batch 2 (positive, negative) when
            ``settings.batch_cfg``.
        lr_latent (`torch.Tensor`): clean LR latent ``[1,4,F,h,w]``: the ControlNet hint and the start point.
        positive (`torch.Tensor`): positive text context ``[1,77,D]``.
        negative (`torch.Tensor`): negative text context ``[1,77,D]``.
        settings (`SamplerSettings`): sampler options.
        start_noise (`torch.Tensor`): standard normal noise for ``diffuse(lr_latent, t_max)``, shaped like the latent.
        brownian (`int | Sequence[torch.Tensor]`): Brownian-tree entropy, or recorded unit noises (one per noisy step).
        callback (`Callable`, *optional*): ``callback(step, total, x, x0)`` after every solver step; raise to stop.
        on_evaluation (`Callable`, *optional*): ``on_evaluation(done, total)`` before every network call; raise to
            stop (the run then stops within one network call).
        grid (`Grid`, *optional*): the windows of one evaluation (default :func:`plan_evaluations`, with the size
            rule of ``model_fn``'s config when it carries one, see :func:`network_levels`).
        replan (`Replan`, *optional*): smaller windows after an out-of-memory error (see :class:`StarDenoiser`).
        work (`Distributed`, *optional*): ranks that share every evaluation; every rank must call this with the same
            inputs, and every rank returns the same latent, bit-identical to one process.

    Returns:
        `torch.Tensor`: the sampled latent ``[1,4,F,h,w]``.
    """
    if lr_latent.ndim != 5:
        raise ValueError(f"lr_latent must be [1,4,F,h,w], got shape {tuple(lr_latent.shape)}")
    _check_latent("start_noise", start_noise, lr_latent)
    for name, context in (("positive", positive), ("negative", negative)):
        if context.ndim != 3 or context.shape[0] != lr_latent.shape[0]:
            raise ValueError(f"{name} context must be [{lr_latent.shape[0]},77,D], got shape {tuple(context.shape)}")
    sigmas = solver_sigmas(settings, lr_latent.device)
    x = diffuse(lr_latent, settings.t_max, start_noise) * sigmas[0]
    if isinstance(brownian, int):
        positive_sigmas = sigmas[sigmas > 0]
        noise_sampler = BrownianTreeNoiseSampler(x, positive_sigmas.min(), positive_sigmas.max(), brownian)
    else:
        for k, noise in enumerate(brownian):
            _check_latent(f"brownian[{k}]", noise, lr_latent)
        noise_sampler = InjectedNoiseSampler(brownian)
    grid = plan_evaluations(lr_latent.shape, settings, network_levels(model_fn)) if grid is None else grid
    denoiser = StarDenoiser(model_fn, lr_latent, positive, negative, grid, settings.cfg, settings.rescale,
                            settings.batch_cfg, on_evaluation=on_evaluation, evaluations=len(sigmas) - 1,
                            replan=replan, work=work)
    return sample_dpmpp_2m_sde(denoiser, x, sigmas, noise_sampler=noise_sampler, callback=callback)
