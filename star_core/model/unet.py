"""STARUNet: the I2VGen-XL video UNet with the VideoControlNet (official ``ControlledV2VUNet``)."""
from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from ..identify import check_context_width
from .config import GROUPS, STARConfig
from .controlnet import VideoControlNet
from .embedding import build_time_embed
from .encoder import apply_layer, build_input_blocks, build_middle_block, make_conditioning, run_block
from .resblock import ResBlock, Upsample
from .transformer import SpatialTransformer, TemporalTransformer


def latent_size_fits(size: int, levels: int, axis: str) -> bool:
    """
    Whether a latent height (``axis="h"``) or width (``axis="w"``) of ``size`` cells comes back to the same size
    through the UNet's down/up path: each Downsample gives H → ⌊(H+1)/2⌋+1, W → ⌊(W-1)/2⌋+1 and each Upsample
    H → 2H-2, W → 2W, so every downsampled level must be even. For the released 4-level network this is
    H ≡ 2 (mod 8), W ≡ 0 (mod 8).

    Parameters:
        size (`int`): latent cells on the axis (≥ 1).
        levels (`int`): number of resolution levels (``len(config.dim_mult)``).
        axis (`str`): ``"h"`` or ``"w"``.
    """
    if axis not in ("h", "w"):
        raise ValueError(f"axis must be 'h' or 'w', got {axis!r}")
    for _ in range(levels - 1):
        if size % 2:
            return False
        size = (size + 1) // 2 + 1 if axis == "h" else (size - 1) // 2 + 1
    return True


def check_latent_size(height: int, width: int, levels: int) -> None:
    """
    Raises ValueError unless a latent of this size comes back to the same size through the UNet's down/up path
    (see :func:`latent_size_fits`).

    Parameters:
        height (`int`): latent height.
        width (`int`): latent width.
        levels (`int`): number of resolution levels (``len(config.dim_mult)``).
    """
    if not (latent_size_fits(height, levels, "h") and latent_size_fits(width, levels, "w")):
        ok_h = [h for h in range(max(1, height - 8), height + 9) if latent_size_fits(h, levels, "h")]
        ok_w = [w for w in range(max(1, width - 16), width + 17) if latent_size_fits(w, levels, "w")]
        raise ValueError(f"latent size {height}x{width} does not fit the {levels}-level STAR UNet: pad the latent to a "
                         f"valid size (valid heights near {height}: {ok_h}; valid widths near {width}: {ok_w})")


