"""STAR's training losses: the v-prediction target and the Dynamic Frequency (DF) loss (official ``train_sr.py``).

The DF loss compares the decoded prediction of the clean video with the ground truth in the Fourier domain. Each
video's per-frame ``rfft2`` coefficients are split by *magnitude* with a soft mask around the 80th percentile of
their magnitudes (so "low" holds the ~80 % smallest coefficients and "high" the ~20 % largest, DC terms included),
and the two parts are compared with L1 losses weighted by the timestep:
``loss_t = 0.01·(c_t·L_low + (1 − c_t)·L_high)``, ``c_t = (t/999)²``, added as ``(1 − t/999)·loss_t``.

Video tensors here are ``[F, 3, H, W]`` (one clip, frame-major, as the VAE returns them) in [-1, 1].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diffusion.schedule import NUM_TIMESTEPS, alphas_vp, sigmas_vp

# Official constants (train_sr.py): percentile, samples of the percentile estimate, mask sharpness, DF scale.
DF_QUANTILE = 0.8
DF_SAMPLES = 10_000
DF_SHARPNESS = 10.0
DF_SCALE = 0.01
# torch.quantile refuses inputs above this many elements; larger exact percentiles go through kthvalue.
_TORCH_QUANTILE_LIMIT = 1 << 24


def schedule_at(t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    ``alpha_t`` and ``sigma_t`` of the official float32 tables, shaped to broadcast over ``like``'s batch rows.

    Parameters:
        t (`torch.Tensor`): ``[B]`` integer timesteps in [0, 999].
        like (`torch.Tensor`): ``[B, ...]`` tensor whose device, dtype and rank the factors take.
    """
    shape = (-1,) + (1,) * (like.ndim - 1)
    index = t.long().cpu()
    return (alphas_vp()[index].to(like).view(shape), sigmas_vp()[index].to(like).view(shape))


