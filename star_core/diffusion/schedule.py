"""STAR's noise schedule and the official timestep/sigma discretisation.

STAR trains a v-prediction model on a zero-terminal-SNR ``logsnr_cosine_interp`` schedule of 1000 levels and samples
with k-diffusion style sigmas ``sigma_k = sigma_vp / alpha_vp``. Every function below mirrors the official operation
order in float32 so that the tables and sigmas match the reference bit for bit.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

NUM_TIMESTEPS = 1000
# The official pipeline uses 900 of the 1000 noise levels: sampling starts at t = 899.
OFFICIAL_NOISE_LEVELS = 900
T_MAX = OFFICIAL_NOISE_LEVELS - 1
# Fast mode switches from 4 coarse steps to 11 fine steps at this timestep.
FAST_MODE_T_MID = 500
MODES = ("fast", "normal")


def _logsnr_cosine_shifted(u: torch.Tensor, scale: float) -> torch.Tensor:
    # logSNR range [-15, 15]: the angles are atan(exp(7.5)) and atan(exp(-7.5)).
    a_min = math.atan(math.exp(7.5))
    a_max = math.atan(math.exp(-7.5))
    logsnr = -2 * torch.log(torch.tan(a_min + u * (a_max - a_min)))
    logsnr += 2 * math.log(1 / scale)
    return logsnr


@lru_cache(maxsize=1)
def _tables() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u = torch.linspace(1, 0, NUM_TIMESTEPS)
    logsnr = u * _logsnr_cosine_shifted(u, 2.0) + (1 - u) * _logsnr_cosine_shifted(u, 4.0)
    sigmas = torch.sqrt(torch.sigmoid(-logsnr))
    # Zero terminal SNR: stretch so that the last level is pure noise (sigma = 1).
    lo, hi = sigmas.min(), sigmas.max()
    sigmas = lo + (1.0 - lo) / (hi - lo) * (sigmas - lo)
    alphas = torch.sqrt(1 - sigmas**2)
    # log of the k-diffusion sigma per level; the last level is +inf (alpha = 0).
    log_k_sigmas = torch.sqrt(sigmas**2 / (1 - sigmas**2)).log()
    return sigmas, alphas, log_k_sigmas


def sigmas_vp() -> torch.Tensor:
    """The 1000 variance-preserving noise levels ``sigma_t`` (float32, ``sigma_999 = 1``)."""
    return _tables()[0].clone()


def alphas_vp() -> torch.Tensor:
    """The 1000 signal levels ``alpha_t = sqrt(1 - sigma_t^2)`` (float32, ``alpha_999 = 0``)."""
    return _tables()[1].clone()


def t_max_for_denoise(denoise: float, levels: int = OFFICIAL_NOISE_LEVELS) -> int:
    """Start timestep for a denoise strength: ``round(denoise * levels) - 1`` (official: 1.0 -> 899).

    Parameters:
        denoise (`float`): fraction of the official 900 noise levels to use, in (0, 1].
        levels (`int`, *optional*): number of levels that ``denoise = 1`` stands for.
    """
    if not 0 < denoise <= 1:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    t_max = round(denoise * levels) - 1
    if t_max < 1:
        raise ValueError(f"denoise={denoise} leaves fewer than 2 noise levels; use denoise >= {2 / levels:.4f}")
    return t_max


def discretized_timesteps(mode: str, steps: int, t_max: int = T_MAX, t_min: int = 0) -> torch.Tensor:
    """The float timesteps of the official ``'trailing'`` discretisation for DPM++(2M) SDE.

    One extra step is added because the solver later drops the penultimate sigma. Fast mode replaces the grid by
    4 steps down to 500 and 11 steps below it (15 values, ``steps`` is ignored, as in the official code).

    Parameters:
        mode (`str`): ``"fast"`` or ``"normal"``.
        steps (`int`): number of model evaluations in normal mode (``steps + 1`` values are returned).
        t_max (`int`, *optional*): first timestep (899 for the official 900 levels).
        t_min (`int`, *optional*): last timestep bound.

    Returns:
        `torch.Tensor`: float32 timesteps, strictly decreasing.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not 0 <= t_min < t_max <= NUM_TIMESTEPS - 1:
        raise ValueError(f"need 0 <= t_min < t_max <= {NUM_TIMESTEPS - 1}, got t_min={t_min}, t_max={t_max}")
    if mode == "fast":
        t_mid = FAST_MODE_T_MID
        coarse = torch.arange(t_max, t_mid - 1, -((t_max - t_mid + 1) / 4))
        fine = torch.arange(t_mid, t_min - 1, -((t_mid - t_min + 1) / 11))
        timesteps = torch.concat([coarse, fine])
    else:
        n = steps + 1
        timesteps = torch.arange(t_max, t_min - 1, -((t_max - t_min + 1) / n))
    timesteps = timesteps.clamp_(t_min, t_max).to(torch.float32)
    if not bool((timesteps[1:] < timesteps[:-1]).all()):
        raise ValueError(f"mode={mode!r} with t_max={t_max}, t_min={t_min} gives non-decreasing timesteps "
                         f"{timesteps.tolist()}; fast mode needs t_max >= 504 (denoise >= 0.56), use mode='normal'")
    return timesteps


