"""The one STAR composition every entry point goes through: LR frames → LR latent → sampled latent → frames.

:func:`run` takes a :class:`~star_core.frames.FrameSource` (read twice, a window at a time), a
:class:`~star_core.frames.FrameSink` (receives finished windows in order), a :class:`~star_core.spec.RunSpec`, the
:class:`Components` and a :class:`~star_core.host.HostContext`; only the small latent is ever held for the whole
clip. The CLI, the ComfyUI nodes, the tests and the benchmarks all call it, or the stages it is made of:

* :func:`plan` — the run's :class:`~star_core.geometry.Geometry` (target size, padding, frames);
* :func:`encode_source` / :func:`encode_lr` — LR preparation (bilinear upscale, padding) and VAE encode with the
  per-frame posterior noise of :class:`~star_core.seeds.RunNoise`;
* :func:`sample_latent` / :func:`sample` — the STAR sampler (diffuse, DPM++2M SDE, CFG + rescale, windows);
* :func:`decode_to_sink` / :func:`decode` — VAE decode in temporal windows (blended by :mod:`star_core.windows`),
  crop, colour fix against the source frames read again, and the sink.

Progress and interruption go through the host: ``host.check_interrupt()`` runs before every model evaluation and
every VAE tile, and progress arrives as :class:`~star_core.host.ProgressEvent`.

Several processes (``torchrun``) share a run when ``host.distributed`` holds their
:class:`~star_core.distributed.Distributed`: the encoder's frame windows, the sampler's windows at every
evaluation and the decoder's windows are divided among the ranks (every rank calls the same functions with the
same arguments), the result is bit-identical to one process, and only rank 0 re-reads the source and writes to the
sink.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction

import torch

from . import autosize
from .colour import ColourMethod, apply_colour_fix
from .diffusion.star_sampling import (ModelFn, Replan, SamplerSettings, model_passes, network_levels,
                                      plan_evaluations, sample_star, solver_sigmas)
from .frames import FrameSink, FrameSource, SourceInfo, TensorSink, TensorSource
from .geometry import Geometry, PaddingMode, plan_geometry, upscale_and_pad
from .host import HostContext
from .seeds import RunNoise
from .spec import DecodeSpec, EncodeSpec, RunSpec
from .vae.base import SpatialTiling, VideoVAE
from .vae.tiled import temporal_plan

# Frames the LR stage hands to the VAE encoder at once (the official encode chunk is 1 frame; a few frames
# amortise the call overhead), bounded by READ_BUDGET_BYTES of upscaled, padded frames.
ENCODE_WINDOW = 4
READ_BUDGET_BYTES = 256 << 20


@dataclass
class Components:
    """
    The models of a run.

    Parameters:
        model (`torch.nn.Module` or `Callable`): the STAR network, or a ``model_fn(x, t, context, hint) -> v``.
        vae (`star_core.vae.VideoVAE`): the SVD video VAE.
        positive (`torch.Tensor`), negative (`torch.Tensor`): text contexts ``[1,77,1024]``
            (:func:`encode_prompts`).
    """

    model: torch.nn.Module | ModelFn
    vae: VideoVAE
    positive: torch.Tensor
    negative: torch.Tensor


def _host(host: HostContext | None) -> HostContext:
    return HostContext() if host is None else host


def frames_to_pixels(frames: torch.Tensor) -> torch.Tensor:
    """
    Official preprocessing of ComfyUI-layout frames: [T,H,W,C] in 0..1 → clamp → [T,3,H,W] in [-1, 1].

    Parameters:
        frames (`torch.Tensor`): float frames [T,H,W,3] in 0..1 (ComfyUI IMAGE).
    """
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"frames must be a [T,H,W,3] RGB tensor in 0..1 (ComfyUI IMAGE), got {shape}")
    if not frames.is_floating_point():
        raise ValueError(f"frames must be float in 0..1, got {frames.dtype}; divide uint8 frames by 255")
    check_finite("the input frames", frames)
    # contiguous NCHW: a channels-last view would make torch's CPU GroupNorm lose precision on flat padding
    pixels = frames.to(torch.float32).permute(0, 3, 1, 2).contiguous().clamp(0, 1)
    return (pixels - 0.5) / 0.5


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """
    Raises ValueError when ``tensor`` holds NaN or infinite values, before they silently turn a whole run into
    black or noise (they spread through every convolution and attention they touch).

    Parameters:
        name (`str`): what the tensor is, for the message (e.g. ``"the positive conditioning"``).
        tensor (`torch.Tensor`): any floating-point tensor.
    """
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name}: {bad} of {tensor.numel()} values are NaN or infinite; fix what produced them "
                         "(e.g. a model run in fp16 that overflowed) before STAR samples")


def pixels_to_frames(pixels: torch.Tensor) -> torch.Tensor:
    """Official ``tensor2vid`` without the ×255: [T,3,H,W] in [-1, 1] → [T,H,W,3] in 0..1 (clamped)."""
    return (pixels * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).contiguous()


def plan(info: SourceInfo, spec: RunSpec) -> Geometry:
    """The run's geometry for a source (see :func:`star_core.geometry.plan_geometry`)."""
    return plan_geometry(info.frames, info.height, info.width, scale=spec.output.scale_or_none,
                         target=spec.output.target, padding=spec.output.padding,
                         fps=None if info.fps is None else float(info.fps))


