"""STAR's sampling composition: start latent, CFG + rescale denoiser over temporal chunks, DPM++(2M) SDE."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..options import Section, SpecError, option
from ..windows import Grid, official_overlap
from .chunking import DEFAULT_FUSION, FUSIONS, plan_chunks
from .guidance import cfg_rescale
from .noise import BrownianTreeNoiseSampler, InjectedNoiseSampler
from .sampler import StepCallback, sample_dpmpp_2m_sde
from .schedule import MODES, T_MAX, alphas_vp, c_in, diffuse, discretized_timesteps, k_sigmas, model_timestep, sigmas_vp

if TYPE_CHECKING:
    from ..distributed import Distributed

# model_fn(x [B,4,f,h,w], t LongTensor [B], context [B,77,1024], hint [B,4,f,h,w]) -> v-prediction [B,4,f,h,w]
ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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
    chunk_len: int = option(32, "Maximum latent frames per model call (official 32); lower needs less memory.",
                            minimum=1, maximum=100_000)
    overlap: int | None = option(None, "Frames shared by neighbouring chunks (automatic: chunk length // 4; the "
                                 "official fusion always uses half a chunk).", minimum=0, kind=int)
    fusion: str = option(DEFAULT_FUSION, "How overlapping chunks are joined: official hard cuts, or linear / hann "
                         "cross-fades (smoother seams on long videos).", choices=FUSIONS)
    batch_cfg: bool = option(False, "Run the positive and negative passes as one batch of 2 (same numbers, "
                             "faster on GPUs, more memory).")

    def check(self) -> None:
        if self.overlap is not None and self.fusion != "official" and self.overlap >= self.chunk_len:
            raise SpecError(self.path("overlap"), f"({self.overlap}) must be smaller than the chunk length "
                            f"({self.chunk_len})")
        if self.overlap is not None and self.fusion == "official" and self.overlap != official_overlap(self.chunk_len):
            raise SpecError(self.path("overlap"), f"must be left automatic with the official fusion (it always "
                            f"overlaps by {official_overlap(self.chunk_len)} frames for a chunk length of "
                            f"{self.chunk_len}); use fusion linear or hann for another overlap")


# on_evaluation(done, total): called before each network call with the calls finished so far; raising stops the run.
EvaluationCallback = Callable[[int, int], None]


def plan_evaluations(latent_shape: Sequence[int], settings: SamplerSettings) -> Grid:
    """
    The windows one denoiser evaluation visits on a latent ``[B,C,F,h,w]``: the temporal chunks of ``settings``
    (dim 2). One window means one network call per CFG pass.

    Parameters:
        latent_shape (`Sequence[int]`): shape of the latent.
        settings (`SamplerSettings`): chunk length, overlap and fusion.
    """
    return Grid((plan_chunks(int(latent_shape[2]), settings.chunk_len, settings.overlap, settings.fusion),), (2,))


def model_passes(cfg: float, batch_cfg: bool) -> int:
    """Network calls per window and evaluation: 2 with CFG (positive and negative), 1 without or when batched."""
    return 1 if cfg == 1 or batch_cfg else 2


class StarDenoiser:
    """The official ``model_fn``/``model_chunk_fn``: ``(x, sigma) -> x0`` with CFG + rescale per window.

    The network gets ``x·c_in(sigma)`` (continuous sigma) and the rounded integer t; x0 uses alpha/sigma of that
    rounded t (the official quirk). Windows (temporal chunks) are denoised one after another and blended into one
    full-size x0 by the grid's weights; a single window is the plain official call.

    Parameters:
        model_fn (`ModelFn`): v-prediction network call.
        hint (`torch.Tensor`): clean LR latent ``[1,4,F,h,w]`` (ControlNet hint).
        positive (`torch.Tensor`): positive text context ``[1,77,D]``.
        negative (`torch.Tensor`): negative text context ``[1,77,D]``.
        grid (`Grid`): the windows of one evaluation and their blending weights (see :func:`plan_evaluations`).
        cfg (`float`): guidance scale.
        rescale (`float`): std rescale strength.
        batch_cfg (`bool`): one batch of 2 instead of two passes.
        on_evaluation (`Callable`, *optional*): ``on_evaluation(done, total)`` before every network call, with
            ``total`` = calls per denoiser evaluation × ``evaluations``; raising stops the run.
        evaluations (`int`): denoiser evaluations the run will make (for ``total``).
        work (`Distributed`, *optional*): several ranks share every evaluation (see :meth:`_shared_passes`);
            ``total`` then counts this rank's calls.
    """

    def __init__(self, model_fn: ModelFn, hint: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                 grid: Grid, cfg: float, rescale: float, batch_cfg: bool = False, *,
                 on_evaluation: EvaluationCallback | None = None, evaluations: int = 1,
                 work: Distributed | None = None) -> None:
        self.model_fn = model_fn
        self.hint = hint
        self.positive = positive
        self.negative = negative
        self.grid = grid
        self.cfg = cfg
        self.rescale = rescale
        self.batch_cfg = batch_cfg
        self.on_evaluation = on_evaluation
        self.calls = 0
        self.total_calls = evaluations * len(grid) * model_passes(cfg, batch_cfg)
        self.work = work if work is not None and work.active else None
        self.evaluations = 0
        # the (positive, negative) v of the next window; the shared path swaps in the exchanged results
        self._window_passes = self._passes
        if self.work is not None:
            self._outputs = 1 if cfg == 1 else 2  # v per window
            # each window's passes on one rank, or each pass on its own when that spreads the calls better
            self._split = model_passes(cfg, batch_cfg) == 2 and self.work.split_passes(len(grid), 2)
            count = len(grid) * self._outputs
            self._owners = [self.work.owner(k if self._split else k // self._outputs) for k in range(count)]
            mine = self._owners.count(self.work.rank)
            self.total_calls = evaluations * (mine if self._split else
                                              mine // self._outputs * model_passes(cfg, batch_cfg))
        self._sigmas_vp = sigmas_vp().to(hint.device)
        self._alphas_vp = alphas_vp().to(hint.device)

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
        return self._guide(*self._window_passes(xt, t, hint))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        xt = x * c_in(sigma)
        t = model_timestep(sigma, len(xt)).to(x.device)
        shape = (-1,) + (1,) * (xt.ndim - 1)
        alpha_t, sigma_t = self._alphas_vp[t].view(shape), self._sigmas_vp[t].view(shape)
        self.evaluations += 1
        if self.work is not None:
            self._window_passes = self._shared_passes(xt, t)
        try:
            if self.grid.is_single():
                return alpha_t * xt - sigma_t * self._v(xt, t, self.hint)
            acc = torch.zeros_like(xt)
            for index in self.grid.indices():
                xt_window = self.grid.slice(xt, index).contiguous()
                v = self._v(xt_window, t, self.grid.slice(self.hint, index).contiguous())
                self.grid.accumulate(acc, index, alpha_t * xt_window - sigma_t * v)
                del v  # free this window's prediction before the next window's forward
            return self.grid.normalize(acc)
        finally:
            self._window_passes = self._passes

    def _shared_passes(self, xt: torch.Tensor, t: torch.Tensor) -> Callable:
        """
        The network work of one evaluation shared by the ranks: this rank runs the windows (or single CFG passes)
        it owns, every rank receives every window's v, and the returned function hands them to the fusion of
        :meth:`__call__` in grid order — the same operations on the same numbers as one process, so the x0 (and
        the latent) is bit-identical on every rank. Exchanged per evaluation: every window's positive and
        negative v (the positive only without CFG), float32.
        """
        windows = list(self.grid.indices())
        contexts = (self.positive, self.negative)
        outputs: dict[int, torch.Tensor] = {}
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
        shapes = [tuple(self.grid.slice(xt, windows[k // self._outputs]).shape) for k in range(len(self._owners))]
        received = iter(self.work.exchange(outputs, shapes, self._owners, stage="sample",
                                           what=f"sampler evaluation {self.evaluations}", dtype=xt.dtype,
                                           device=xt.device))
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
        grid (`Grid`, *optional*): the windows of one evaluation (default :func:`plan_evaluations`).
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
    grid = plan_evaluations(lr_latent.shape, settings) if grid is None else grid
    denoiser = StarDenoiser(model_fn, lr_latent, positive, negative, grid, settings.cfg, settings.rescale,
                            settings.batch_cfg, on_evaluation=on_evaluation, evaluations=len(sigmas) - 1,
                            work=work)
    return sample_dpmpp_2m_sde(denoiser, x, sigmas, noise_sampler=noise_sampler, callback=callback)
