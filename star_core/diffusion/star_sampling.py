"""STAR's sampling composition: start latent, CFG + rescale denoiser over temporal chunks, DPM++(2M) SDE."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .chunking import DEFAULT_FUSION, FUSIONS, ChunkPlan, plan_chunks
from .guidance import cfg_rescale
from .noise import BrownianTreeNoiseSampler, InjectedNoiseSampler
from .sampler import StepCallback, sample_dpmpp_2m_sde
from .schedule import MODES, T_MAX, alphas_vp, c_in, diffuse, discretized_timesteps, k_sigmas, model_timestep, sigmas_vp

# model_fn(x [B,4,f,h,w], t LongTensor [B], context [B,77,1024], hint [B,4,f,h,w]) -> v-prediction [B,4,f,h,w]
ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SamplerSettings:
    """User-facing sampler options (official defaults).

    Parameters:
        mode (`str`): ``"fast"`` (fixed 14 model evaluations; ``steps`` ignored) or ``"normal"``.
        steps (`int`): model evaluations in normal mode.
        cfg (`float`): guidance scale; 1 runs the positive pass only.
        rescale (`float`): CFG std rescale strength in [0, 1].
        t_max (`int`): start timestep (899 = the official 900 levels; see ``schedule.t_max_for_denoise``).
        chunk_len (`int`): maximum latent frames per denoiser call.
        overlap (`int | None`): frames shared by neighbouring chunks (None: ``chunk_len // 4``; official: fixed L/2).
        fusion (`str`): ``"official"`` hard cuts, or ``"linear"``/``"hann"`` cross-fades of the chunks' x0.
        batch_cfg (`bool`): run the positive and negative passes as one batch of 2 (same numbers, faster on GPU).
    """

    mode: str = "fast"
    steps: int = 15
    cfg: float = 7.5
    rescale: float = 0.2
    t_max: int = T_MAX
    chunk_len: int = 32
    overlap: int | None = None
    fusion: str = DEFAULT_FUSION
    batch_cfg: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"SamplerSettings.mode must be one of {MODES}, got {self.mode!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"SamplerSettings.fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if not 0 <= self.rescale <= 1:
            raise ValueError(f"SamplerSettings.rescale must be in [0, 1], got {self.rescale}")


class StarDenoiser:
    """The official ``model_fn``/``model_chunk_fn``: ``(x, sigma) -> x0`` with CFG + rescale per temporal chunk.

    The network gets ``x·c_in(sigma)`` (continuous sigma) and the rounded integer t; x0 uses alpha/sigma of that
    rounded t (the official quirk). Chunks are denoised one after another and fused into one full-length x0.

    Parameters:
        model_fn (`ModelFn`): v-prediction network call.
        hint (`torch.Tensor`): clean LR latent ``[1,4,F,h,w]`` (ControlNet hint).
        positive (`torch.Tensor`): positive text context ``[1,77,D]``.
        negative (`torch.Tensor`): negative text context ``[1,77,D]``.
        plan (`ChunkPlan`): temporal windows and fusion weights.
        cfg (`float`): guidance scale.
        rescale (`float`): std rescale strength.
        batch_cfg (`bool`): one batch of 2 instead of two passes.
    """

    def __init__(self, model_fn: ModelFn, hint: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                 plan: ChunkPlan, cfg: float, rescale: float, batch_cfg: bool = False) -> None:
        self.model_fn = model_fn
        self.hint = hint
        self.positive = positive
        self.negative = negative
        self.plan = plan
        self.cfg = cfg
        self.rescale = rescale
        self.batch_cfg = batch_cfg
        self._sigmas_vp = sigmas_vp().to(hint.device)
        self._alphas_vp = alphas_vp().to(hint.device)

    def _v(self, xt: torch.Tensor, t: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
        if self.cfg == 1:
            return self.model_fn(xt, t, self.positive, hint).to(xt.dtype)
        if self.batch_cfg:
            both = self.model_fn(torch.cat([xt, xt]), t.repeat(2), torch.cat([self.positive, self.negative]),
                                 torch.cat([hint, hint])).to(xt.dtype)
            cond, uncond = both.chunk(2)
        else:
            cond = self.model_fn(xt, t, self.positive, hint).to(xt.dtype)
            uncond = self.model_fn(xt, t, self.negative, hint).to(xt.dtype)
        return cfg_rescale(cond, uncond, self.cfg, self.rescale)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        xt = x * c_in(sigma)
        t = model_timestep(sigma, len(xt)).to(x.device)
        shape = (-1,) + (1,) * (xt.ndim - 1)
        alpha_t, sigma_t = self._alphas_vp[t].view(shape), self._sigmas_vp[t].view(shape)
        if len(self.plan.windows) == 1:
            return alpha_t * xt - sigma_t * self._v(xt, t, self.hint)
        acc = torch.zeros_like(xt)
        for index, (start, end) in enumerate(self.plan.windows):
            xt_chunk = xt[:, :, start:end].contiguous()
            v = self._v(xt_chunk, t, self.hint[:, :, start:end].contiguous())
            self.plan.accumulate(acc, index, alpha_t * xt_chunk - sigma_t * v)
            del v  # free this chunk's prediction before the next chunk's forward
        return self.plan.normalize(acc)


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

    Returns:
        `torch.Tensor`: the sampled latent ``[1,4,F,h,w]``.
    """
    if lr_latent.ndim != 5:
        raise ValueError(f"lr_latent must be [1,4,F,h,w], got shape {tuple(lr_latent.shape)}")
    _check_latent("start_noise", start_noise, lr_latent)
    for name, context in (("positive", positive), ("negative", negative)):
        if context.ndim != 3 or context.shape[0] != lr_latent.shape[0]:
            raise ValueError(f"{name} context must be [{lr_latent.shape[0]},77,D], got shape {tuple(context.shape)}")
    timesteps = discretized_timesteps(settings.mode, settings.steps, settings.t_max)
    sigmas = k_sigmas(timesteps).to(lr_latent.device)
    x = diffuse(lr_latent, settings.t_max, start_noise) * sigmas[0]
    if isinstance(brownian, int):
        positive_sigmas = sigmas[sigmas > 0]
        noise_sampler = BrownianTreeNoiseSampler(x, positive_sigmas.min(), positive_sigmas.max(), brownian)
    else:
        for k, noise in enumerate(brownian):
            _check_latent(f"brownian[{k}]", noise, lr_latent)
        noise_sampler = InjectedNoiseSampler(brownian)
    plan = plan_chunks(lr_latent.shape[2], settings.chunk_len, settings.overlap, settings.fusion)
    denoiser = StarDenoiser(model_fn, lr_latent, positive, negative, plan, settings.cfg, settings.rescale,
                            settings.batch_cfg)
    return sample_dpmpp_2m_sde(denoiser, x, sigmas, noise_sampler=noise_sampler, callback=callback)