class STARUNet(nn.Module):
    """
    The STAR network: UNet (top-level keys) plus ``VideoControlNet``; state-dict keys are the official names.

    Parameters:
        config (`STARConfig`): architecture (defaults: the released model).
        operations (`module`): layer namespace providing Linear, Conv1d/2d/3d, GroupNorm, LayerNorm
            (``torch.nn`` or a host's cast ops).
        device (`torch.device`, *optional*): where to create the parameters (``"meta"`` for a free skeleton).
        dtype (`torch.dtype`, *optional*): parameter dtype.
        compute_dtype (`torch.dtype`, *optional*): dtype of the forward pass (inputs are cast to it); default the
            parameter dtype. A different one needs ``operations`` that cast weights, e.g. `star_core.model.cast_ops`.
    """

    def __init__(self, config: STARConfig | None = None, operations: ModuleType = nn, device=None, dtype=None,
                 compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        config = STARConfig() if config is None else config
        kw = {"device": device, "dtype": dtype}
        self.config = config
        self.compute_dtype = compute_dtype
        self.time_embed = build_time_embed(config.dim, config.embed_dim, operations, **kw)
        self.input_blocks, skip_widths = build_input_blocks(config, operations, **kw)
        self.middle_block = build_middle_block(config, operations, **kw)
        self.output_blocks = nn.ModuleList()
        in_ch = config.dim * config.dim_mult[-1]
        for level in reversed(range(len(config.dim_mult))):
            out_ch = config.dim * config.dim_mult[level]
            for j in range(config.num_res_blocks + 1):
                layers: list[nn.Module] = [ResBlock(in_ch + skip_widths.pop(), config.embed_dim, out_ch, operations, **kw)]
                if config.level_has_attention(level):
                    layers += [SpatialTransformer(out_ch, config.head_dim, config.context_dim, operations, **kw),
                               TemporalTransformer(out_ch, out_ch // config.head_dim, config.head_dim, operations, **kw)]
                if level and j == config.num_res_blocks:
                    layers.append(Upsample(out_ch, operations, **kw))
                self.output_blocks.append(nn.ModuleList(layers))
                in_ch = out_ch
        self.out = nn.Sequential(operations.GroupNorm(GROUPS, in_ch, **kw), nn.SiLU(),
                                 operations.Conv2d(in_ch, config.out_dim, 3, padding=1, **kw))
        self.VideoControlNet = VideoControlNet(config, operations, compute_dtype=compute_dtype, **kw)

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype: ``compute_dtype`` if set, else the parameter dtype."""
        return self.compute_dtype or self.out[2].weight.dtype

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                      hint: torch.Tensor | None) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_dim:
            raise ValueError(f"x must be a latent [B,{cfg.in_dim},F,H,W], got shape {tuple(x.shape)}")
        b = x.shape[0]
        if hint is not None and hint.shape != x.shape:
            raise ValueError(f"hint must have the latent's shape {tuple(x.shape)}, got {tuple(hint.shape)}")
        if context.ndim != 3 or context.shape[0] != b:
            raise ValueError(f"context must be [B={b}, L, {cfg.context_dim}] (one text row per batch element), "
                             f"got {tuple(context.shape)}")
        check_context_width(context, cfg.context_dim)
        t = torch.as_tensor(t, device=x.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(b)
        if t.numel() != b:
            raise ValueError(f"t must hold 1 or B={b} timesteps, got shape {tuple(t.shape)}")
        check_latent_size(x.shape[3], x.shape[4], len(cfg.dim_mult))
        return t

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                hint: torch.Tensor | None = None) -> torch.Tensor:
        """
        One network evaluation (the official ``ControlledV2VUNet.forward``).

        Parameters:
            x (`torch.Tensor`): ``[B, in_dim, F, H, W]`` noisy latent (already scaled by c_in), any F ≥ 1.
            t (`torch.Tensor`): ``[B]`` timesteps (a single value is broadcast).
            context (`torch.Tensor`): ``[B, L, context_dim]`` text embeddings, one row per batch element.
            hint (`torch.Tensor`, *optional*): ``[B, in_dim, F, H, W]`` LR latent for the ControlNet; ``None`` runs
                the ControlNet without the hint injection.

        Returns:
            `torch.Tensor`: ``[B, out_dim, F, H, W]`` v-prediction, in the compute dtype.
        """
        t = self._check_inputs(x, t, context, hint)
        b, c, f, h, w = x.shape
        dtype = self.dtype
        frames = x.to(dtype).transpose(1, 2).reshape(b * f, c, h, w)
        if hint is not None:
            hint = hint.to(dtype).transpose(1, 2).reshape(b * f, c, h, w)
        cond = make_conditioning(self.time_embed, self.config.dim, t, context, f, dtype)
        controls = self.VideoControlNet.residuals(frames, hint, self.VideoControlNet.conditioning(t, context, f))
        # The ControlNet runs in lockstep with the encoder and each residual is folded into its skip at once, so
        # only the sums are kept (the official code keeps both lists); skip + control keeps the official operand order.
        skips = []
        for block in self.input_blocks:
            frames = run_block(block, frames, cond)
            skips.append(frames + next(controls))
        for layer in self.middle_block:
            frames = apply_layer(layer, frames, cond)
        frames = next(controls) + frames
        for block in self.output_blocks:
            # Every decoder block starts with a ResBlock on [frames, skip]; dropping each name as soon as its tensor
            # is consumed keeps neither the previous output nor the concatenation alive for the rest of the block.
            joined = torch.cat([frames, skips.pop()], dim=1)
            del frames
            frames = apply_layer(block[0], joined, cond)
            del joined
            for layer in block[1:]:
                frames = apply_layer(layer, frames, cond)
        out = self.out(frames)
        return out.view(b, f, -1, h, w).transpose(1, 2).contiguous()
