"""Exact spatial tiling of the SVD VAE: tiled encode/decode whose output equals the untiled network.

Independent tiles differ from the whole frame because three kinds of layers see more than a neighbourhood: every
GroupNorm normalises with statistics of the whole frame (the temporal blocks' norms: of the whole window of frames),
the mid-block attention attends over the whole frame, and stacked convolutions see further than any fixed overlap
hides. Here the network is re-expressed as a short program over the diffusers modules (their weights are used as
they are) that splits it at those non-local layers:

* a `Chain` is a run of local layers (convolutions, with the frame-border zero padding and the encoder's
  asymmetric down-sampling pad, nearest up-sampling, SiLU, residual adds, the temporal blocks' ``(3,1,1)``
  convolutions, the spatial/temporal mix) that starts at most with one GroupNorm. It runs tile by tile: each tile
  computes its non-overlapping *core* of the chain's output from a window of the chain's inputs that carries a halo
  exactly as wide as the chain's receptive field, derived layer by layer from the kernels, strides, paddings and
  up-sampling factors (clipped at the frame border, where the network's own zero padding is applied instead);
* a GroupNorm at the head of a chain uses statistics reduced over the cores of *all* tiles of its input: each
  tile's per-(frame, group) count, mean and centred sum of squares are merged in float64 (Chan's parallel
  formula, which keeps the between-tile variance term), over the window's frames for the temporal blocks;
* an `Attend` step gives the mid-block attention the keys and values of the whole frame (gathered from every
  tile's core) and queries per tile.

Between steps the outputs of all tiles live in full-frame buffers ("parked" on the device, or on the host when
the device is short of memory); a tile never recomputes a neighbour's work beyond its halo of a layer or two, so
the compute is that of the untiled network plus the halos (a few pixels per tile edge). Besides the parked values
the device holds one tile's working set at a time, plus the keys and values of one attention (``2·C·h·w``
numbers). The price: every step reads and writes its full-frame values once, which is a host-device round trip
per step for values parked on the host (`parking_cost` counts the bytes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..windows import Span, plan_windows
from .base import PARK_CHOICES

Rect = tuple[Span, Span]  # (rows, columns), half-open
Park = Literal["auto", "device", "host"]
Tick = Callable[[], None]

# Queries are split so that at most this many attention scores exist at once (CPU SDPA may build the matrix).
_SCORES_PER_CHUNK = 1 << 26


class UnsupportedLayer(NotImplementedError):
    """The VAE holds a layer variant the exact tiled executor does not re-express."""


def _unsupported(what: str) -> UnsupportedLayer:
    return UnsupportedLayer(f"exact VAE tiling does not support {what}; use SpatialTiling(..., mode='fast') or no "
                            "tiling for this VAE")


# --- the tile grid ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TileGrid:
    """Non-overlapping tile cores on the latent grid; a value at ``scale`` × the latent resolution scales them.

    Parameters:
        rows (`tuple[tuple[int, int], ...]`): consecutive row spans covering ``range(height)`` of the latent.
        cols (`tuple[tuple[int, int], ...]`): consecutive column spans covering ``range(width)`` of the latent.
    """

    rows: tuple[Span, ...]
    cols: tuple[Span, ...]

    @classmethod
    def plan(cls, height: int, width: int, tile: int) -> "TileGrid":
        """Cores of ``tile`` latent pixels (the last row/column of tiles may be narrower)."""
        return cls(plan_windows(height, tile, 0, "cut").spans, plan_windows(width, tile, 0, "cut").spans)

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    @property
    def size(self) -> tuple[int, int]:
        """The latent frame ``(height, width)`` the cores cover."""
        return self.rows[-1][1], self.cols[-1][1]

    def cores(self, scale: int) -> list[Rect]:
        """The tile cores, row-major, in the coordinates of a value at ``scale`` × the latent resolution."""
        return [((r0 * scale, r1 * scale), (c0 * scale, c1 * scale)) for r0, r1 in self.rows for c0, c1 in self.cols]


# --- local operations ------------------------------------------------------------------------------------------

class _Pointwise:
    """A layer that maps each spatial position to itself (its tile window is its output window)."""

    def scale(self, scale: int) -> int:
        return scale

    def out_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return size

    def need(self, out: Rect, size: tuple[int, int]) -> Rect:
        return out


@dataclass(frozen=True, eq=False)
class Norm(_Pointwise):
    """GroupNorm (+ SiLU) with statistics of the whole frame (or window): only ever the first layer of a chain.

    Parameters:
        module (`nn.GroupNorm`): the norm whose affine parameters and eps are used.
        window (`bool`): statistics over all frames of the window (the temporal blocks' 5-D GroupNorm) rather
            than per frame (the spatial layers, which see frames as a batch).
        act (`bool`): apply SiLU afterwards.
    """

    module: nn.GroupNorm
    window: bool = False
    act: bool = True

    def coefficients(self, moments: "GroupMoments") -> tuple[torch.Tensor, torch.Tensor]:
        """Per-(frame, channel) ``scale, shift`` (float32 ``[N,C]``): ``norm(x) = x·scale + shift``."""
        count, mean, m2 = moments.merged() if self.window else (moments.count, moments.mean, moments.m2)
        rstd = (m2 / count + self.module.eps).rsqrt()
        per_group = self.module.num_channels // self.module.num_groups
        rstd, mean = rstd.repeat_interleave(per_group, 1), mean.repeat_interleave(per_group, 1)
        weight = self.module.weight.detach().cpu().double() if self.module.affine else 1.0
        bias = self.module.bias.detach().cpu().double() if self.module.affine else 0.0
        scale = rstd * weight
        return scale.float(), (bias - mean * scale).float()

    def apply(self, x: torch.Tensor, ctx: "_Context", pad: tuple[int, int, int, int] | None = None
              ) -> torch.Tensor:
        """Normalises a window; ``pad`` (F.pad order) writes it into a zero border (the next convolution's)."""
        scale, shift = (c[:, :, None, None] for c in ctx.coefficients(self))
        # like torch.autocast's fp32 GroupNorm: float32 out under autocast, the input dtype otherwise
        dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype
        if not pad or not any(pad):
            y = torch.addcmul(shift, x.float(), scale).to(dtype)
        else:
            left, right, top, bottom = pad
            n, c, h, w = x.shape
            y = x.new_empty((n, c, h + top + bottom, w + left + right), dtype=dtype)
            for border in (y[:, :, :top], y[:, :, top + h:], y[:, :, :, :left], y[:, :, :, left + w:]):
                border.zero_()
            torch.addcmul(shift, x.float(), scale, out=y[:, :, top:top + h, left:left + w])
        return F.silu(y, inplace=True) if self.act else y  # silu(0) = 0 keeps the border


@dataclass(frozen=True, eq=False)
class Conv:
    """A 2-D convolution, optionally after nearest up-sampling, zero-padded only at the frame border.

    Parameters:
        module (`nn.Conv2d`): the convolution (its own symmetric ``padding`` is honoured).
        extra (`tuple[int, int]`): additional zero padding (before, after) on both axes (Downsample2D pads
            ``(0, 1)`` when its convolution has no padding).
        up (`int`): nearest up-sampling factor applied before the convolution (Upsample2D: 2).
    """

    module: nn.Conv2d
    extra: tuple[int, int] = (0, 0)
    up: int = 1

    def __post_init__(self) -> None:
        m = self.module
        if tuple(m.dilation) != (1, 1) or m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise _unsupported(f"a dilated, grouped, non-zero-padded or 'same'-padded convolution ({m})")

    def _axis(self, axis: int) -> tuple[int, int, int, int]:
        pad = self.module.padding[axis]
        return self.module.kernel_size[axis], self.module.stride[axis], pad + self.extra[0], pad + self.extra[1]

    def scale(self, scale: int) -> int:
        stride = self.module.stride[0]
        if self.module.stride[0] != self.module.stride[1] or (scale * self.up) % stride:
            raise _unsupported(f"a convolution with stride {self.module.stride} at relative scale {scale}")
        return scale * self.up // stride

    def out_size(self, size: tuple[int, int]) -> tuple[int, int]:
        out = []
        for axis, length in enumerate(size):
            kernel, stride, before, after = self._axis(axis)
            out.append((self.up * length + before + after - kernel) // stride + 1)
        return out[0], out[1]

    def _wanted(self, span: Span, axis: int) -> Span:
        """The up-sampled input positions (unclipped; negative or past the end = border padding) for ``span``."""
        kernel, stride, before, _ = self._axis(axis)
        return span[0] * stride - before, (span[1] - 1) * stride + kernel - before

    def need(self, out: Rect, size: tuple[int, int]) -> Rect:
        spans = []
        for axis in range(2):
            lo, hi = self._wanted(out[axis], axis)
            lo, hi = max(lo, 0), min(hi, self.up * size[axis])
            spans.append((lo // self.up, -(-hi // self.up)))
        return spans[0], spans[1]

    def border(self, ctx: "_Context") -> tuple[tuple[slice, slice], tuple[int, int, int, int]]:
        """The crop of the (up-sampled) input window and the frame-border zero padding (F.pad order)."""
        crop, pad = [], []
        for axis in range(2):
            lo, hi = self._wanted(ctx.out_rect[axis], axis)
            start, length = self.up * ctx.in_rect[axis][0], self.up * ctx.size[axis]
            clip_lo, clip_hi = max(lo, 0), min(hi, length)
            crop.append(slice(clip_lo - start, clip_hi - start))
            pad.append((clip_lo - lo, hi - clip_hi))
        return (crop[0], crop[1]), (*pad[1], *pad[0])

    def apply(self, x: torch.Tensor, ctx: "_Context", padded: bool = False) -> torch.Tensor:
        """Convolves a window; ``padded``: the window is already exactly the padded input (see `Norm.apply`)."""
        if not padded:
            if self.up > 1:
                x = F.interpolate(x, scale_factor=float(self.up), mode="nearest")
            crop, pad = self.border(ctx)
            x = x[:, :, crop[0], crop[1]]
            if any(pad):
                x = F.pad(x, pad)
        return F.conv2d(x, self.module.weight, self.module.bias, self.module.stride)


@dataclass(frozen=True, eq=False)
class TimeConv(_Pointwise):
    """A ``(k,1,1)`` Conv3d over the window's frames (``[N,C,h,w]`` is treated as one clip ``[1,C,N,h,w]``)."""

    module: nn.Conv3d

    def __post_init__(self) -> None:
        m = self.module
        if (tuple(m.kernel_size[1:]) != (1, 1) or tuple(m.stride) != (1, 1, 1) or tuple(m.padding[1:]) != (0, 0)
                or tuple(m.dilation) != (1, 1, 1) or m.groups != 1 or m.padding_mode != "zeros"):
            raise _unsupported(f"a Conv3d that is not a (k,1,1) temporal convolution ({m})")

    def apply(self, x: torch.Tensor, ctx: "_Context") -> torch.Tensor:
        clip = x.transpose(0, 1).unsqueeze(0)
        out = F.conv3d(clip, self.module.weight, self.module.bias, padding=self.module.padding)
        return out[0].transpose(0, 1)


@dataclass(frozen=True, eq=False)
class Add(_Pointwise):
    """Residual: ``(shortcut(value) + x) / rescale`` with an optional 1x1 shortcut convolution."""

    value: str
    shortcut: nn.Conv2d | None = None
    rescale: float = 1.0

    def apply(self, x: torch.Tensor, ctx: "_Context") -> torch.Tensor:
        residual = ctx.fetch(self.value)
        if self.shortcut is not None:
            residual = F.conv2d(residual, self.shortcut.weight, self.shortcut.bias)
        out = residual + x
        return out / self.rescale if self.rescale != 1.0 else out


@dataclass(frozen=True, eq=False)
class Mix(_Pointwise):
    """The SVD decoder's `AlphaBlender`: ``alpha·value + (1 - alpha)·x`` (``value`` spatial, ``x`` temporal)."""

    blender: nn.Module
    value: str

    def apply(self, x: torch.Tensor, ctx: "_Context") -> torch.Tensor:
        spatial = ctx.fetch(self.value)
        frames = x.shape[0]
        indicator = torch.zeros(1, frames, device=x.device, dtype=x.dtype)
        alpha = self.blender.get_alpha(indicator, 5)
        if alpha.ndim == 5:  # [1,1,N,1,1] -> [N,1,1,1]
            alpha = alpha[0].transpose(0, 1)
        alpha = alpha.to(spatial.dtype)
        if self.blender.switch_spatial_to_temporal_mix:
            alpha = 1.0 - alpha
        return alpha * spatial + (1.0 - alpha) * x


LocalOp = Union[Norm, Conv, TimeConv, Add, Mix]


# --- the program -----------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Chain:
    """Local layers from one parked value to the next; a `Norm` may only come first."""

    out: str
    source: str
    ops: tuple[LocalOp, ...]


@dataclass(frozen=True, eq=False)
class Attend:
    """Single-frame self-attention (diffusers `Attention` with group norm and residual), keys of the whole frame."""

    out: str
    source: str
    attn: nn.Module


Step = Union[Chain, Attend]


@dataclass
class Program:
    """The network as steps between parked full-frame values.

    Parameters:
        steps (`list[Step]`): in execution order; value ``"input"`` is the network input.
        scales (`dict[str, int]`): every value's resolution as a multiple of the latent grid's.
        channels (`dict[str, int]`): every value's channels.
        groups (`dict[str, int]`): values whose GroupNorm statistics a later step needs → number of groups.
        output (`str`): the value returned.
    """

    steps: list[Step]
    scales: dict[str, int]
    channels: dict[str, int]
    groups: dict[str, int]
    output: str

    @property
    def sweeps(self) -> int:
        """Passes over all tiles per run (an attention needs two: keys/values, then queries)."""
        return sum(2 if isinstance(step, Attend) else 1 for step in self.steps)

    def size(self, name: str, grid: "TileGrid") -> tuple[int, int]:
        """A value's full-frame ``(H, W)`` on ``grid``'s frame."""
        height, width = grid.size
        return height * self.scales[name], width * self.scales[name]

    def chain_sizes(self, step: "Chain", grid: "TileGrid") -> list[tuple[int, int]]:
        """The frame size at the input of every layer of ``step``, then at its output."""
        sizes = [self.size(step.source, grid)]
        for op in step.ops:
            sizes.append(op.out_size(sizes[-1]))
        if sizes[-1] != self.size(step.out, grid):
            raise _unsupported(f"a layer sequence that maps {sizes[0]} to {sizes[-1]} instead of "
                               f"{self.size(step.out, grid)} (frame sizes must be multiples of the VAE factor)")
        return sizes

    def last_use(self) -> dict[str, int]:
        """Value → index of the last step that reads it."""
        last: dict[str, int] = {}
        for index, step in enumerate(self.steps):
            reads = [step.source]
            if isinstance(step, Chain):
                reads += [op.value for op in step.ops if isinstance(op, (Add, Mix))]
            for name in reads:
                last[name] = index
        return last


class _Builder:
    """Appends layers to the chain being built; a GroupNorm or an attention first parks the current value."""

    def __init__(self, input_scale: int, input_channels: int) -> None:
        self.steps: list[Step] = []
        self.scales, self.channels = {"input": input_scale}, {"input": input_channels}
        self.groups: dict[str, int] = {}
        self.current, self.scale, self.width = "input", input_scale, input_channels
        self.pending: tuple[str, list[LocalOp]] | None = None

    def _name(self) -> str:
        return f"v{len(self.steps)}"

    def park(self) -> str:
        """Ends the chain being built; returns the name of the (parked) current value."""
        if self.pending is not None:
            source, ops = self.pending
            name = self._name()
            self.steps.append(Chain(name, source, tuple(ops)))
            self.scales[name], self.channels[name], self.current, self.pending = self.scale, self.width, name, None
        return self.current

    def local(self, *ops: LocalOp) -> None:
        for op in ops:
            if isinstance(op, Norm):
                self.groups[self.park()] = op.module.num_groups
            if self.pending is None:
                self.pending = (self.current, [])
            self.pending[1].append(op)
            self.scale = op.scale(self.scale)
            if isinstance(op, (Conv, TimeConv)):
                self.width = op.module.out_channels

    def attend(self, attn: nn.Module) -> None:
        _check_attention(attn)
        source = self.park()
        if attn.group_norm is not None:
            self.groups[source] = attn.group_norm.num_groups
        name = self._name()
        self.steps.append(Attend(name, source, attn))
        self.scales[name], self.channels[name], self.current = self.scale, self.width, name

    def program(self) -> Program:
        output = self.park()
        return Program(self.steps, self.scales, self.channels, self.groups, output)


def _check_silu(module: nn.Module, where: str) -> None:
    if not isinstance(module, nn.SiLU):
        raise _unsupported(f"the activation {type(module).__name__} in {where} (only SiLU)")


def _check_attention(attn: nn.Module) -> None:
    if (getattr(attn, "spatial_norm", None) is not None or getattr(attn, "norm_q", None) is not None
            or getattr(attn, "norm_k", None) is not None or getattr(attn, "add_k_proj", None) is not None
            or getattr(attn, "is_causal", False) or attn.to_k is None):
        raise _unsupported("an attention with spatial/query/key norms, added projections or a causal mask")


def _resnet2d(b: _Builder, r: nn.Module) -> None:
    """diffusers `ResnetBlock2D` without time embedding or resampling."""
    if (r.time_emb_proj is not None or r.upsample is not None or r.downsample is not None
            or r.time_embedding_norm != "default"):
        raise _unsupported("a ResnetBlock2D with a time embedding or its own resampling")
    _check_silu(r.nonlinearity, "a ResnetBlock2D")
    x = b.park()
    b.local(Norm(r.norm1), Conv(r.conv1))
    b.local(Norm(r.norm2), Conv(r.conv2), Add(x, r.conv_shortcut, float(r.output_scale_factor)))


def _spatio_temporal(b: _Builder, block: nn.Module) -> None:
    """diffusers `SpatioTemporalResBlock` without time embedding (the SVD decoder's)."""
    _resnet2d(b, block.spatial_res_block)
    spatial = b.park()
    t = block.temporal_res_block
    if t.time_emb_proj is not None or t.conv_shortcut is not None:
        raise _unsupported("a TemporalResnetBlock with a time embedding or a shortcut convolution")
    _check_silu(t.nonlinearity, "a TemporalResnetBlock")
    b.local(Norm(t.norm1, window=True), TimeConv(t.conv1))
    b.local(Norm(t.norm2, window=True), TimeConv(t.conv2), Add(spatial), Mix(block.time_mixer, spatial))


def encoder_program(model: nn.Module) -> Program:
    """The program of ``model.quant_conv(model.encoder(x))`` (diffusers `Encoder` + 1x1 quant conv).

    Parameters:
        model (`AutoencoderKLTemporalDecoder`): the VAE.

    Returns:
        `Program`: input ``[1,3,H,W]`` at ``2**(levels-1)`` × the latent resolution, output the moments.
    """
    enc = model.encoder
    levels = len(enc.down_blocks)
    b = _Builder(2 ** (levels - 1), enc.conv_in.in_channels)
    b.local(Conv(enc.conv_in))
    for block in enc.down_blocks:
        if getattr(block, "attentions", None):
            raise _unsupported(f"the encoder block {type(block).__name__} (attention inside a down block)")
        for resnet in block.resnets:
            _resnet2d(b, resnet)
        for down in block.downsamplers or ():
            if not down.use_conv or down.norm is not None:
                raise _unsupported("a Downsample2D without a convolution or with a norm")
            b.local(Conv(down.conv, extra=(0, 1) if down.padding == 0 else (0, 0)))
    mid = enc.mid_block
    _resnet2d(b, mid.resnets[0])
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            b.attend(attn)
        _resnet2d(b, resnet)
    _check_silu(enc.conv_act, "the encoder output")
    b.local(Norm(enc.conv_norm_out), Conv(enc.conv_out), Conv(model.quant_conv))
    return b.program()


def decoder_program(model: nn.Module) -> Program:
    """The program of ``model.decoder`` (diffusers `TemporalDecoder`) on one window of frames.

    Parameters:
        model (`AutoencoderKLTemporalDecoder`): the VAE.

    Returns:
        `Program`: input the latent window ``[N,C,h,w]`` (already divided by the scaling factor), output
        ``[N,3,h·f,w·f]``.
    """
    dec = model.decoder
    b = _Builder(1, dec.conv_in.in_channels)
    b.local(Conv(dec.conv_in))
    mid = dec.mid_block
    _spatio_temporal(b, mid.resnets[0])
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        b.attend(attn)
        _spatio_temporal(b, resnet)
    for block in dec.up_blocks:
        for resnet in block.resnets:
            _spatio_temporal(b, resnet)
        for up in block.upsamplers or ():
            if not up.use_conv or up.use_conv_transpose or not up.interpolate or up.norm is not None:
                raise _unsupported("an Upsample2D other than nearest x2 + convolution")
            b.local(Conv(up.conv, up=2))
    _check_silu(dec.conv_act, "the decoder output")
    b.local(Norm(dec.conv_norm_out), Conv(dec.conv_out), TimeConv(dec.time_conv_out))
    return b.program()


# --- statistics ------------------------------------------------------------------------------------------------

@dataclass
class GroupMoments:
    """Per-(frame, group) count, mean and centred sum of squares ``m2`` (float64 ``[N,G]`` on the CPU)."""

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    @staticmethod
    def of_tile(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One tile core's per-(frame, group) ``mean`` and ``m2`` (float32 ``[N,G]``, on the tile's device)."""
        flat = x.float().reshape(x.shape[0], groups, -1)
        mean = flat.mean(-1, keepdim=True)
        centred = flat - mean
        return mean[..., 0], torch.linalg.vecdot(centred, centred)  # two-pass: no cancellation; fast on CPUs

    @staticmethod
    def combine(tiles: list[tuple[torch.Tensor, torch.Tensor]], counts: list[int]) -> "GroupMoments":
        """Merges the tiles' moments in float64 (one device-to-host copy for all of them)."""
        means = torch.stack([mean for mean, _ in tiles]).cpu().double()
        m2s = torch.stack([m2 for _, m2 in tiles]).cpu().double()
        total = None
        for mean, m2, count in zip(means, m2s, counts):
            part = GroupMoments(torch.full_like(mean, float(count)), mean, m2)
            total = part if total is None else total + part
        return total

    def __add__(self, other: "GroupMoments") -> "GroupMoments":
        """Chan et al.'s pairwise merge: exact, including the between-tile variance term."""
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        return GroupMoments(count, mean, self.m2 + other.m2 + delta.square() * (self.count * other.count / count))

    def merged(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The moments over all frames together, each ``[1,G]``."""
        total = GroupMoments(self.count[:1], self.mean[:1], self.m2[:1])
        for n in range(1, self.count.shape[0]):
            total = total + GroupMoments(self.count[n:n + 1], self.mean[n:n + 1], self.m2[n:n + 1])
        return total.count, total.mean, total.m2


# --- geometry and cost --------------------------------------------------------------------------------------

def chain_rects(step: Chain, sizes: list[tuple[int, int]], core: Rect) -> list[Rect]:
    """The window every layer of ``step`` reads (then ``core``, what it writes) to compute ``core`` exactly.

    Walks the layers backwards: a convolution widens its output window by its reach (kernel, stride, padding,
    up-sampling) and clips it at the frame border, where the network's zero padding stands in for the halo.
    """
    rects = [core]
    for op, size in zip(reversed(step.ops), reversed(sizes[:-1])):
        rects.append(op.need(rects[-1], size))
    rects.reverse()
    return rects


def _area(rect: Rect) -> int:
    return (rect[0][1] - rect[0][0]) * (rect[1][1] - rect[1][0])


@dataclass(frozen=True)
class ParkingCost:
    """Bytes one exact tiled run moves (pure geometry, nothing is computed).

    Parameters:
        parked_peak (`int`): full-frame values alive at once (where ``park`` keeps them).
        traffic (`int`): bytes read from and written to parked values over the run: with ``park="host"`` all of
            it crosses between host and device.
        tile_peak (`int`): the most one tile reads and writes in one step (the device working set is a few
            times this).
        keys_values (`int`): the largest attention's whole-frame keys and values (always on the device).
    """

    parked_peak: int
    traffic: int
    tile_peak: int
    keys_values: int


def parking_cost(program: Program, grid: TileGrid, frames: int, itemsize: int = 4) -> ParkingCost:
    """What running ``program`` on ``frames`` frames over ``grid`` parks and moves, in bytes of ``itemsize``.

    Parameters:
        program (`Program`): the network.
        grid (`TileGrid`): tile cores on the latent grid.
        frames (`int`): frames per run (the decode window; 1 for the encoder).
        itemsize (`int`, *optional*, defaults to 4): bytes per activation (2 under fp16/bf16 autocast).

    Returns:
        `ParkingCost`
    """
    def nbytes(name: str, rect: Rect | None = None) -> int:
        area = _area(rect) if rect is not None else math.prod(program.size(name, grid))
        return frames * program.channels[name] * area * itemsize

    last_use, live = program.last_use(), {"input"}
    parked_peak = traffic = tile_peak = keys_values = 0
    for index, step in enumerate(program.steps):
        live.add(step.out)
        parked_peak = max(parked_peak, sum(nbytes(name) for name in live))
        if isinstance(step, Chain):
            sizes = program.chain_sizes(step, grid)
            for core in grid.cores(program.scales[step.out]):
                rects = chain_rects(step, sizes, core)
                moved = nbytes(step.source, rects[0]) + nbytes(step.out, core) + sum(
                    nbytes(op.value, rects[i + 1]) for i, op in enumerate(step.ops) if isinstance(op, (Add, Mix)))
                traffic, tile_peak = traffic + moved, max(tile_peak, moved)
        else:
            traffic += 2 * nbytes(step.source) + nbytes(step.out)  # keys/values sweep, then queries
            inner = step.attn.to_k.out_features + step.attn.to_v.out_features
            keys_values = max(keys_values, nbytes(step.source) // program.channels[step.source] * inner)
        live -= {name for name, last in last_use.items() if last == index}
    return ParkingCost(parked_peak, traffic, tile_peak, keys_values)


# --- parking ---------------------------------------------------------------------------------------------------

@dataclass
class _Parked:
    """A full-frame value: its buffer (allocated at the first tile), and its GroupNorm moments if needed."""

    scale: int
    buffer: torch.Tensor | None = None
    tiles: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per-tile (mean, m2)
    counts: list[int] = field(default_factory=list)  # elements per group in each tile
    moments: GroupMoments | None = None  # the tiles' moments merged, once the value is complete
    coefficients: dict = field(default_factory=dict)  # Norm -> (scale, shift) on the device


class _Parking:
    """Where full-frame buffers live: on the device, on the host, or on the device while it has room (``auto``).

    ``auto`` on CUDA puts a buffer on the device if the free device memory (the driver's, plus what torch's
    allocator holds unused) still leaves ``reserve`` bytes for a tile's working set; elsewhere on the device.
    """

    def __init__(self, device: torch.device, park: Park, reserve: int) -> None:
        if park not in PARK_CHOICES:
            raise ValueError(f"VAE tiling park={park!r} is invalid: use one of {PARK_CHOICES}")
        self.device, self.park, self.reserve = device, park, reserve

    def _on_device(self, nbytes: int) -> bool:
        if self.device.type == "cpu" or self.park == "device":
            return True
        if self.park == "host":
            return False
        if self.device.type != "cuda":  # no portable free-memory query: keep everything on the device
            return True
        free, _ = torch.cuda.mem_get_info(self.device)
        unused = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return nbytes + self.reserve <= free + unused

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        on_device = self._on_device(math.prod(shape) * dtype.itemsize)
        return torch.empty(shape, dtype=dtype, device=self.device if on_device else "cpu")


# --- execution -------------------------------------------------------------------------------------------------

class _Context:
    """What a layer sees while computing one tile: its windows, parked values, and the norm statistics."""

    def __init__(self, run: "_Run", source: str) -> None:
        self.run, self.source = run, source
        self.in_rect: Rect = ((0, 0), (0, 0))
        self.out_rect: Rect = ((0, 0), (0, 0))
        self.size: tuple[int, int] = (0, 0)

    def fetch(self, name: str) -> torch.Tensor:
        return self.run.fetch(name, self.out_rect, dense=False)

    def coefficients(self, norm: Norm) -> tuple[torch.Tensor, torch.Tensor]:
        return self.run.coefficients(self.source, norm)


class _Run:
    def __init__(self, program: Program, grid: TileGrid, device: torch.device, parking: _Parking,
                 tick: Tick | None) -> None:
        self.program, self.grid, self.device, self.parking, self.tick = program, grid, device, parking, tick
        self.values: dict[str, _Parked] = {}

    def fetch(self, name: str, rect: Rect, *, dense: bool = True) -> torch.Tensor:
        """A window of a parked value on the device (a strided view where it is parked there and not ``dense``)."""
        (y0, y1), (x0, x1) = rect
        window = self.values[name].buffer[:, :, y0:y1, x0:x1].to(self.device)
        # contiguous NCHW: torch's CPU GroupNorm/convolutions lose precision or speed on strided windows
        return window.contiguous() if dense else window

    def coefficients(self, name: str, norm: Norm) -> tuple[torch.Tensor, torch.Tensor]:
        value = self.values[name]
        if norm not in value.coefficients:
            if value.moments is None:
                value.moments = GroupMoments.combine(value.tiles, value.counts)
                value.tiles.clear()
            value.coefficients[norm] = tuple(c.to(self.device) for c in norm.coefficients(value.moments))
        return value.coefficients[norm]

    def store(self, name: str, rect: Rect, tile: torch.Tensor) -> None:
        value = self.values[name]
        if value.buffer is None:
            full = self.program.size(name, self.grid)
            value.buffer = self.parking.empty((tile.shape[0], tile.shape[1], *full), tile.dtype)
        (y0, y1), (x0, x1) = rect
        value.buffer[:, :, y0:y1, x0:x1].copy_(tile)
        groups = self.program.groups.get(name)
        if groups is not None:  # kept on the device: no synchronisation per tile
            value.tiles.append(GroupMoments.of_tile(tile, groups))
            value.counts.append(tile[0].numel() // groups)
        if self.tick is not None:
            self.tick()

    def chain(self, step: Chain) -> None:
        sizes = self.program.chain_sizes(step, self.grid)
        ctx = _Context(self, step.source)
        for core in self.grid.cores(self.program.scales[step.out]):
            rects = chain_rects(step, sizes, core)
            # a leading norm reads the window once and writes a dense result: no copy before it
            x = self.fetch(step.source, rects[0], dense=not isinstance(step.ops[0], Norm))
            padded = False
            for index, op in enumerate(step.ops):
                ctx.in_rect, ctx.out_rect, ctx.size = rects[index], rects[index + 1], sizes[index]
                after = step.ops[index + 1] if index + 1 < len(step.ops) else None
                if isinstance(op, Norm) and isinstance(after, Conv) and after.up == 1:
                    # the norm writes straight into the convolution's zero-padded input (its window is the
                    # convolution's whole input window: rects[index + 1] = after.need(rects[index + 2]))
                    ctx.in_rect, ctx.out_rect, ctx.size = rects[index + 1], rects[index + 2], sizes[index + 1]
                    x, padded = op.apply(x, ctx, pad=after.border(ctx)[1]), True
                elif padded:
                    x, padded = op.apply(x, ctx, padded=True), False
                else:
                    x = op.apply(x, ctx)
            self.store(step.out, core, x)

    def attend(self, step: Attend) -> None:
        attn = step.attn
        norm = Norm(attn.group_norm, act=False) if attn.group_norm is not None else None
        cores = self.grid.cores(self.program.scales[step.source])
        ctx = _Context(self, step.source)

        def tokens(x: torch.Tensor) -> torch.Tensor:
            if norm is not None:
                x = norm.apply(x, ctx)
            return x.flatten(2).transpose(1, 2)  # [N, h·w, C]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # [N, heads, L, d]

        keys, values = [], []
        for core in cores:  # keys and values of the whole frame, gathered from the cores
            t = tokens(self.fetch(step.source, core))
            keys.append(attn.to_k(t))
            values.append(attn.to_v(t))
            if self.tick is not None:
                self.tick()
        key, value = heads(torch.cat(keys, 1)), heads(torch.cat(values, 1))
        del keys, values
        for core in cores:  # queries per tile
            x = self.fetch(step.source, core)
            query = heads(attn.to_q(tokens(x)))
            rows = max(1, _SCORES_PER_CHUNK // (query.shape[0] * query.shape[1] * key.shape[2]))
            out = torch.cat([F.scaled_dot_product_attention(q, key, value, scale=attn.scale)
                             for q in query.split(rows, dim=2)], 2)
            out = out.transpose(1, 2).flatten(2).to(query.dtype)
            out = attn.to_out[1](attn.to_out[0](out))
            out = out.transpose(1, 2).reshape(x.shape)
            if attn.residual_connection:
                out = out + x
            self.store(step.out, core, out / attn.rescale_output_factor)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        self.values["input"] = _Parked(self.program.scales["input"], buffer=x)
        last_use = self.program.last_use()
        for index, step in enumerate(self.program.steps):
            self.values[step.out] = _Parked(self.program.scales[step.out])
            (self.chain if isinstance(step, Chain) else self.attend)(step)
            for name in [n for n, last in last_use.items() if last == index]:
                del self.values[name]
        return self.values[self.program.output].buffer


def progress_ticker(callback: Callable[[int, int], None] | None, total: int) -> Tick | None:
    """A `Tick` that reports ``callback(done, total)`` after each tile step (None without a callback)."""
    if callback is None:
        return None
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        callback(done, total)

    return tick


def run_exact(program: Program, x: torch.Tensor, grid: TileGrid, *, device: torch.device | str,
              park: Park = "auto", tick: Tick | None = None) -> torch.Tensor:
    """Runs ``program`` on ``x`` tile by tile, exactly (up to float rounding) as the untiled network.

    Parameters:
        program (`Program`): from `encoder_program` / `decoder_program`.
        x (`torch.Tensor`): the input ``[N,C,H,W]`` at ``program.scales["input"]`` × the grid's resolution (on
            any device; tile windows are copied to ``device``).
        grid (`TileGrid`): tile cores on the latent grid.
        device (`torch.device`): where the layers run.
        park (`str`): ``"device"`` keeps the full-frame activations on ``device``, ``"host"`` in CPU memory
            (`parking_cost` says how many bytes then cross), ``"auto"`` on the device while it keeps room for a
            tile's working set.
        tick (`Callable`, *optional*): called after every tile of every sweep (``program.sweeps · len(grid)``
            calls); raising aborts.

    Returns:
        `torch.Tensor`: the program's output ``[N,C',H',W']`` (parked like the activations).
    """
    device = torch.device(device)
    reserve = 0
    if park == "auto" and device.type == "cuda":
        cost = parking_cost(program, grid, x.shape[0], x.element_size())
        reserve = 4 * cost.tile_peak + cost.keys_values
    return _Run(program, grid, device, _Parking(device, park, reserve), tick).run(x)
