"""Output geometry: target size, padding plans (official and minimal), LR upscaling and the exact crop back.

The network needs latent H ≡ 2 (mod 8) and W ≡ 0 (mod 8) (Downsample pads rows (2, 1), Upsample crops a row
top and bottom), i.e. pixel H ≡ 16 (mod 64) and W ≡ 0 (mod 64). The official code pads every video to at least
720x1280 (``pad_to_fit``); ``"minimal"`` pads only what the network needs. A :class:`Geometry` records the
original size, the target size and the padding so a decoded video is cropped back exactly.
"""
from __future__ import annotations

import operator
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F

PaddingMode = Literal["official", "minimal"]
PADDING_MODES = ("official", "minimal")

# Value the official code pads with (white in [-1, 1]).
PAD_VALUE = 1.0
# VAE spatial factor (pixels per latent cell).
VAE_FACTOR = 8
# Pixel-size rules of the network, see the module docstring.
HEIGHT_MODULUS, HEIGHT_REMAINDER = 64, 16
WIDTH_MODULUS = 64
# Minimum size the official `pad_to_fit` pads to.
OFFICIAL_MIN_HEIGHT, OFFICIAL_MIN_WIDTH = 720, 1280


def _check_size(name: str, h: int, w: int) -> None:
    if not (isinstance(h, int) and isinstance(w, int)) or h < 1 or w < 1:
        raise ValueError(f"{name} must be two positive integers (height, width), got ({h!r}, {w!r})")


