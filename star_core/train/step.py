"""One STAR training step as plain functions (official ``train_sr.py`` lines 650–708), batch size B ≥ 1.

``encode_clips`` → ``sample_timesteps`` / noise → ``step_loss``: diffuse the HQ latent, run the network with the
LQ latent as the ControlNet hint, the v-prediction MSE, the predicted clean latent decoded in the official 3-frame
VAE windows, the DF loss against the HQ frames, the total. With B = 1 and the official settings the values are the
official ones (``tests/test_train_parity.py``). With B > 1 every clip gets its own t, DF cutoffs and weights, and
the total is the mean of the per-clip totals (the official code only runs B = 1: it folds the batch into frames).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..diffusion.schedule import NUM_TIMESTEPS
from ..vae.base import OFFICIAL_WINDOW
from ..vae.tiled import decode_windows
from .loss import DF_QUANTILE, DF_SAMPLES, DF_SCALE, DFTerms, df_loss, predicted_x0, schedule_at, v_target


@dataclass(frozen=True)
class StepSettings:
    """Settings of the loss; the defaults are the official ones except ``df_gradient``.

    Parameters:
        df_gradient (`bool`, defaults to True): the DF term trains the model through the VAE decoder (the paper's
            intent). False decodes ``pred_x0`` under ``no_grad`` as the released script does, so the DF term is only
            logged and ``loss_v`` alone trains.
        df_weight (`float`, defaults to 1): factor of the DF term in the total (official 1; 0 skips the decode).
        df_scale (`float`, defaults to 0.01): the official scale inside the DF term.
        df_exact (`bool`, defaults to False): exact 80th percentile of all magnitudes instead of the official
            10 000-sample estimate.
        df_samples (`int`, defaults to 10 000): size of the percentile estimate's sample.
        df_quantile (`float`, defaults to 0.8): the cutoff's quantile.
        decode_window (`int`, defaults to 3): frames per VAE decoder call (official 3, no overlap).
        checkpoint_decode (`bool`, defaults to False): recompute the VAE decoder's block activations in backward
            instead of keeping them (only matters with ``df_gradient``).
        t_min, t_max (`int`): range of the uniformly drawn timesteps (official 0..999).
    """

    df_gradient: bool = True
    df_weight: float = 1.0
    df_scale: float = DF_SCALE
    df_exact: bool = False
    df_samples: int = DF_SAMPLES
    df_quantile: float = DF_QUANTILE
    decode_window: int = OFFICIAL_WINDOW
    checkpoint_decode: bool = False
    t_min: int = 0
    t_max: int = NUM_TIMESTEPS - 1

    def __post_init__(self) -> None:
        if not 0 <= self.t_min <= self.t_max <= NUM_TIMESTEPS - 1:
            raise ValueError(f"StepSettings: need 0 <= t_min <= t_max <= {NUM_TIMESTEPS - 1}, got "
                             f"t_min={self.t_min}, t_max={self.t_max}")
        if self.df_weight < 0 or self.df_samples < 1 or not 0 <= self.df_quantile <= 1 or self.decode_window < 1:
            raise ValueError(f"StepSettings: df_weight must be >= 0, df_samples >= 1, df_quantile in [0, 1] and "
                             f"decode_window >= 1; got {self}")


@dataclass
class StepResult:
    """What one step computed.

    Attributes:
        loss (`torch.Tensor`): 0-d total to back-propagate (mean over the batch of ``loss_v + weight·weight_t·
            loss_t``).
        loss_v (`torch.Tensor`): 0-d mean v-prediction MSE over the batch.
        df (`list[DFTerms]`): the DF terms of every clip (empty when ``df_weight`` is 0).
        t (`torch.Tensor`): ``[B]`` timesteps.
        x_t, v_target, out, pred_x0 (`torch.Tensor`): ``[B,4,F,h,w]`` intermediates (``out`` and ``pred_x0`` keep
            their ``.grad`` after backward when the step ran with ``retain=True``).
        pred_video (`torch.Tensor | None`): ``[B,F,3,H,W]`` decoded prediction (None without DF).
    """

    loss: torch.Tensor
    loss_v: torch.Tensor
    df: list[DFTerms]
    t: torch.Tensor
    x_t: torch.Tensor
    v_target: torch.Tensor
    out: torch.Tensor
    pred_x0: torch.Tensor
    pred_video: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def terms(self) -> dict[str, float]:
        """Batch means of the logged terms as floats: loss, loss_v, loss_df, loss_low, loss_high."""
        values = {"loss": self.loss.item(), "loss_v": self.loss_v.item()}
        if self.df:
            for name in ("loss", "loss_low", "loss_high"):
                mean = torch.stack([getattr(terms, name).detach().float() for terms in self.df]).mean().item()
                values["loss_df" if name == "loss" else name] = mean
        return values


def sample_timesteps(batch: int, settings: StepSettings, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[batch]`` int64 timesteps drawn uniformly from ``t_min..t_max`` on the CPU (official: 0..999)."""
    return torch.randint(settings.t_min, settings.t_max + 1, (batch,), generator=generator)


