"""Colour correction of restored frames against their low-resolution source, and the strength blend.

Layouts: ``restored`` is a ComfyUI IMAGE ``[T,H,W,C]`` float in 0..1 (the decoded, cropped output); ``lr`` is the
low-resolution input ``[T,h,w,C]`` float in 0..1 with the same frame count and channels, at any resolution.
Frames are processed one at a time so peak memory stays at a few frames whatever the video length.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

ColourMethod = Literal["adain", "wavelet", "none"]
COLOUR_METHODS: tuple[str, ...] = ("adain", "wavelet", "none")

# Official AdaIN epsilon, added to the variance before the square root.
ADAIN_EPS = 1e-5
# StableSR wavelet decomposition: 5 levels of a dilated 3x3 binomial blur.
WAVELET_LEVELS = 5


def _check_video(name: str, video: torch.Tensor) -> None:
    if not isinstance(video, torch.Tensor) or video.ndim != 4:
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"{name} must be a [T,H,W,C] tensor (ComfyUI IMAGE layout), got {shape}")
    if not video.is_floating_point():
        raise ValueError(f"{name} must be a float tensor in 0..1, got dtype {video.dtype}; divide uint8 frames by 255")
    if video.shape[0] == 0 or video.shape[1] == 0 or video.shape[2] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(video.shape)}")


def _check_pair(restored: torch.Tensor, lr: torch.Tensor) -> None:
    _check_video("restored", restored)
    _check_video("lr", lr)
    if restored.shape[0] != lr.shape[0]:
        raise ValueError(f"restored has {restored.shape[0]} frames but lr has {lr.shape[0]}; pass the LR frames "
                         "that produced this output")
    if restored.shape[3] != lr.shape[3]:
        raise ValueError(f"restored has {restored.shape[3]} channels but lr has {lr.shape[3]}; both must be RGB "
                         "[T,H,W,C]")


def _frame_chw(video: torch.Tensor, index: int) -> torch.Tensor:
    """Frame ``index`` of a [T,H,W,C] video as a float32 [1,C,H,W] tensor."""
    return video[index : index + 1].to(torch.float32).permute(0, 3, 1, 2)


def _mean_std(frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and sqrt(unbiased variance + eps) of a [1,C,H,W] frame, shaped [1,C,1,1].

    A single-pixel frame has no unbiased variance; its spread is taken as 0 so a 1x1 source still works.
    """
    flat = frame.reshape(frame.shape[0], frame.shape[1], -1)
    correction = 1 if flat.shape[2] > 1 else 0
    std = (flat.var(dim=2, correction=correction) + ADAIN_EPS).sqrt()[..., None, None]
    mean = flat.mean(dim=2)[..., None, None]
    return mean, std