def v_target(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The v-prediction target ``(alpha_t·x_t − x0) / sigma_t`` (official ``get_velocity``, same operation order)."""
    alpha, sigma = schedule_at(t, x_t)
    return (alpha * x_t - x0) / sigma


def predicted_x0(out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The clean latent a v-prediction implies: ``alpha_t·x_t − sigma_t·out`` (official ``get_x0``)."""
    alpha, sigma = schedule_at(t, x_t)
    return alpha * x_t - sigma * out


def percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """
    ``torch.quantile(values, q)`` (linear interpolation, differentiable) for any number of elements: above
    torch.quantile's size limit the two neighbouring order statistics come from ``kthvalue``.

    Parameters:
        values (`torch.Tensor`): any shape; all elements are used.
        q (`float`): quantile in [0, 1].

    Returns:
        `torch.Tensor`: 0-d, ``values``' dtype.
    """
    flat = values.reshape(-1)
    if flat.numel() <= _TORCH_QUANTILE_LIMIT:
        return torch.quantile(flat, q)
    position = q * (flat.numel() - 1)
    below = int(position)
    lower = torch.kthvalue(flat, below + 1).values
    if below + 1 >= flat.numel():
        return lower
    upper = torch.kthvalue(flat, below + 2).values
    return torch.lerp(lower, upper, position - below)


def magnitude_cutoff(magnitude: torch.Tensor, *, exact: bool = False, samples: int = DF_SAMPLES,
                     quantile: float = DF_QUANTILE, generator: torch.Generator | None = None,
                     indices: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """
    The DF mask's cutoff: the ``quantile`` of the magnitudes. As officially, when there are more than ``samples``
    magnitudes it is estimated from ``samples`` flat indices drawn with replacement (``torch.randint`` on the CPU);
    ``exact=True`` uses every magnitude instead.

    Parameters:
        magnitude (`torch.Tensor`): ``|rfft2|`` of one video, any shape (flattened in C order).
        exact (`bool`): the exact percentile of all magnitudes (not official above ``samples`` elements).
        samples (`int`): size of the estimate's sample (official 10 000).
        quantile (`float`): official 0.8.
        generator (`torch.Generator`, *optional*): CPU generator of the index draw; None draws from torch's
            global CPU generator, as the official code does.
        indices (`torch.Tensor`, *optional*): ``[samples]`` int64 flat indices to use instead of a draw (e.g. the
            ones a fixture recorded).

    Returns:
        `tuple[torch.Tensor, torch.Tensor | None]`: the 0-d cutoff and the indices used (None when all were).
    """
    flat = magnitude.reshape(-1)
    if exact or flat.numel() <= samples:
        if indices is not None:
            raise ValueError(f"DF cutoff: indices were given but the exact percentile over {flat.numel()} "
                             f"magnitudes is used (exact={exact}, samples={samples}); drop the indices")
        return percentile(flat, quantile), None
    if indices is None:
        indices = torch.randint(0, flat.numel(), (samples,), generator=generator)
    elif indices.ndim != 1 or indices.dtype != torch.int64:
        raise ValueError(f"DF cutoff: indices must be a 1-D int64 tensor, got {indices.dtype} {tuple(indices.shape)}")
    return percentile(flat[indices.to(flat.device)], quantile), indices


@dataclass
class FrequencyParts:
    """The two magnitude-masked parts of a video's spectrum.

    Attributes:
        low (`torch.Tensor`): ``[F, 3, H, W//2+1, 2]`` real and imaginary parts of ``X·mask_low`` (small magnitudes).
        high (`torch.Tensor`): the same for ``X·(1 − mask_low)`` (large magnitudes).
        cutoff (`torch.Tensor`): 0-d magnitude cutoff.
        indices (`torch.Tensor | None`): the flat indices the cutoff was estimated from (None: exact).
    """

    low: torch.Tensor
    high: torch.Tensor
    cutoff: torch.Tensor
    indices: torch.Tensor | None


def frequency_parts(video: torch.Tensor, *, sharpness: float = DF_SHARPNESS, **cutoff_options) -> FrequencyParts:
    """
    Official ``fourier_transform`` of one video: ``X = rfft2`` of each frame and channel (float32, unnormalised),
    ``mask_low = sigmoid(sharpness·(cutoff − |X|))``, the masked spectra as stacked real/imaginary parts.

    Parameters:
        video (`torch.Tensor`): ``[F, 3, H, W]``.
        sharpness (`float`): mask slope (official 10).
        **cutoff_options: `magnitude_cutoff` options (``exact``, ``samples``, ``quantile``, ``generator``,
            ``indices``).
    """
    spectrum = torch.fft.rfft2(video.float())
    magnitude = spectrum.abs()
    cutoff, indices = magnitude_cutoff(magnitude, **cutoff_options)
    mask_low = torch.sigmoid(sharpness * (cutoff - magnitude))
    mask_high = 1 - mask_low
    low, high = spectrum * mask_low, spectrum * mask_high
    return FrequencyParts(torch.stack([low.real, low.imag], -1), torch.stack([high.real, high.imag], -1),
                          cutoff, indices)


@dataclass
class DFTerms:
    """The DF loss of one clip and its parts (0-d float32 tensors; ``loss`` is what enters the total).

    Attributes:
        loss_low, loss_high: L1 between prediction and ground truth of the low / high parts.
        c_t: ``(t/999)²``; loss_t: ``scale·(c_t·loss_low + (1 − c_t)·loss_high)``; weight_t: ``1 − t/999``.
        loss: ``weight·weight_t·loss_t``.
        cutoff_pred, cutoff_gt: the two magnitude cutoffs; indices_pred, indices_gt: their sample indices.
    """

    loss_low: torch.Tensor
    loss_high: torch.Tensor
    c_t: torch.Tensor
    loss_t: torch.Tensor
    weight_t: torch.Tensor
    loss: torch.Tensor
    cutoff_pred: torch.Tensor
    cutoff_gt: torch.Tensor
    indices_pred: torch.Tensor | None = None
    indices_gt: torch.Tensor | None = None


def timestep_weights(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``c_t = (t/999)²`` and ``weight_t = 1 − t/999`` in float32, computed from the integer ``t`` as officially."""
    ratio = t / (NUM_TIMESTEPS - 1)
    return ratio**2, 1 - ratio


def df_loss(pred_video: torch.Tensor, gt_video: torch.Tensor, t: torch.Tensor, *, weight: float = 1.0,
            scale: float = DF_SCALE, sharpness: float = DF_SHARPNESS, exact: bool = False,
            samples: int = DF_SAMPLES, quantile: float = DF_QUANTILE, generator: torch.Generator | None = None,
            indices: tuple[torch.Tensor, torch.Tensor] | None = None) -> DFTerms:
    """
    The Dynamic Frequency loss of one clip (official ``train_sr.py`` lines 683–704 for batch 1).

    The prediction's cutoff indices are drawn before the ground truth's, as officially. The ground-truth parts
    carry no gradient.

    Parameters:
        pred_video (`torch.Tensor`): ``[F, 3, H, W]`` decoded prediction of the clean video.
        gt_video (`torch.Tensor`): ``[F, 3, H, W]`` ground truth in [-1, 1].
        t (`torch.Tensor`): 0-d or ``[1]`` integer timestep.
        weight (`float`): factor of the DF term in the total loss (official 1).
        scale (`float`): the DF scale (official 0.01).
        sharpness, exact, samples, quantile, generator: see `frequency_parts` / `magnitude_cutoff`.
        indices (`tuple`, *optional*): (prediction, ground truth) flat sample indices to inject.

    Returns:
        `DFTerms`
    """
    if pred_video.shape != gt_video.shape or pred_video.ndim != 4:
        raise ValueError(f"DF loss: prediction {tuple(pred_video.shape)} and ground truth {tuple(gt_video.shape)} "
                         f"must be videos [F,3,H,W] of the same shape")
    options = dict(sharpness=sharpness, exact=exact, samples=samples, quantile=quantile, generator=generator)
    pred = frequency_parts(pred_video, indices=None if indices is None else indices[0], **options)
    with torch.no_grad():
        gt = frequency_parts(gt_video, indices=None if indices is None else indices[1], **options)
    loss_low = (pred.low - gt.low).abs().mean()
    loss_high = (pred.high - gt.high).abs().mean()
    c_t, weight_t = timestep_weights(t.reshape(-1)[:1].to(pred.low.device))
    loss_t = scale * (c_t * loss_low + (1 - c_t) * loss_high)
    return DFTerms(loss_low, loss_high, c_t.reshape(()), loss_t.reshape(()), weight_t.reshape(()),
                   (weight * weight_t * loss_t).reshape(()), pred.cutoff, gt.cutoff, pred.indices, gt.indices)