def encode_clips(vae, clips: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """
    Encodes a batch of clips with the VAE's official per-frame posterior sample (``× scaling_factor``).

    Parameters:
        vae (`VideoVAE`): e.g. `star_core.vae.SVDVideoVAE`.
        clips (`torch.Tensor`): ``[B,F,3,H,W]`` in [-1, 1].
        generator (`torch.Generator`, *optional*): CPU generator of the posterior noise.

    Returns:
        `torch.Tensor`: ``[B,4,F,H/8,W/8]`` float32 latents on ``clips.device``.
    """
    if clips.ndim != 5 or clips.shape[2] != 3:
        raise ValueError(f"encode_clips: clips must be [B,F,3,H,W] in [-1, 1], got {tuple(clips.shape)}")
    return torch.cat([vae.encode(clip, generator=generator) for clip in clips])


def decode_latent(vae, latent: torch.Tensor, *, window: int = OFFICIAL_WINDOW, grad: bool = True,
                  checkpointed: bool = False) -> torch.Tensor:
    """
    Official ``vae_decode_chunk`` of one clip's latent with gradients: consecutive windows of ``window`` frames
    (the last may be shorter), each ``decoder(z / scaling_factor, num_frames=n)``, not clamped.

    Parameters:
        vae (`SVDVideoVAE`): the VAE (its ``model`` is the diffusers ``AutoencoderKLTemporalDecoder``).
        latent (`torch.Tensor`): ``[1,4,F,h,w]`` scaled latent.
        window (`int`): frames per decoder call.
        grad (`bool`): keep the graph (False decodes under ``no_grad``, as the released script).
        checkpointed (`bool`): recompute the activations of each decoder block in backward instead of keeping
            them (diffusers' gradient checkpointing; the full-resolution blocks dominate training memory).

    Returns:
        `torch.Tensor`: ``[F,3,8h,8w]`` float32.
    """
    model = vae.model
    dtype = next(model.parameters()).dtype

    def decode_fn(z: torch.Tensor, frames: int) -> torch.Tensor:
        return model.decode(z.to(dtype) / vae.scaling_factor, num_frames=frames).sample

    inner = checkpointed and grad and not model.is_gradient_checkpointing
    if inner:
        model.enable_gradient_checkpointing()
    try:
        with contextlib.nullcontext() if grad else torch.no_grad():
            return decode_windows(decode_fn, latent, vae.downscale, window=window, window_overlap=0)
    finally:
        if inner:
            model.disable_gradient_checkpointing()


def step_loss(model: torch.nn.Module, vae, z_hq: torch.Tensor, z_lq: torch.Tensor, context: torch.Tensor,
              hq_video: torch.Tensor, settings: StepSettings = StepSettings(), *,
              t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
              generator: torch.Generator | None = None, df_indices: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
              retain: bool = False) -> StepResult:
    """
    The loss of one training step from encoded latents (official lines 665–704).

    Random draws, in order, all from ``generator`` on the CPU unless injected: ``t`` (``[B]``), ``noise``
    (``[B,4,F,h,w]``), then per clip the DF cutoff indices of the prediction and of the ground truth.

    Parameters:
        model (`torch.nn.Module`): `STARUNet` (in training mode or not, as the caller wants).
        vae (`SVDVideoVAE`): decodes ``pred_x0`` for the DF loss.
        z_hq (`torch.Tensor`): ``[B,4,F,h,w]`` HQ latent (x0).
        z_lq (`torch.Tensor`): ``[B,4,F,h,w]`` LQ latent (ControlNet hint).
        context (`torch.Tensor`): ``[B,77,1024]`` text context.
        hq_video (`torch.Tensor`): ``[B,F,3,H,W]`` HQ frames in [-1, 1] (the DF loss's ground truth).
        settings (`StepSettings`): loss settings.
        t (`torch.Tensor`, *optional*): ``[B]`` integer timesteps to use instead of a draw.
        noise (`torch.Tensor`, *optional*): ``[B,4,F,h,w]`` noise to use instead of a draw.
        generator (`torch.Generator`, *optional*): CPU generator of the draws (None: torch's global generator).
        df_indices (`list`, *optional*): per clip, the (prediction, ground truth) cutoff sample indices.
        retain (`bool`): keep ``.grad`` on ``out`` and ``pred_x0`` after backward (for inspection).

    Returns:
        `StepResult`
    """
    batch = z_hq.shape[0]
    if z_lq.shape != z_hq.shape or hq_video.ndim != 5 or hq_video.shape[0] != batch \
            or hq_video.shape[1] != z_hq.shape[2]:
        raise ValueError(f"step_loss: z_hq {tuple(z_hq.shape)} and z_lq {tuple(z_lq.shape)} must be [B,4,F,h,w] "
                         f"and hq_video [B,F,3,H,W] with the same B and F, got {tuple(hq_video.shape)}")
    if t is None:
        t = sample_timesteps(batch, settings, generator)
    t = t.reshape(-1).long().to(z_hq.device)
    if noise is None:
        noise = torch.randn(z_hq.shape, generator=generator).to(z_hq.device)
    alpha, sigma = schedule_at(t, z_hq)
    x_t = alpha * z_hq + sigma * noise.to(z_hq)
    out = model(x_t, t, context, z_lq).float()
    target = v_target(z_hq, x_t, t)
    loss_v = ((out - target) ** 2).flatten(1).mean(1)
    pred_x0 = predicted_x0(out, x_t, t)
    if retain:
        out.retain_grad()
        pred_x0.retain_grad()
    total = loss_v
    df_terms: list[DFTerms] = []
    pred_video = None
    if settings.df_weight > 0:
        decoded, df_losses = [], []
        for b in range(batch):
            latent = pred_x0[b:b + 1] if settings.df_gradient else pred_x0[b:b + 1].detach()
            video = decode_latent(vae, latent, window=settings.decode_window, grad=settings.df_gradient,
                                  checkpointed=settings.checkpoint_decode)
            if retain and video.requires_grad:
                video.retain_grad()
            terms = df_loss(video, hq_video[b].to(video.device), t[b], weight=settings.df_weight,
                            scale=settings.df_scale, exact=settings.df_exact, samples=settings.df_samples,
                            quantile=settings.df_quantile, generator=generator,
                            indices=None if df_indices is None else df_indices[b])
            decoded.append(video)
            df_terms.append(terms)
            df_losses.append(terms.loss)
        total = total + torch.stack(df_losses)
        pred_video = torch.stack(decoded) if retain else None
        extra = {"pred_videos": decoded} if retain else {}
    else:
        extra = {}
    return StepResult(total.mean(), loss_v.mean(), df_terms, t, x_t, target, out, pred_x0, pred_video, extra)
