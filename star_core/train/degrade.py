"""Seeded on-the-fly degradation of HQ clips into training LQ clips (Real-ESRGAN-style second order + video codec).

For HQ-only footage. In the spirit of the pipeline the official data tools use (Real-ESRGAN's second-order model,
then video compression), applied to a whole clip with one set of random parameters, so the degradation is
temporally consistent like a real one:

1. first order: Gaussian blur (isotropic or anisotropic, rotated) → random resize → Gaussian or Poisson noise;
2. second order (with probability ``second_order_prob``): the same with the second-stage ranges;
3. resize to the LQ size (HQ size / ``scale``);
4. compression: with probability ``video_prob`` a real H.264 (or MPEG-4 Part 2) encode + decode through PyAV at a
   random CRF / quantiser, otherwise per-frame JPEG at a random quality.

Every random choice comes from one ``torch.Generator`` (and the codecs run single-threaded), so the same seed gives
the same clip. `DegradationSettings` documents every range.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import torch
import torch.nn.functional as F

RESIZE_MODES = ("area", "bilinear", "bicubic")


@dataclass(frozen=True)
class DegradationSettings:
    """Ranges of the random degradation; every ``(lo, hi)`` is sampled uniformly.

    Parameters:
        scale (`int`, defaults to 4): the LQ clip is ``HQ size / scale`` (the official training pairs are ×4).
        blur_prob, blur_prob2 (`float`): probability of the blur in the first / second order (1.0, 0.8).
        blur_sigma, blur_sigma2 (`tuple`): Gaussian sigma range in HQ pixels ((0.2, 3.0), (0.2, 1.5)).
        blur_kernel (`tuple[int, int]`): odd kernel sizes from ``lo`` to ``hi`` ((7, 21)).
        anisotropic_prob (`float`): probability that the two axes get different sigmas and a random rotation (0.5).
        resize_range, resize_range2 (`tuple`): scale factor of the random resize ((0.15, 1.5), (0.3, 1.2)),
            relative to the current size; up, down or keep with probabilities ``resize_prob`` (0.2, 0.7, 0.1).
        noise_sigma, noise_sigma2 (`tuple`): Gaussian noise std in 0..255 levels ((1, 30), (1, 25)).
        poisson_scale, poisson_scale2 (`tuple`): Poisson noise scale ((0.05, 3.0), (0.05, 2.5)).
        gaussian_noise_prob (`float`): Gaussian (else Poisson) noise (0.5).
        gray_noise_prob (`float`): the same noise on all three channels (0.4).
        second_order_prob (`float`): probability of the second order (0.8).
        video_prob (`float`): codec compression, else JPEG (0.9).
        codecs (`tuple[str, ...]`): codecs drawn from ("libx264", "mpeg4").
        crf (`tuple[int, int]`): H.264 CRF range ((18, 35)).
        qscale (`tuple[int, int]`): MPEG-4 quantiser range ((2, 12); 2 is the finest).
        jpeg_quality (`tuple[int, int]`): JPEG quality range ((30, 95)).
    """

    scale: int = 4
    blur_prob: float = 1.0
    blur_prob2: float = 0.8
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    blur_kernel: tuple[int, int] = (7, 21)
    anisotropic_prob: float = 0.5
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)
    resize_range: tuple[float, float] = (0.15, 1.5)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    noise_sigma: tuple[float, float] = (1.0, 30.0)
    noise_sigma2: tuple[float, float] = (1.0, 25.0)
    poisson_scale: tuple[float, float] = (0.05, 3.0)
    poisson_scale2: tuple[float, float] = (0.05, 2.5)
    gaussian_noise_prob: float = 0.5
    gray_noise_prob: float = 0.4
    second_order_prob: float = 0.8
    video_prob: float = 0.9
    codecs: tuple[str, ...] = ("libx264", "mpeg4")
    crf: tuple[int, int] = (18, 35)
    qscale: tuple[int, int] = (2, 12)
    jpeg_quality: tuple[int, int] = (30, 95)

    def __post_init__(self) -> None:
        if self.scale < 1:
            raise ValueError(f"DegradationSettings.scale must be >= 1, got {self.scale}")
        unknown = [c for c in self.codecs if c not in ("libx264", "mpeg4")]
        if unknown or not self.codecs:
            raise ValueError(f"DegradationSettings.codecs must be a non-empty subset of ('libx264', 'mpeg4'), "
                             f"got {self.codecs}")


class _Draw:
    """Uniform draws from one CPU generator."""

    def __init__(self, generator: torch.Generator) -> None:
        self.g = generator

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=self.g).item()

    def chance(self, p: float) -> bool:
        return torch.rand((), generator=self.g).item() < p

    def integer(self, lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (), generator=self.g))

    def choice(self, options, weights=None):
        probs = torch.tensor(weights if weights is not None else [1.0] * len(options), dtype=torch.float64)
        return options[int(torch.multinomial(probs, 1, generator=self.g))]


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, angle: float) -> torch.Tensor:
    """A normalised ``[size, size]`` Gaussian with axis sigmas ``sigma_x``, ``sigma_y`` rotated by ``angle``."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * x + s * y, -s * x + c * y
    kernel = torch.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return (kernel / kernel.sum()).float()