def _adain_frame(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    content_mean, content_std = _mean_std(content)
    style_mean, style_std = _mean_std(style)
    return (content - content_mean) / content_std * style_std + style_mean


def _wavelet_blur(frame: torch.Tensor, radius: int) -> torch.Tensor:
    """3x3 binomial blur with dilation ``radius`` and edge replication (one level of the à-trous wavelet)."""
    taps = torch.tensor([1.0, 2.0, 1.0], dtype=frame.dtype, device=frame.device)
    kernel = (taps[:, None] * taps[None, :] / 16.0).expand(frame.shape[1], 1, 3, 3)
    padded = F.pad(frame, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(padded, kernel, groups=frame.shape[1], dilation=radius)


def _wavelet_split(frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the high-frequency bands, residual low frequency) of a [1,C,H,W] frame."""
    high = torch.zeros_like(frame)
    low = frame
    for level in range(WAVELET_LEVELS):
        blurred = _wavelet_blur(low, 2**level)
        high += low - blurred
        low = blurred
    return high, low


def _wavelet_frame(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    content_high, _ = _wavelet_split(content)
    _, style_low = _wavelet_split(style)
    return content_high + style_low


def _resize_frame(frame: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners False, no antialias: the official LR upscale) of a [1,C,h,w] frame."""
    if tuple(frame.shape[2:]) == size:
        return frame
    return F.interpolate(frame, size=size, mode="bilinear", align_corners=False)


def adain_color_fix(restored: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """Official STAR colour fix: match each frame's per-channel mean and std to the LR frame at LR resolution.

    Parameters:
        restored (`torch.Tensor`): restored video `[T,H,W,C]`, 0..1.
        lr (`torch.Tensor`): low-resolution source `[T,h,w,C]`, 0..1, any resolution.

    Returns:
        `torch.Tensor`: `[T,H,W,C]` float32, clamped to 0..1.
    """
    _check_pair(restored, lr)
    out = torch.empty(restored.shape, dtype=torch.float32, device=restored.device)
    for t in range(restored.shape[0]):
        fixed = _adain_frame(_frame_chw(restored, t), _frame_chw(lr, t).to(restored.device))
        out[t] = fixed.clamp(0.0, 1.0)[0].permute(1, 2, 0)
    return out


def wavelet_color_fix(restored: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """StableSR wavelet colour fix: keep the restored high frequencies, take the low frequencies from the source.

    The source is resized bilinearly to the restored size first (the official function needs equal sizes).

    Parameters:
        restored (`torch.Tensor`): restored video `[T,H,W,C]`, 0..1.
        lr (`torch.Tensor`): low-resolution source `[T,h,w,C]`, 0..1, any resolution.

    Returns:
        `torch.Tensor`: `[T,H,W,C]` float32, clamped to 0..1.
    """
    _check_pair(restored, lr)
    size = (restored.shape[1], restored.shape[2])
    out = torch.empty(restored.shape, dtype=torch.float32, device=restored.device)
    for t in range(restored.shape[0]):
        source = _resize_frame(_frame_chw(lr, t).to(restored.device), size)
        fixed = _wavelet_frame(_frame_chw(restored, t), source)
        out[t] = fixed.clamp(0.0, 1.0)[0].permute(1, 2, 0)
    return out


def upscale_source(lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The LR video resized bilinearly to ``size`` = (H, W), `[T,H,W,C]` float32 (what strength 0 returns)."""
    _check_video("lr", lr)
    out = torch.empty((lr.shape[0], size[0], size[1], lr.shape[3]), dtype=torch.float32, device=lr.device)
    for t in range(lr.shape[0]):
        out[t] = _resize_frame(_frame_chw(lr, t), size)[0].permute(1, 2, 0)
    return out


def apply_colour_fix(
    restored: torch.Tensor,
    lr: torch.Tensor,
    method: ColourMethod = "adain",
    strength: float = 1.0,
) -> torch.Tensor:
    """Colour-fixes the restored video and blends it with the bilinear-upscaled source.

    Parameters:
        restored (`torch.Tensor`): restored video `[T,H,W,C]`, 0..1.
        lr (`torch.Tensor`): low-resolution source `[T,h,w,C]`, 0..1.
        method (`str`, defaults to `"adain"`): `"adain"` (official), `"wavelet"` or `"none"`.
        strength (`float`, defaults to 1.0): 1 gives the colour-fixed restored video, 0 the bilinear-upscaled
            source, values between blend linearly (a way to tone down over-sharpened or hallucinated detail).

    Returns:
        `torch.Tensor`: `[T,H,W,C]` float32 in 0..1.
    """
    if method not in COLOUR_METHODS:
        raise ValueError(f"colour fix method {method!r} is not one of {list(COLOUR_METHODS)}")
    if not isinstance(strength, (int, float)) or not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"colour fix strength must be a number in [0, 1], got {strength!r}")
    _check_pair(restored, lr)
    size = (restored.shape[1], restored.shape[2])
    if strength == 0.0:
        return upscale_source(lr, size)
    if method == "adain":
        fixed = adain_color_fix(restored, lr)
    elif method == "wavelet":
        fixed = wavelet_color_fix(restored, lr)
    else:
        fixed = restored.to(torch.float32, copy=True)
    if strength == 1.0:
        return fixed
    for t in range(fixed.shape[0]):
        source = _resize_frame(_frame_chw(lr, t).to(fixed.device), size)[0].permute(1, 2, 0)
        fixed[t] = torch.lerp(source, fixed[t], float(strength))
    return fixed