def pad_to_fit(h: int, w: int) -> tuple[int, int, int, int]:
    """
    The official padding plan (`VideoToVideo_sr.pad_to_fit`) for an upscaled frame of size `h`x`w`.

    Parameters:
        h (`int`): target (upscaled) height in pixels.
        w (`int`): target (upscaled) width in pixels.

    Returns:
        `tuple[int, int, int, int]`: (left, right, top, bottom). Sizes below 720x1280 are centred in 720x1280;
        larger sides are padded at the bottom/right by 1–64 pixels (never 0, as the official code does).
    """
    _check_size("pad_to_fit size", h, w)
    if h < OFFICIAL_MIN_HEIGHT:
        top = (OFFICIAL_MIN_HEIGHT - h) // 2
        bottom = OFFICIAL_MIN_HEIGHT - top - h
    elif h == OFFICIAL_MIN_HEIGHT:
        top = bottom = 0
    else:
        top = 0
        bottom = ((h + 48) // 64) * 64 + 64 - 48 - h
    if w < OFFICIAL_MIN_WIDTH:
        left = (OFFICIAL_MIN_WIDTH - w) // 2
        right = OFFICIAL_MIN_WIDTH - left - w
    elif w == OFFICIAL_MIN_WIDTH:
        left = right = 0
    else:
        left = 0
        right = (w // 64) * 64 + 64 - w
    return left, right, top, bottom


def minimal_padding(h: int, w: int) -> tuple[int, int, int, int]:
    """
    The smallest padding that makes a `h`x`w` frame valid for the network, split evenly (extra pixel at the
    bottom/right) so the content stays centred like the official plan.

    Parameters:
        h (`int`): target (upscaled) height in pixels.
        w (`int`): target (upscaled) width in pixels.

    Returns:
        `tuple[int, int, int, int]`: (left, right, top, bottom) with padded H ≡ 16 (mod 64), W ≡ 0 (mod 64).
    """
    _check_size("minimal_padding size", h, w)
    pad_h = (HEIGHT_REMAINDER - h) % HEIGHT_MODULUS
    pad_w = (-w) % WIDTH_MODULUS
    return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2


def padding_plan(h: int, w: int, mode: PaddingMode = "official") -> tuple[int, int, int, int]:
    """
    The padding (left, right, top, bottom) for a target of `h`x`w` pixels in the given mode.

    Parameters:
        h (`int`): target height.
        w (`int`): target width.
        mode (`str`): `"official"` (`pad_to_fit`, ≥720x1280) or `"minimal"` (only what the network needs).
    """
    if mode == "official":
        return pad_to_fit(h, w)
    if mode == "minimal":
        return minimal_padding(h, w)
    raise ValueError(f"padding must be one of {PADDING_MODES}, got {mode!r}")


def target_size(
    h: int, w: int, *, scale: float | None = None, target: tuple[int, int] | None = None
) -> tuple[int, int]:
    """
    The output size for an LR frame of `h`x`w`: `scale`× (official: `h*scale, w*scale`, rounded for fractional
    scales) or an explicit `target` (height, width). Exactly one of the two must be given.

    Parameters:
        h (`int`): LR height.
        w (`int`): LR width.
        scale (`float`, *optional*): upscale factor > 0.
        target (`tuple[int, int]`, *optional*): explicit output (height, width).
    """
    _check_size("input frame size", h, w)
    if (scale is None) == (target is None):
        raise ValueError("give exactly one of scale (e.g. 4) or target (height, width)")
    if target is not None:
        try:
            th, tw = (operator.index(v) for v in target)
        except (TypeError, ValueError):
            raise ValueError(f"target must be two integers (height, width), got {target!r}") from None
        _check_size("target", th, tw)
        return th, tw
    if not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    return th, tw


@dataclass(frozen=True)
class Geometry:
    """
    Everything needed to go from LR frames to the padded network canvas and back to exactly the requested output.

    Parameters:
        original_size (`tuple[int, int]`): LR (height, width).
        target_size (`tuple[int, int]`): output (height, width).
        padding (`tuple[int, int, int, int]`): (left, right, top, bottom) added around the upscaled frame.
        frames (`int`): frame count of the video.
        fps (`float`, *optional*): frame rate when known (passed through to writers).
    """

    original_size: tuple[int, int]
    target_size: tuple[int, int]
    padding: tuple[int, int, int, int]
    frames: int
    fps: float | None = None

    def __post_init__(self) -> None:
        _check_size("Geometry.original_size", *self.original_size)
        _check_size("Geometry.target_size", *self.target_size)
        if len(self.padding) != 4 or any(not isinstance(p, int) or p < 0 for p in self.padding):
            raise ValueError(f"Geometry.padding must be 4 non-negative ints (l, r, t, b), got {self.padding!r}")
        if not isinstance(self.frames, int) or self.frames < 1:
            raise ValueError(f"Geometry.frames must be an int ≥ 1, got {self.frames!r}")
        ph, pw = self.padded_size
        if ph % VAE_FACTOR or pw % VAE_FACTOR:
            raise ValueError(f"padded size {ph}x{pw} is not a multiple of {VAE_FACTOR}; use padding_plan()")

    @property
    def padded_size(self) -> tuple[int, int]:
        """(height, width) of the canvas the VAE and the network see."""
        left, right, top, bottom = self.padding
        return self.target_size[0] + top + bottom, self.target_size[1] + left + right

    @property
    def latent_size(self) -> tuple[int, int]:
        """(height, width) of the latent."""
        ph, pw = self.padded_size
        return ph // VAE_FACTOR, pw // VAE_FACTOR

    def check_latent(self, latent: torch.Tensor) -> None:
        """Raises ValueError when `latent` [1,4,F,h,w] does not belong to this geometry."""
        expected = (self.frames, *self.latent_size)
        if latent.ndim != 5 or tuple(latent.shape[2:]) != expected:
            raise ValueError(
                f"latent of shape {tuple(latent.shape)} does not match its geometry (expected [1,4,{expected[0]},"
                f"{expected[1]},{expected[2]}] for {self.frames} frames padded to {self.padded_size})"
            )

    def crop(self, pixels: torch.Tensor) -> torch.Tensor:
        """Crops padded frames [..., H_pad, W_pad] back to the target size."""
        if tuple(pixels.shape[-2:]) != self.padded_size:
            raise ValueError(f"frames of size {tuple(pixels.shape[-2:])} are not the padded size {self.padded_size}")
        left, _, top, _ = self.padding
        h, w = self.target_size
        return pixels[..., top:top + h, left:left + w]

    def to_dict(self) -> dict:
        """Plain-data form (for a ComfyUI LATENT dict or JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Geometry":
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(
                original_size=tuple(data["original_size"]), target_size=tuple(data["target_size"]),
                padding=tuple(data["padding"]), frames=int(data["frames"]), fps=data.get("fps"),
            )
        except KeyError as err:
            raise ValueError(f"geometry dict lacks {err}; it must come from Geometry.to_dict()") from None


def plan_geometry(
    frames: int,
    h: int,
    w: int,
    *,
    scale: float | None = None,
    target: tuple[int, int] | None = None,
    padding: PaddingMode = "official",
    fps: float | None = None,
) -> Geometry:
    """
    The geometry of a run on `frames` LR frames of `h`x`w`.

    Parameters:
        frames (`int`): frame count (≥ 1).
        h (`int`), w (`int`): LR frame size.
        scale (`float`, *optional*), target (`tuple[int, int]`, *optional*): see :func:`target_size`.
        padding (`str`): `"official"` or `"minimal"`, see :func:`padding_plan`.
        fps (`float`, *optional*): frame rate to carry along.
    """
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"the video must have at least 1 frame, got {frames!r}")
    th, tw = target_size(h, w, scale=scale, target=target)
    return Geometry((h, w), (th, tw), padding_plan(th, tw, padding), frames, fps)


def upscale_and_pad(pixels: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """
    Official LR preparation of a window of frames: bilinear resize to the target size (align_corners=False, no
    antialias) then constant padding with 1.0.

    Parameters:
        pixels (`torch.Tensor`): LR frames [t,3,h,w] in [-1, 1] at `geometry.original_size`.
        geometry (`Geometry`): the run's geometry.

    Returns:
        `torch.Tensor`: [t,3,H_pad,W_pad].
    """
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"LR pixels must be [T,3,H,W], got shape {tuple(pixels.shape)}")
    if tuple(pixels.shape[-2:]) != geometry.original_size:
        raise ValueError(f"LR frames are {tuple(pixels.shape[-2:])}, the geometry expects {geometry.original_size}")
    if tuple(pixels.shape[-2:]) != geometry.target_size:
        pixels = F.interpolate(pixels, list(geometry.target_size), mode="bilinear", align_corners=False)
    if any(geometry.padding):
        pixels = F.pad(pixels, geometry.padding, mode="constant", value=PAD_VALUE)
    return pixels