def prepare_windows(windows: Iterable[torch.Tensor], geometry: Geometry) -> Iterator[torch.Tensor]:
    """
    Lazily prepares LR frame windows for the encoder (streaming form of :func:`prepare_lr`).

    Parameters:
        windows (`Iterable[torch.Tensor]`): consecutive [t,H,W,3] windows in 0..1 at the LR size.
        geometry (`Geometry`): the run's geometry.

    Yields:
        `torch.Tensor`: [t,3,H_pad,W_pad] in [-1, 1], upscaled and padded.
    """
    for window in windows:
        yield prepare_window(window, geometry)


def prepare_window(frames: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """One LR window [t,H,W,3] in 0..1 → [t,3,H_pad,W_pad] in [-1, 1], upscaled and padded for the encoder."""
    return upscale_and_pad(frames_to_pixels(frames), geometry)


def prepare_lr(
    frames: torch.Tensor,
    *,
    scale: float | None = None,
    target: tuple[int, int] | None = None,
    padding: PaddingMode = "official",
    fps: float | None = None,
) -> tuple[torch.Tensor, Geometry]:
    """
    Official LR preparation of an in-memory video: [-1, 1] conversion, bilinear upscale to `scale`× or `target`,
    padding with 1.0 (`"official"`: ≥720x1280; `"minimal"`: only what the network needs).

    Parameters:
        frames (`torch.Tensor`): [T,H,W,3] in 0..1.
        scale (`float`, *optional*), target (`tuple[int, int]`, *optional*): exactly one of them.
        padding (`str`): `"official"` or `"minimal"`.
        fps (`float`, *optional*): carried in the geometry.

    Returns:
        `tuple[torch.Tensor, Geometry]`: padded pixels [T,3,H_pad,W_pad] in [-1, 1] and the geometry.
    """
    pixels = frames_to_pixels(frames)
    geometry = plan_geometry(pixels.shape[0], pixels.shape[2], pixels.shape[3], scale=scale, target=target,
                             padding=padding, fps=fps)
    return upscale_and_pad(pixels, geometry), geometry


def encode_prompts(text_encoder, prompt: str = "a good video", *, suffix: str = "official",
                   negative_prompt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Positive and negative cross-attention contexts: the caption is `prompt` followed by the quality suffix
    (see :func:`star_core.text.build_caption`), the negative defaults to the official negative prompt.

    Parameters:
        text_encoder (`star_core.text.TextEncoder`): anything with `encode(list[str]) -> [N,77,W]`.
        prompt (`str`): the user prompt (official default `"a good video"`).
        suffix (`str`): `"official"`, `"protected"` or `"none"`.
        negative_prompt (`str`, *optional*): overrides the official negative prompt.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: positive and negative contexts, each [1,77,W].
    """
    from .text import NEGATIVE_PROMPT, build_caption

    caption = build_caption(prompt, suffix=suffix, tokenizer=getattr(text_encoder, "tokenizer", None))
    embeddings = text_encoder.encode([caption, NEGATIVE_PROMPT if negative_prompt is None else negative_prompt])
    return embeddings[0:1], embeddings[1:2]


def tiling(tile: int | None, overlap: int, mode: str = "exact", park: str = "auto") -> SpatialTiling | None:
    """The VAE's spatial tiling for a spec's ``tile``/``tile_overlap``/``tile_mode`` (None: whole frames) and the
    exact tiles' ``park`` (see `star_core.vae.base.SpatialTiling`)."""
    return None if tile is None else SpatialTiling(tile, overlap, mode, park)


def _vae_place(vae: VideoVAE) -> tuple[torch.device, torch.dtype]:
    """Device and compute dtype of the VAE (fp32 on CPU when it does not say)."""
    return torch.device(getattr(vae, "device", "cpu")), getattr(vae, "dtype", torch.float32)


def encode_window(geometry: Geometry) -> int:
    """Frames read and encoded at once: :data:`ENCODE_WINDOW`, fewer when their padded copies would exceed
    :data:`READ_BUDGET_BYTES`."""
    padded_frame_bytes = 3 * 4 * geometry.padded_size[0] * geometry.padded_size[1]
    return max(1, min(ENCODE_WINDOW, READ_BUDGET_BYTES // padded_frame_bytes))


def encode_lr(
    vae,
    pixels: torch.Tensor | Iterable[torch.Tensor],
    geometry: Geometry,
    noise: RunNoise | None = None,
    *,
    sample: bool = True,
    tiles: SpatialTiling | None = None,
    host: HostContext | None = None,
    sizing: autosize.Sizing | None = None,
    options: EncodeSpec | None = None,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """
    Encodes the prepared LR video to the scaled latent [1,4,F,h,w] (the ControlNet hint and the start point).

    With several ranks (``host.distributed``), window ``k`` is encoded by rank ``k mod world`` and every rank gets
    the whole latent; every rank draws every frame's posterior noise in frame order, so the latent is the one
    process's, bit for bit.

    Parameters:
        vae (`star_core.vae.VideoVAE`): the video VAE.
        pixels (`torch.Tensor` or `Iterable[torch.Tensor]`): [T,3,H_pad,W_pad] in [-1, 1], or consecutive windows
            of it (e.g. :func:`prepare_windows` over a source) — only the latent accumulates.
        geometry (`Geometry`): the run's geometry (frame count and padded size are checked).
        noise (`RunNoise`, *optional*): posterior noise per frame (official: a sample); required when `sample`.
        sample (`bool`): posterior sample (official) or the posterior mean.
        tiles (`SpatialTiling`, *optional*): spatial tiling of the encoder, in pixels.
        host (`HostContext`, *optional*): progress (stage ``"encode"``, VAE tiles) and interrupt per tile.
        sizing (`star_core.autosize.Sizing`, *optional*), options (`EncodeSpec`, *optional*): instead of
            ``tiles``: the tiles of the sizing's plan with the options' overlap and mode; a window that runs out of
            memory is encoded again with smaller auto tiles (see :func:`encode_source`).
        prepare (`Callable`, *optional*): turns each window into encoder input first (e.g. :func:`prepare_window`
            on raw source windows); only the windows this rank encodes are prepared.

    Returns:
        `torch.Tensor`: float32 latent [1,4,F,h,w] on the VAE's device.
    """
    host = _host(host)
    work = host.shared
    if sample and noise is None:
        raise ValueError("encode_lr: sample=True needs a RunNoise (seed or injected posterior_eps); "
                         "pass noise= or sample=False for the posterior mean")
    if isinstance(pixels, torch.Tensor):
        pixels = pixels.split(ENCODE_WINDOW)
    latent_h, latent_w = geometry.latent_size
    device, dtype = _vae_place(vae)
    channels = getattr(vae, "latent_channels", 4)
    parts, shapes, done = {}, [], 0
    for index, window in enumerate(pixels):
        count = window.shape[0]
        if done + count > geometry.frames:
            raise ValueError(f"encode_lr: more frames than the geometry's {geometry.frames}")
        eps = noise.posterior_eps_window(done, count, (channels, latent_h, latent_w), device) if sample else None
        shapes.append((1, channels, count, latent_h, latent_w))
        if work is None or work.owner(index) == work.rank:
            window = window if prepare is None else prepare(window)
            if tuple(window.shape[1:]) != (3, *geometry.padded_size):
                raise ValueError(f"encode_lr: window of shape {tuple(window.shape)} is not [t,3,"
                                 f"{geometry.padded_size[0]},{geometry.padded_size[1]}]; prepare the frames with "
                                 "prepare_lr/prepare_windows")
            progress = host.tile_callback("encode", done, count, geometry.frames)
            if sizing is None:
                part = vae.encode(window.to(device, dtype), eps, sample=sample, tiling=tiles, callback=progress)
            else:
                part = sizing.retry(lambda plan: vae.encode(
                    window.to(device, dtype), eps, sample=sample, callback=progress,
                    tiling=tiling(plan.encode_tile, options.tile_overlap, options.tile_mode,
                                  autosize.park(plan, "encode"))))
            parts[index] = part.to(torch.float32)
            del part
        done += count
    if done != geometry.frames:
        raise ValueError(f"encode_lr: got {done} frames, the geometry says {geometry.frames}")
    if work is None:
        ordered = [parts[index] for index in range(len(shapes))]
    else:
        ordered = work.exchange(parts, shapes, stage="encode", what="the LR latent's encode", device=device)
    latent = torch.cat(ordered, dim=2)
    geometry.check_latent(latent)
    return latent


def encode_source(source: FrameSource, geometry: Geometry, vae, spec: RunSpec | EncodeSpec, *,
                  seed: int | None = None, host: HostContext | None = None, model: object = None) -> torch.Tensor:
    """
    Reads the source window by window, prepares and encodes it (:func:`encode_lr`); only the latent is kept.
    An ``auto`` encoder tile is chosen for the host's memory budget (:mod:`star_core.autosize`), and a window that
    runs out of memory is encoded again with smaller auto tiles.

    Parameters:
        source (`FrameSource`): the LR video.
        geometry (`Geometry`): from :func:`plan`.
        vae (`star_core.vae.VideoVAE`): the video VAE.
        spec (`RunSpec` or `EncodeSpec`): the encode options (and the seed, for a whole spec).
        seed (`int`, *optional*): the run's seed when ``spec`` is an `EncodeSpec`.
        host (`HostContext`, *optional*): progress, interrupt, memory budget.
        model (`torch.nn.Module`, *optional*): the network, whose weights count when the models stay resident.
    """
    host = _host(host)
    if isinstance(spec, RunSpec):
        seed, spec = spec.seed, spec.encode
    sample_posterior = spec.posterior == "sample"
    noise = RunNoise(seed) if sample_posterior else None
    window = encode_window(geometry)
    options, sizing = autosize.vae_sizing("encode", spec, geometry, vae, host, model=model, encode_window=window)
    return encode_lr(vae, source.windows(window), geometry, noise, sample=sample_posterior, host=host,
                     sizing=sizing, options=options, prepare=lambda window: prepare_window(window, geometry))


def model_function(model: torch.nn.Module) -> ModelFn:
    """
    Wraps a STAR network as the sampler's `model_fn`: inputs are cast to the model's compute dtype and device,
    the v-prediction comes back in the sampler's dtype (fp32). The function carries the network's ``config``, so
    diffusion tiles follow its size rule (:func:`star_core.diffusion.star_sampling.network_levels`).

    Parameters:
        model (`torch.nn.Module`): e.g. :class:`star_core.model.STARUNet`.
    """
    weight = next(model.parameters())
    dtype = getattr(model, "dtype", weight.dtype)

    def model_fn(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, hint: torch.Tensor | None) -> torch.Tensor:
        cast = dict(device=weight.device, dtype=dtype)
        hint = hint.to(**cast) if hint is not None else None
        v = model(x.to(**cast), t.to(weight.device), context.to(**cast), hint)
        return v.to(device=x.device, dtype=x.dtype)

    model_fn.config = getattr(model, "config", None)  # type: ignore[attr-defined]
    model_fn.dtype = dtype  # type: ignore[attr-defined]  # for the memory model (star_core.autosize)
    model_fn.module = model  # type: ignore[attr-defined]  # its parameters, counted by the memory model
    return model_fn


def sample(
    model: ModelFn | torch.nn.Module,
    latent: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    settings: SamplerSettings | None = None,
    noise: RunNoise | None = None,
    *,
    host: HostContext | None = None,
    vae: object = None,
) -> torch.Tensor:
    """
    Runs the STAR sampler on an LR latent: start = diffuse(latent, t_max) with the run's start noise, DPM++2M SDE
    with the run's Brownian tree, CFG + rescale, windows per `settings`.

    Parameters:
        model (`Callable` or `torch.nn.Module`): `model_fn(x, t, context, hint) -> v`, or a STAR network.
        latent (`torch.Tensor`): the clean LR latent [1,4,F,h,w] (hint and start point); its device is the
            sampler's.
        positive (`torch.Tensor`), negative (`torch.Tensor`): contexts [1,77,1024].
        settings (`SamplerSettings`, *optional*): defaults to the official fast mode.
        noise (`RunNoise`): start noise and Brownian entropy.
        host (`HostContext`, *optional*): the interrupt check before every network call; progress events
            ``("sample", calls done, calls in all)`` before every call and, after every solver step, one with
            ``step``, ``steps`` and the step's ``x0``; the memory budget for ``auto`` chunk length and tiles
            (:mod:`star_core.autosize`: an evaluation that runs out of memory is repeated with smaller auto
            windows, kept for the rest of the run).
        vae (`VideoVAE`, *optional*): counted in the budget when the models stay resident.

    Returns:
        `torch.Tensor`: the sampled latent [1,4,F,h,w], float32.
    """
    host = _host(host)
    if noise is None:
        raise ValueError("sample: pass noise=RunNoise(seed) (or one with the recorded noises injected)")
    if latent.ndim != 5 or latent.shape[0] != 1:
        raise ValueError(f"sample: latent must be [1,4,F,h,w], got {tuple(latent.shape)}")
    for name, tensor in (("the LR latent", latent), ("the positive conditioning", positive),
                         ("the negative conditioning", negative)):
        check_finite(name, tensor)
    model_fn = model_function(model) if isinstance(model, torch.nn.Module) else model
    settings = SamplerSettings() if settings is None else settings
    latent = latent.to(torch.float32)
    start_noise = noise.diffuse_eps(tuple(latent.shape), device=latent.device)
    brownian = noise.brownian()
    levels = network_levels(model_fn)
    requested = settings
    settings, sizing = autosize.sampler_sizing(requested, tuple(latent.shape[2:5]), model, host, vae=vae)
    grid = plan_evaluations(latent.shape, settings, levels)
    if not sizing.plan.state_on_device:  # the whole-video state waits on the host; one window at a time on the device
        latent, start_noise = latent.cpu(), start_noise.cpu()

    def smaller(grid, error: BaseException):  # mid-run: the state stays where it is, the windows shrink
        plan = sizing.smaller(error, sizing.fields - {"state_on_device"})
        return plan_evaluations(latent.shape, autosize.sampler_settings(requested, plan, sizing.auto), levels)

    calls: list[int] = [0, 1]  # calls done, calls in all (set by the first on_evaluation)

    def on_evaluation(done: int, total: int) -> None:
        host.check_interrupt()
        calls[:] = [done, total]
        host.report("sample", done, total)

    def on_step(step: int, steps: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        per_step = calls[1] // steps
        host.report("sample", (step + 1) * per_step, calls[1], step=step + 1, steps=steps, x0=x0)

    return sample_star(model_fn, latent, positive.to(latent.device, torch.float32),
                       negative.to(latent.device, torch.float32), settings, start_noise=start_noise,
                       brownian=brownian, callback=on_step, on_evaluation=on_evaluation, grid=grid,
                       replan=Replan(sizing.matches, smaller) if sizing.can_shrink else None, work=host.shared)


def model_evaluations(settings: SamplerSettings, latent_shape: tuple[int, ...], levels: int | None = None) -> int:
    """Network calls a run makes: solver steps × windows (chunks × tiles) × (2 with CFG, unless batched).

    Parameters:
        settings (`SamplerSettings`): the sampler options (``auto`` ones at their official values).
        latent_shape (`tuple[int, ...]`): ``[1,4,F,h,w]``.
        levels (`int`, *optional*): the network's resolution levels (its tile size rule), see
            :func:`star_core.diffusion.star_sampling.plan_evaluations`.
    """
    settings = autosize.official(settings)
    steps = len(solver_sigmas(settings)) - 1
    return steps * len(plan_evaluations(latent_shape, settings, levels)) * model_passes(settings.cfg,
                                                                                         settings.batch_cfg)


def sample_latent(components: Components, latent: torch.Tensor, spec: RunSpec, *,
                  host: HostContext | None = None) -> torch.Tensor:
    """:func:`sample` with the spec's sampler settings and seed, on the host's device; returns the latent there."""
    host = _host(host)
    return sample(components.model, latent.to(host.device), components.positive, components.negative,
                  spec.sampler, RunNoise(spec.seed), host=host, vae=components.vae)


def decode_pixels(vae, latent: torch.Tensor, geometry: Geometry, options: DecodeSpec = DecodeSpec(), *,
                  host: HostContext | None = None, model: object = None) -> Iterator[torch.Tensor]:
    """
    Decodes a latent window by window (:func:`star_core.vae.tiled.temporal_plan`, overlaps blended as the windows
    arrive) and crops each to the target size: yields [t,3,H,W] in (about) [-1, 1], not clamped (the official
    `test()` return value, window by window). A frame leaves as soon as every window covering it is decoded.

    With several ranks (``host.distributed``), window ``k`` is decoded (and cropped) by rank ``k mod world`` and
    the windows reach rank 0 a round (one per rank) at a time; rank 0 yields the frames, the other ranks nothing.

    Parameters:
        vae (`star_core.vae.VideoVAE`): the video VAE.
        latent (`torch.Tensor`): [1,4,F,h,w] matching `geometry`.
        geometry (`Geometry`): the run's geometry.
        options (`DecodeSpec`): temporal windows and spatial tiles; ``auto`` ones are chosen for the host's memory
            budget (:mod:`star_core.autosize`), and a window that runs out of memory is decoded again with smaller
            auto tiles.
        host (`HostContext`, *optional*): progress (stage ``"decode"``, VAE tiles), interrupt per tile, budget.
        model (`torch.nn.Module`, *optional*): the network, whose weights count when the models stay resident.
    """
    host = _host(host)
    geometry.check_latent(latent)
    options, sizing = autosize.vae_sizing("decode", options, geometry, vae, host, model=model)
    windows = temporal_plan(latent.shape[2], options.window, options.window_overlap)
    device, dtype = _vae_place(vae)

    def decode_window(chunk: torch.Tensor, frames: int, progress, plan) -> torch.Tensor:
        tiles = tiling(plan.decode_tile, options.tile_overlap, options.tile_mode, autosize.park(plan, "decode"))
        return vae.decode(chunk, frames, 0, tiling=tiles, callback=progress).to(torch.float32)

    def decoded(index: int) -> torch.Tensor:
        start, stop = windows.spans[index]
        chunk = latent[:, :, start:stop].to(device, dtype)
        progress = host.tile_callback("decode", index, 1, len(windows))
        # the windows are planned: only the tiles may shrink now
        return sizing.retry(lambda plan: decode_window(chunk, stop - start, progress, plan),
                            ("decode_tile", "decode_park"))

    work = host.shared
    if work is None:
        for window in windows.blend_stream(decoded(index) for index in range(len(windows))):
            yield geometry.crop(window)
        return
    # cropping before the blend gives the same values (both act per pixel) and sends fewer bytes
    outputs = work.stream(len(windows), lambda index: geometry.crop(decoded(index)),
                          lambda index: (windows.spans[index][1] - windows.spans[index][0], 3, *geometry.target_size),
                          stage="decode", what="decode window", device=device)
    if work.is_main:
        yield from windows.blend_stream(outputs)
    else:
        for _ in outputs:  # this rank's windows go to rank 0
            pass


def decode(vae, latent: torch.Tensor, geometry: Geometry, options: DecodeSpec = DecodeSpec(), *,
           host: HostContext | None = None, model: object = None) -> Iterator[torch.Tensor]:
    """
    :func:`decode_pixels` converted to ComfyUI frames: yields [t,H,W,3] in 0..1 windows of exactly the target
    size; all windows together hold exactly `geometry.frames` frames.
    """
    for window in decode_pixels(vae, latent, geometry, options, host=host, model=model):
        yield pixels_to_frames(window.to(torch.float32))


def colour_fix(restored: torch.Tensor, lr: torch.Tensor, method: ColourMethod = "adain",
               strength: float = 1.0) -> torch.Tensor:
    """
    Colour correction of restored frames against the LR frames they came from (per frame, so it works window by
    window): see :func:`star_core.colour.apply_colour_fix`.

    Parameters:
        restored (`torch.Tensor`): [t,H,W,3] in 0..1.
        lr (`torch.Tensor`): the matching LR frames [t,h,w,3] in 0..1.
        method (`str`): `"adain"` (official), `"wavelet"` or `"none"`.
        strength (`float`): 1 = fully restored, 0 = the bilinear-upscaled source.
    """
    return apply_colour_fix(restored, lr.to(restored.device), method, strength)


class _Frames:
    """Exact frame counts from a source's single-frame windows (for aligning the LR frames with decoded ones)."""

    def __init__(self, source: FrameSource) -> None:
        self._windows = source.windows(1)
        self._name = source.info.name

    def take(self, count: int) -> torch.Tensor:
        taken = [window for _, window in zip(range(count), self._windows)]
        if sum(w.shape[0] for w in taken) != count:
            raise ValueError(f"{self._name} has fewer frames on the second read than on the first: it changed while "
                             "being processed, or its decoder is not deterministic; re-encode it (e.g. to .mkv)")
        return torch.cat(taken)


def decode_to_sink(vae, latent: torch.Tensor, geometry: Geometry, source: FrameSource, sink: FrameSink,
                   spec: RunSpec, *, host: HostContext | None = None, model: object = None) -> None:
    """
    Decodes the sampled latent window by window, colour-fixes each window against the same source frames read
    again, and hands it to the sink; the sink is aborted (nothing half-written) when anything fails.

    Parameters:
        vae (`star_core.vae.VideoVAE`): the video VAE.
        latent (`torch.Tensor`): the sampled latent [1,4,F,h,w].
        geometry (`Geometry`): the run's geometry.
        source (`FrameSource`): the LR video the latent came from.
        sink (`FrameSink`): where the frames go.
        spec (`RunSpec`): decode and colour options.
        host (`HostContext`, *optional*): progress, interrupt, memory budget; with several ranks only rank 0 reads
            the source again and writes to the sink, the others decode their share of the windows.
        model (`torch.nn.Module`, *optional*): the network, whose weights count when the models stay resident.
    """
    host = _host(host)
    if host.shared is not None and not host.shared.is_main:
        for _ in decode(vae, latent, geometry, spec.decode, host=host, model=model):
            pass
        return
    lr_frames = _Frames(source)
    sink.begin(geometry, source.info.fps)
    try:
        for restored in decode(vae, latent, geometry, spec.decode, host=host, model=model):
            lr = lr_frames.take(restored.shape[0])
            sink.write(colour_fix(restored, lr, spec.colour.method, spec.colour.strength))
    except BaseException:
        sink.abort()
        raise
    sink.finish()


def run(source: FrameSource, sink: FrameSink, spec: RunSpec, components: Components,
        host: HostContext | None = None) -> Geometry:
    """
    Upscales a video with STAR, streaming: source → prepare → encode → sample → decode → crop → colour fix → sink.

    Parameters:
        source (`FrameSource`): the LR video (read twice, a window at a time).
        sink (`FrameSink`): receives the output frames in order.
        spec (`RunSpec`): every option of the run.
        components (`Components`): the models and text contexts.
        host (`HostContext`, *optional*): device, progress, interrupt, attention.

    Returns:
        `Geometry`: the run's geometry (output size, padding, frame count).
    """
    host = _host(host)
    with host.scope():
        geometry = plan(source.info, spec)
        latent = encode_source(source, geometry, components.vae, spec, host=host, model=components.model)
        latent = sample_latent(components, latent, spec, host=host)
        decode_to_sink(components.vae, latent, geometry, source, sink, spec, host=host, model=components.model)
    return geometry


def upscale_video(frames: torch.Tensor, spec: RunSpec, components: Components, host: HostContext | None = None,
                  *, fps: Fraction | float | None = None) -> torch.Tensor:
    """
    :func:`run` on an in-memory video: [T,H,W,3] in 0..1 → [T,H_target,W_target,3] float32 in 0..1 on the CPU.
    """
    sink = TensorSink()
    run(TensorSource(frames, fps), sink, spec, components, host)
    assert sink.frames is not None
    return sink.frames