def _blur(clip: torch.Tensor, draw: _Draw, sigma_range: tuple[float, float], settings: DegradationSettings):
    size = draw.choice(list(range(settings.blur_kernel[0] | 1, settings.blur_kernel[1] + 1, 2)))
    sigma_x = draw.uniform(*sigma_range)
    if draw.chance(settings.anisotropic_prob):
        sigma_y, angle = draw.uniform(*sigma_range), draw.uniform(-math.pi, math.pi)
    else:
        sigma_y, angle = sigma_x, 0.0
    kernel = gaussian_kernel(size, sigma_x, sigma_y, angle)[None, None].repeat(3, 1, 1, 1)
    pad = size // 2
    mode = "reflect" if min(clip.shape[-2:]) > pad else "replicate"
    return F.conv2d(F.pad(clip, (pad, pad, pad, pad), mode=mode), kernel, groups=3)


def _resize(clip: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(clip, size=size, mode=mode, **kwargs)


def _random_resize(clip: torch.Tensor, draw: _Draw, scale_range: tuple[float, float],
                   settings: DegradationSettings) -> torch.Tensor:
    direction = draw.choice(("up", "down", "keep"), settings.resize_prob)
    if direction == "up":
        factor = draw.uniform(1.0, max(1.0, scale_range[1]))
    elif direction == "down":
        factor = draw.uniform(scale_range[0], 1.0)
    else:
        factor = 1.0
    h, w = clip.shape[-2:]
    return _resize(clip, (max(8, round(h * factor)), max(8, round(w * factor))), draw.choice(RESIZE_MODES))


def _noise(clip: torch.Tensor, draw: _Draw, sigma_range: tuple[float, float],
           poisson_range: tuple[float, float], settings: DegradationSettings) -> torch.Tensor:
    gray = draw.chance(settings.gray_noise_prob)
    shape = (clip.shape[0], 1 if gray else 3, *clip.shape[-2:])
    if draw.chance(settings.gaussian_noise_prob):
        noise = torch.randn(shape, generator=draw.g) * (draw.uniform(*sigma_range) / 255)
    else:
        # Poisson noise of an image with 10^scale-dependent photon counts (Real-ESRGAN's form)
        scale = draw.uniform(*poisson_range)
        levels = 2 ** torch.ceil(torch.log2(torch.tensor(float(len(torch.unique((clip * 255).round()))) + 1)))
        base = clip.mean(1, keepdim=True) if gray else clip
        noisy = torch.poisson(base.clamp(0, 1) * levels, generator=draw.g) / levels
        noise = (noisy - base) * scale
    return (clip + noise).clamp(0, 1)


def _codec_round_trip(clip: np.ndarray, codec: str, quality: int) -> np.ndarray:
    """Encodes ``[T,H,W,3]`` uint8 RGB with ``codec`` in memory and decodes it back (single-threaded)."""
    t, h, w = clip.shape[:3]
    padded = np.pad(clip, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")  # yuv420p needs even sizes
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as out:
        stream = out.add_stream(codec, rate=24)
        stream.width, stream.height = padded.shape[2], padded.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.thread_count = 1
        stream.options = ({"crf": str(quality), "preset": "medium"} if codec == "libx264"
                          else {"qmin": str(quality), "qmax": str(quality)})  # a fixed MPEG-4 quantiser
        for frame in padded:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode(None))
    buffer.seek(0)
    with av.open(buffer, "r") as source:
        stream = source.streams.video[0]
        stream.thread_count = 1
        frames = [frame.to_ndarray(format="rgb24") for frame in source.decode(stream)]
    if len(frames) != t:
        raise RuntimeError(f"{codec} round trip returned {len(frames)} frames for {t}")
    return np.stack(frames)[:, :h, :w]


def _jpeg_round_trip(clip: np.ndarray, quality: int) -> np.ndarray:
    """Per-frame JPEG (FFmpeg's mjpeg, 4:2:0) at a JPEG-style ``quality`` 1..100, mapped to quantiser 31..1."""
    quantiser = str(max(1, round(31 - 30 * (quality - 1) / 99)))
    out = []
    for frame in clip:
        h, w = frame.shape[:2]
        padded = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        encoder = av.CodecContext.create("mjpeg", "w")
        encoder.width, encoder.height, encoder.pix_fmt = padded.shape[1], padded.shape[0], "yuvj420p"
        encoder.time_base, encoder.thread_count = Fraction(1, 24), 1
        encoder.options = {"qmin": quantiser, "qmax": quantiser}
        packets = encoder.encode(av.VideoFrame.from_ndarray(padded, format="rgb24")) + encoder.encode(None)
        decoder = av.CodecContext.create("mjpeg", "r")
        decoded = [f.to_ndarray(format="rgb24") for packet in packets for f in decoder.decode(packet)]
        out.append(decoded[0][:h, :w])
    return np.stack(out)


def degrade(clip: torch.Tensor, settings: DegradationSettings = DegradationSettings(), *,
            generator: torch.Generator) -> torch.Tensor:
    """
    Degrades an HQ clip into an LQ clip ``scale`` times smaller (one random parameter set for the whole clip).

    Parameters:
        clip (`torch.Tensor`): ``[T,3,H,W]`` float in 0..1.
        settings (`DegradationSettings`): the ranges.
        generator (`torch.Generator`): CPU generator of every random choice.

    Returns:
        `torch.Tensor`: ``[T,3,H//scale,W//scale]`` float32 in 0..1 (exact uint8 levels after the compression).
    """
    if clip.ndim != 4 or clip.shape[1] != 3:
        raise ValueError(f"degrade: clip must be [T,3,H,W] in 0..1, got {tuple(clip.shape)}")
    h, w = clip.shape[-2:]
    target = (h // settings.scale, w // settings.scale)
    if min(target) < 8:
        raise ValueError(f"degrade: the LQ size {target[0]}x{target[1]} of a {h}x{w} crop at scale {settings.scale} "
                         f"is too small; use a larger crop or a smaller scale")
    draw = _Draw(generator)
    x = clip.float()
    orders = [(settings.blur_prob, settings.blur_sigma, settings.resize_range, settings.noise_sigma,
               settings.poisson_scale)]
    if draw.chance(settings.second_order_prob):
        orders.append((settings.blur_prob2, settings.blur_sigma2, settings.resize_range2, settings.noise_sigma2,
                       settings.poisson_scale2))
    for blur_prob, sigma, resize_range, noise_sigma, poisson in orders:
        if draw.chance(blur_prob):
            x = _blur(x, draw, sigma, settings)
        x = _random_resize(x, draw, resize_range, settings)
        x = _noise(x, draw, noise_sigma, poisson, settings)
    x = _resize(x, target, draw.choice(RESIZE_MODES)).clamp(0, 1)
    frames = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    if draw.chance(settings.video_prob):
        codec = draw.choice(settings.codecs)
        quality = draw.integer(*(settings.crf if codec == "libx264" else settings.qscale))
        frames = _codec_round_trip(frames, codec, quality)
    else:
        frames = _jpeg_round_trip(frames, draw.integer(*settings.jpeg_quality))
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