def t_to_sigma(timesteps: torch.Tensor) -> torch.Tensor:
    """k-diffusion sigmas for float timesteps: log-linear interpolation between the integer levels."""
    t = timesteps.float()
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    log_k = _tables()[2].to(t)
    log_sigma = (1 - w) * log_k[low] + w * log_k[high]
    log_sigma[torch.isnan(log_sigma) | torch.isinf(log_sigma)] = float("inf")
    return log_sigma.exp()


def k_sigmas(timesteps: torch.Tensor) -> torch.Tensor:
    """Solver sigmas for ``timesteps``: one per timestep, a final 0 appended, the penultimate one dropped.

    Parameters:
        timesteps (`torch.Tensor`): output of :func:`discretized_timesteps`.

    Returns:
        `torch.Tensor`: float32 sigmas of length ``len(timesteps)``; the solver evaluates the model at all but the last.
    """
    sigmas = t_to_sigma(timesteps)
    sigmas = torch.cat([sigmas, sigmas.new_zeros([1])])
    return torch.cat([sigmas[:-2], sigmas[-1:]])


def sigma_to_t(sigma: torch.Tensor) -> torch.Tensor:
    """Continuous timestep of a k-diffusion sigma (inverse of :func:`t_to_sigma`), shape ``[1]`` for a scalar."""
    if sigma == float("inf"):
        t = torch.full_like(sigma, NUM_TIMESTEPS - 1)
    else:
        log_k = _tables()[2].to(sigma)
        log_sigma = sigma.log()
        dists = log_sigma - log_k[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_k.shape[0] - 2)
        high = low + 1
        lo_val, hi_val = log_k[low], log_k[high]
        w = ((lo_val - log_sigma) / (lo_val - hi_val)).clamp(0, 1)
        t = ((1 - w) * low + w * high).view(sigma.shape)
    return t.unsqueeze(0) if t.ndim == 0 else t


def model_timestep(sigma: torch.Tensor, batch: int = 1) -> torch.Tensor:
    """The integer timestep the network sees at ``sigma`` (also used for x0): ``round(sigma_to_t(sigma))``.

    Parameters:
        sigma (`torch.Tensor`): 0-d k-diffusion sigma.
        batch (`int`, *optional*): batch size of the returned LongTensor.
    """
    return sigma_to_t(sigma).repeat(batch).round().long()


def c_in(sigma: torch.Tensor) -> torch.Tensor:
    """Input scaling of the model at k-sigma ``sigma``: ``1 / (sigma^2 + 1)**0.5`` (that form keeps parity)."""
    return 1 / (sigma**2 + 1.0**2) ** 0.5


def diffuse(x0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
    """Forward diffusion to integer level ``t``: ``alpha_t * x0 + sigma_t * noise``.

    Parameters:
        x0 (`torch.Tensor`): clean latent.
        t (`int`): timestep in [0, 999].
        noise (`torch.Tensor`): standard normal noise shaped like ``x0``.
    """
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} must equal the latent shape {tuple(x0.shape)}")
    sigmas, alphas, _ = _tables()
    return alphas[t].to(x0) * x0 + sigmas[t].to(x0) * noise
