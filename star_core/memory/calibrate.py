"""Measures activation peaks of the real modules without running a kernel, and fits the activation models.

The modules are built and run under ``torch._subclasses.fake_tensor.FakeTensorMode`` (tensors carry shapes, no
data: a 4K x 32-frame evaluation is "measured" on any CPU in seconds) inside a
``torch.distributed._tools.mem_tracker.MemTracker`` that counts every live tensor's storage after each operator.
What it cannot see — a kernel's internal workspace, the allocator's rounding and caching — is what the real-memory
validation in ``bench/memory.py`` checks. Needs ``torch.distributed`` (present in the standard builds); only the
calibration imports it, the estimator uses the stored coefficients.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..model.config import STARConfig
from .activations import SamplerCoefficients, UNetCoefficients, VAECoefficients, largest_slice, unet_elements

_CPU = torch.device("cpu")


def _tracker_class():
    from torch.distributed._tools.mem_tracker import MemTracker

    class PeakTracker(MemTracker):
        """MemTracker without the per-module snapshots (they cost O(modules) per operator): only the peak."""

        def _pre_fw_hook(self, module, inputs) -> None:  # noqa: ANN001 - MemTracker's hook signature
            pass

        def _post_fw_hook(self, module, inputs, outputs) -> None:  # noqa: ANN001
            pass

    return PeakTracker


def peak_bytes(fn: Callable[[], object], *inputs: torch.Tensor | torch.nn.Module) -> int:
    """
    Peak bytes of the tensors `fn` creates while it runs, above what is already live in `inputs` (weights, inputs).

    Parameters:
        fn (`Callable`): the work to measure (called once, under ``torch.no_grad``).
        inputs (`torch.Tensor` or `torch.nn.Module`): what exists before the call (tracked as the baseline).
    """
    tracker = _tracker_class()()
    tracker.track_external(*inputs)
    base = tracker.get_tracker_snapshot("current").get(_CPU, {}).get("Total", 0)
    with tracker, torch.no_grad():
        result = fn()
    del result
    return tracker.get_tracker_snapshot("peak").get(_CPU, {}).get("Total", 0) - base


@lru_cache(maxsize=4)
def _fake_unet(config: STARConfig):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..model import STARUNet

    mode = FakeTensorMode()
    with mode:
        model = STARUNet(config, dtype=torch.float32).eval().requires_grad_(False)
    return mode, model


def measure_unet(config: STARConfig, batch: int, frames: int, h: int, w: int) -> int:
    """
    Peak activation bytes (float32) of one STARUNet evaluation with a hint on ``[batch, 4, frames, h, w]``.

    Parameters:
        config (`STARConfig`): the architecture (the model is built once per config, on fake tensors).
        batch (`int`), frames (`int`), h (`int`), w (`int`): the evaluation's shape.
    """
    mode, model = _fake_unet(config)
    with mode:
        x = torch.zeros(batch, config.in_dim, frames, h, w)
        hint = torch.zeros_like(x)
        context = torch.zeros(batch, 77, config.context_dim)
        t = torch.full((batch,), 899, dtype=torch.long)
        return peak_bytes(lambda: model(x, t, context, hint), model, x, hint, context, t)


@lru_cache(maxsize=4)
def _fake_vae(widths: tuple[int, ...], layers_per_block: int):
    from diffusers import AutoencoderKLTemporalDecoder
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    with mode:
        model = AutoencoderKLTemporalDecoder(block_out_channels=widths, layers_per_block=layers_per_block,
                                             down_block_types=("DownEncoderBlock2D",) * len(widths))
        model = model.eval().requires_grad_(False)
    return mode, model


def measure_vae(widths: tuple[int, ...], layers_per_block: int, kind: str, frames: int, height: int,
                width: int) -> int:
    """
    Peak activation bytes (float32) of the SVD VAE encoding one frame or decoding `frames` frames, untiled.

    Parameters:
        widths (`tuple[int, ...]`): ``block_out_channels`` (SVD: 128, 256, 512, 512).
        layers_per_block (`int`): SVD: 2.
        kind (`str`): ``"encode"`` or ``"decode"``.
        frames (`int`): decoder window (the encoder always takes one frame).
        height (`int`), width (`int`): pixels.
    """
    mode, model = _fake_vae(tuple(widths), layers_per_block)
    with mode:
        if kind == "encode":
            x = torch.zeros(1, 3, height, width)
            return peak_bytes(lambda: model.quant_conv(model.encoder(x)), model, x)
        z = torch.zeros(frames, model.config.latent_channels, height // 8, width // 8)
        return peak_bytes(lambda: model.decode(z, num_frames=frames).sample, model, z)


def measure_sampler(frames: int, chunk_len: int, *, brownian: bool, h: int = 16, w: int = 24) -> float:
    """
    Latent-sized tensors (count) the STAR sampler holds above its inputs, with a model that costs nothing (real
    tensors: torchsde's Brownian tree does not run on fake ones). One fast-mode run.

    Parameters:
        frames (`int`): latent frames.
        chunk_len (`int`): temporal chunk length.
        brownian (`bool`): the torchsde Brownian tree (True) or injected noise (False, the inputs).
        h (`int`), w (`int`): latent size (small: the count does not depend on it).
    """
    from ..diffusion.star_sampling import SamplerSettings, sample_star

    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, frames, h, w, generator=generator)
    positive, negative = torch.randn(2, 1, 77, 16, generator=generator)
    start = torch.randn(latent.shape, generator=generator)
    noises = [] if brownian else [torch.randn(latent.shape, generator=generator) for _ in range(16)]
    settings = SamplerSettings(chunk_len=chunk_len)

    def run() -> torch.Tensor:
        return sample_star(lambda x, t, c, hint: x * 0.5, latent, positive, negative, settings,
                           start_noise=start, brownian=12345 if brownian else noises)

    return peak_bytes(run, latent, positive, negative, start, *noises) / latent.nbytes


@dataclass(frozen=True)
class FitReport:
    """A fit and its error on the points it was fitted to: rows of (shape, measured, predicted) bytes."""

    coefficients: object
    rows: tuple[tuple[tuple[int, ...], float, float], ...]

    @property
    def max_relative_error(self) -> float:
        """Largest |predicted - measured| / measured over the points."""
        return max(abs(p - m) / m for _, m, p in self.rows)


def _least_squares(features: Sequence[Sequence[float]], targets: Sequence[float]) -> list[float]:
    """Non-negative coefficients minimising the relative error (rows scaled by 1/target)."""
    a = torch.tensor(features, dtype=torch.float64)
    y = torch.tensor(targets, dtype=torch.float64)
    scale = 1 / y
    active = list(range(a.shape[1]))
    while True:  # drop a feature whose coefficient comes out negative (tiny NNLS by elimination)
        solution = torch.linalg.lstsq(a[:, active] * scale[:, None], y * scale).solution
        negative = [i for i, v in zip(active, solution.tolist()) if v < 0]
        if not negative:
            coefficients = [0.0] * a.shape[1]
            for i, v in zip(active, solution.tolist()):
                coefficients[i] = v
            return coefficients
        active.remove(negative[0])


def _fit_max(cells: Sequence[float], slices: Sequence[float], targets: Sequence[float]) -> UNetCoefficients:
    """
    Fits ``max(per_cell·cells + per_slice·slices, whole_per_cell·cells)``: each point is assigned to the branch that
    predicts more, each branch is refitted on its points (relative least squares), until the assignment settles.
    """
    per_cell, per_slice = _least_squares([[c, s] for c, s in zip(cells, slices)], targets)
    whole = max(t / c for t, c in zip(targets, cells))
    for _ in range(50):
        in_whole = [whole * c > per_cell * c + per_slice * s for c, s in zip(cells, slices)]
        if any(in_whole):
            whole = _least_squares([[c] for c, w in zip(cells, in_whole) if w],
                                   [t for t, w in zip(targets, in_whole) if w])[0]
        if not all(in_whole):
            per_cell, per_slice = _least_squares([[c, s] for c, s, w in zip(cells, slices, in_whole) if not w],
                                                 [t for t, w in zip(targets, in_whole) if not w])
        if in_whole == [whole * c > per_cell * c + per_slice * s for c, s in zip(cells, slices)]:
            break
    return UNetCoefficients(per_cell=per_cell, per_slice=per_slice, whole_per_cell=whole, constant=0.0)


def fit_unet(config: STARConfig, shapes: Iterable[tuple[int, int, int, int]],
             measure: Callable[..., int] = measure_unet) -> FitReport:
    """
    Measures one evaluation per ``(batch, frames, h, w)`` in `shapes` and fits `UNetCoefficients` (elements).

    Parameters:
        config (`STARConfig`): the architecture.
        shapes (`Iterable[tuple[int, int, int, int]]`): evaluation shapes.
        measure (`Callable`): the measurement (default `measure_unet`).
    """
    shapes = list(shapes)
    measured = [measure(config, *shape) / 4 for shape in shapes]  # float32 bytes -> elements
    cells = [b * f * h * w for b, f, h, w in shapes]
    slices = [largest_slice(config, *shape) for shape in shapes]
    coefficients = _fit_max(cells, slices, measured)
    rows = tuple((shape, m * 4, 4 * unet_elements(coefficients, config, *shape))
                 for shape, m in zip(shapes, measured))
    return FitReport(coefficients, rows)


def fit_vae(widths: tuple[int, ...], layers_per_block: int, sizes: Iterable[tuple[int, int]],
            windows: Sequence[int] = (1, 3)) -> FitReport:
    """
    Measures the encoder (one frame) and the decoder (each window in `windows`) at every pixel size and fits
    `VAECoefficients`; the parked buffers are two feature maps of the first level (``2·widths[0]`` per pixel).

    Parameters:
        widths (`tuple[int, ...]`), layers_per_block (`int`): the VAE's architecture.
        sizes (`Iterable[tuple[int, int]]`): (height, width) pixel sizes, multiples of 8.
        windows (`Sequence[int]`): decoder windows to measure.
    """
    rows_in = []
    for height, width in sizes:
        rows_in.append((("encode", 1, height, width), measure_vae(widths, layers_per_block, "encode", 1, height,
                                                                  width) / 4))
        for frames in windows:
            rows_in.append((("decode", frames, height, width), measure_vae(widths, layers_per_block, "decode",
                                                                          frames, height, width) / 4))
    # encode: e·H·W + c ; decode: d·n·H·W + c (one shared constant)
    features = [[h * w if k == "encode" else 0, n * h * w if k == "decode" else 0, 1.0]
                for (k, n, h, w), _ in rows_in]
    encode, decode, constant = _least_squares(features, [m for _, m in rows_in])
    coefficients = VAECoefficients(encode, decode, 2.0 * widths[0], constant)
    rows = tuple((shape, m * 4, 4 * (encode * f[0] + decode * f[1] + constant))
                 for (shape, m), f in zip(rows_in, features))
    return FitReport(coefficients, rows)


def fit_sampler(frames: int = 40, chunks: Sequence[int] = (8, 40)) -> FitReport:
    """
    Measures the sampler's latent-sized tensors with injected noise at two chunk lengths (whole-video and chunk
    copies) and with the Brownian tree (its cache), and returns `SamplerCoefficients`.

    Parameters:
        frames (`int`): latent frames of the measured runs.
        chunks (`Sequence[int]`): two chunk lengths (one shorter than `frames`, one covering it).
    """
    short, whole = chunks
    injected = {chunk: measure_sampler(frames, chunk, brownian=False) for chunk in (short, whole)}
    # injected[c] = video + chunk·c/frames (the chunk's tensors), solved from the two runs
    chunk_copies = (injected[whole] - injected[short]) / ((min(whole, frames) - short) / frames)
    video = injected[short] - chunk_copies * short / frames
    brownian = measure_sampler(frames, whole, brownian=True) - injected[whole]
    # the measured runs hold the LR latent and the start noise as inputs; a run holds them as well
    coefficients = SamplerCoefficients(video_copies=video + 2, chunk_copies=chunk_copies, brownian_copies=brownian)
    rows = ((("injected", short), injected[short], video + chunk_copies * short / frames),
            (("injected", whole), injected[whole], video + chunk_copies * min(whole, frames) / frames),
            (("brownian", whole), injected[whole] + brownian, video + chunk_copies + brownian))
    return FitReport(coefficients, rows)
