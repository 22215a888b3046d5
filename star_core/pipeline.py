"""The one STAR composition every entry point goes through: LR frames → LR latent → sampled latent → frames.

Stages (each usable alone, so hosts and the CLI can stream and put their own nodes in between):

* :func:`prepare_lr` / :func:`prepare_windows` — official preprocessing, bilinear upscale, padding; the
  :class:`~star_core.geometry.Geometry` that travels with the latent;
* :func:`encode_prompts` — caption + negative prompt → context tensors;
* :func:`encode_lr` — VAE encode (per-frame posterior sample from :class:`~star_core.seeds.RunNoise`), accepting a
  tensor or an iterator of windows so only the small latent accumulates;
* :func:`sample` — the STAR sampler (diffuse, DPM++2M SDE, CFG + rescale, temporal chunks);
* :func:`decode` — VAE decode in temporal windows, yielding cropped frame windows (peak RAM independent of length);
* :func:`colour_fix`, :func:`to_uint8` — colour correction and the official uint8 truncation for writers;
* :func:`upscale_video` — everything above for in-memory frames.

Progress and interruption go through one ``callback(stage, done, total)``; an exception raised by it aborts the
run. The UNet runs in its weight dtype on its device; the VAE and text encoder in their own (fp32 by default).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from .colour import ColourMethod, apply_colour_fix
from .diffusion.chunking import plan_chunks
from .diffusion.schedule import discretized_timesteps, k_sigmas
from .diffusion.star_sampling import SamplerSettings, sample_star
from .geometry import Geometry, PaddingMode, plan_geometry, upscale_and_pad
from .seeds import RunNoise
from .tiling import feather_weights, plan_spans
from .vae.base import SpatialTiling, VideoVAE

ProgressCallback = Callable[[str, int, int], None]
ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

# Frames the LR stage hands to the VAE encoder at once when given an in-memory video (the official encode
# chunk is 1 frame; a few frames amortise the call overhead without growing memory much).
ENCODE_WINDOW = 4


@dataclass(frozen=True)
class DecodeOptions:
    """
    How the VAE decodes the latent.

    Parameters:
        window (`int`): frames per temporal-decoder call (official: 3).
        window_overlap (`int`): frames shared by neighbouring windows, blended (official: 0 = hard cuts).
        tile (`int`, *optional*): spatial tile edge in pixels (None: whole frames, official).
        tile_overlap (`int`): spatial tile overlap in pixels.
    """

    window: int = 3
    window_overlap: int = 0
    tile: int | None = None
    tile_overlap: int = 64


def _tile_progress(
    callback: ProgressCallback | None, stage: str, first: int, count: int, total: int
) -> Callable[[int, int], None] | None:
    """Maps a VAE call's per-tile ``(done, tiles)`` over items ``first … first+count-1`` (frames or windows, each
    with the same number of tiles) onto ``callback(stage, tiles_done, tiles_total)`` for the whole stage."""
    if callback is None:
        return None

    def on_tile(done: int, tiles: int) -> None:
        per_item = tiles // count
        callback(stage, first * per_item + done, total * per_item)

    return on_tile


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
    # contiguous NCHW: a channels-last view would make torch's CPU GroupNorm lose precision on flat padding
    pixels = frames.to(torch.float32).permute(0, 3, 1, 2).contiguous().clamp(0, 1)
    return (pixels - 0.5) / 0.5


def pixels_to_frames(pixels: torch.Tensor) -> torch.Tensor:
    """Official ``tensor2vid`` without the ×255: [T,3,H,W] in [-1, 1] → [T,H,W,3] in 0..1 (clamped)."""
    return (pixels * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).contiguous()


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """
    The official writer conversion: 0..1 frames × 255 **truncated** (numpy ``astype('uint8')``), not rounded.

    Parameters:
        frames (`torch.Tensor`): [T,H,W,C] float in 0..1.
    """
    return (frames.clamp(0, 1) * 255).to(torch.uint8)


def plan_lr(
    frames: int,
    height: int,
    width: int,
    *,
    scale: float | None = None,
    target: tuple[int, int] | None = None,
    padding: PaddingMode = "official",
    fps: float | None = None,
) -> Geometry:
    """The run's geometry for `frames` LR frames of `height`x`width` (see :func:`star_core.geometry.plan_geometry`)."""
    return plan_geometry(frames, height, width, scale=scale, target=target, padding=padding, fps=fps)


def prepare_windows(windows: Iterable[torch.Tensor], geometry: Geometry) -> Iterator[torch.Tensor]:
    """
    Lazily prepares LR frame windows for the encoder (streaming form of :func:`prepare_lr`).

    Parameters:
        windows (`Iterable[torch.Tensor]`): consecutive [t,H,W,3] windows in 0..1 at the LR size.
        geometry (`Geometry`): from :func:`plan_lr`.

    Yields:
        `torch.Tensor`: [t,3,H_pad,W_pad] in [-1, 1], upscaled and padded.
    """
    for window in windows:
        yield upscale_and_pad(frames_to_pixels(window), geometry)


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
    geometry = plan_lr(pixels.shape[0], pixels.shape[2], pixels.shape[3], scale=scale, target=target,
                       padding=padding, fps=fps)
    return upscale_and_pad(pixels, geometry), geometry


def encode_prompts(
    text_encoder, prompt: str = "a good video", *, suffix: str = "official", negative_prompt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
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


def _tiling(tile: int | None, overlap: int) -> SpatialTiling | None:
    return None if tile is None else SpatialTiling(tile, overlap)


def _vae_place(vae: VideoVAE) -> tuple[torch.device, torch.dtype]:
    """Device and compute dtype of the VAE (fp32 on CPU when it does not say)."""
    return torch.device(getattr(vae, "device", "cpu")), getattr(vae, "dtype", torch.float32)


def _windows_of(pixels: torch.Tensor | Iterable[torch.Tensor], size: int) -> Iterable[torch.Tensor]:
    if isinstance(pixels, torch.Tensor):
        return (pixels[start:start + size] for start in range(0, pixels.shape[0], size))
    return pixels


def encode_lr(
    vae,
    pixels: torch.Tensor | Iterable[torch.Tensor],
    geometry: Geometry,
    noise: RunNoise | None = None,
    *,
    sample: bool = True,
    tile: int | None = None,
    tile_overlap: int = 64,
    callback: ProgressCallback | None = None,
) -> torch.Tensor:
    """
    Encodes the prepared LR video to the scaled latent [1,4,F,h,w] (the ControlNet hint and the start point).

    Parameters:
        vae (`star_core.vae.VideoVAE`): the video VAE.
        pixels (`torch.Tensor` or `Iterable[torch.Tensor]`): [T,3,H_pad,W_pad] in [-1, 1], or consecutive windows
            of it (e.g. :func:`prepare_windows` over a video reader) — only the latent accumulates.
        geometry (`Geometry`): the run's geometry (frame count and padded size are checked).
        noise (`RunNoise`, *optional*): posterior noise per frame (official: a sample); required when `sample`.
        sample (`bool`): posterior sample (official) or the posterior mean.
        tile (`int`, *optional*), tile_overlap (`int`): spatial tiling of the encoder, in pixels.
        callback (`Callable`, *optional*): `callback("encode", tiles_done, tiles_total)` after every VAE tile;
            raising aborts.

    Returns:
        `torch.Tensor`: float32 latent [1,4,F,h,w] on the VAE's device.
    """
    if sample and noise is None:
        raise ValueError("encode_lr: sample=True needs a RunNoise (seed or injected posterior_eps); "
                         "pass noise= or sample=False for the posterior mean")
    latent_h, latent_w = geometry.latent_size
    parts, done = [], 0
    for window in _windows_of(pixels, ENCODE_WINDOW):
        if tuple(window.shape[1:]) != (3, *geometry.padded_size):
            raise ValueError(f"encode_lr: window of shape {tuple(window.shape)} is not [t,3,{geometry.padded_size[0]},"
                             f"{geometry.padded_size[1]}]; prepare the frames with prepare_lr/prepare_windows")
        count = window.shape[0]
        if done + count > geometry.frames:
            raise ValueError(f"encode_lr: more frames than the geometry's {geometry.frames}")
        device, dtype = _vae_place(vae)
        channels = getattr(vae, "latent_channels", 4)
        eps = noise.posterior_eps_window(done, count, (channels, latent_h, latent_w), device) if sample else None
        part = vae.encode(window.to(device, dtype), eps, sample=sample, tiling=_tiling(tile, tile_overlap),
                          callback=_tile_progress(callback, "encode", done, count, geometry.frames))
        parts.append(part.to(torch.float32))
        done += count
    if done != geometry.frames:
        raise ValueError(f"encode_lr: got {done} frames, the geometry says {geometry.frames}")
    latent = torch.cat(parts, dim=2)
    geometry.check_latent(latent)
    return latent


def model_function(model: torch.nn.Module) -> ModelFn:
    """
    Wraps a STAR network as the sampler's `model_fn`: inputs are cast to the model's weight dtype and device,
    the v-prediction comes back in the sampler's dtype (fp32).

    Parameters:
        model (`torch.nn.Module`): e.g. :class:`star_core.model.STARUNet`.
    """
    weight = next(model.parameters())

    def model_fn(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, hint: torch.Tensor | None) -> torch.Tensor:
        cast = dict(device=weight.device, dtype=weight.dtype)
        hint = hint.to(**cast) if hint is not None else None
        v = model(x.to(**cast), t.to(weight.device), context.to(**cast), hint)
        return v.to(device=x.device, dtype=x.dtype)

    return model_fn


def sample(
    model: ModelFn | torch.nn.Module,
    latent: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    settings: SamplerSettings | None = None,
    noise: RunNoise | None = None,
    *,
    callback: ProgressCallback | None = None,
) -> torch.Tensor:
    """
    Runs the STAR sampler on an LR latent: start = diffuse(latent, t_max) with the run's start noise, DPM++2M SDE
    with the run's Brownian tree, CFG + rescale, temporal chunks per `settings`.

    Parameters:
        model (`Callable` or `torch.nn.Module`): `model_fn(x, t, context, hint) -> v`, or a STAR network.
        latent (`torch.Tensor`): the clean LR latent [1,4,F,h,w] (hint and start point); its device is the
            sampler's.
        positive (`torch.Tensor`), negative (`torch.Tensor`): contexts [1,77,1024].
        settings (`SamplerSettings`, *optional*): defaults to the official fast mode.
        noise (`RunNoise`): start noise and Brownian entropy.
        callback (`Callable`, *optional*): `callback("sample", evaluations_done, total)` after every network
            call; raising aborts.

    Returns:
        `torch.Tensor`: the sampled latent [1,4,F,h,w], float32.
    """
    if noise is None:
        raise ValueError("sample: pass noise=RunNoise(seed) (or one with the recorded noises injected)")
    if latent.ndim != 5 or latent.shape[0] != 1:
        raise ValueError(f"sample: latent must be [1,4,F,h,w], got {tuple(latent.shape)}")
    model_fn = model_function(model) if isinstance(model, torch.nn.Module) else model
    settings = SamplerSettings() if settings is None else settings
    latent = latent.to(torch.float32)
    start_noise = noise.diffuse_eps(tuple(latent.shape), device=latent.device)
    brownian = noise.brownian()
    if callback is not None:
        model_fn = _counted(model_fn, callback, model_evaluations(settings, latent.shape[2]))
    return sample_star(model_fn, latent, positive.to(latent.device, torch.float32),
                       negative.to(latent.device, torch.float32), settings, start_noise=start_noise,
                       brownian=brownian)


def model_evaluations(settings: SamplerSettings, frames: int) -> int:
    """Number of network calls a run makes: solver steps × temporal chunks × (2 with CFG, unless batched)."""
    steps = len(k_sigmas(discretized_timesteps(settings.mode, settings.steps, settings.t_max))) - 1
    chunks = len(plan_chunks(frames, settings.chunk_len, settings.overlap, settings.fusion).windows)
    passes = 1 if settings.cfg == 1 or settings.batch_cfg else 2
    return steps * chunks * passes


def _counted(model_fn: ModelFn, callback: ProgressCallback, total: int) -> ModelFn:
    """`model_fn` reporting `callback("sample", calls_done, total)` after every network call (so a host can
    cancel within one evaluation by raising)."""
    calls = 0

    def counted(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, hint: torch.Tensor | None) -> torch.Tensor:
        nonlocal calls
        v = model_fn(x, t, context, hint)
        calls += 1
        callback("sample", calls, total)
        return v

    return counted


def _vae_decode_windows(
    vae: VideoVAE, latent: torch.Tensor, options: DecodeOptions, callback: ProgressCallback | None
) -> Iterator[torch.Tensor]:
    """Decoded [t,3,H_pad,W_pad] windows in frame order; overlapping windows are blended with the VAE tiling's
    feather weights and a frame is yielded as soon as every window covering it is decoded."""
    frames = latent.shape[2]
    spans = plan_spans(frames, options.window, options.window_overlap)
    tiling = _tiling(options.tile, options.tile_overlap)
    device, dtype = _vae_place(vae)

    def run(index: int) -> torch.Tensor:
        start, end = spans[index]
        chunk = latent[:, :, start:end].to(device, dtype)
        progress = _tile_progress(callback, "decode", index, 1, len(spans))
        return vae.decode(chunk, end - start, 0, tiling=tiling, callback=progress).to(torch.float32)

    if options.window_overlap == 0:
        for index in range(len(spans)):
            yield run(index)
        return
    weights = feather_weights(spans, frames)
    pending, pending_start = None, 0  # blended frames [pending_start, pending_start + len) not yet complete
    for index, ((start, end), weight) in enumerate(zip(spans, weights)):
        out = run(index) * weight.view(-1, 1, 1, 1).to(device)
        if pending is None:
            pending, pending_start = out, start
        else:
            keep = pending_start + pending.shape[0]
            overlap = keep - start
            pending[pending.shape[0] - overlap:] += out[:overlap]
            pending = torch.cat([pending, out[overlap:]])
        # frames before the next window's start are final
        ready = (spans[index + 1][0] if index + 1 < len(spans) else frames) - pending_start
        if ready > 0:
            yield pending[:ready]
            pending, pending_start = pending[ready:], pending_start + ready


def decode_pixels(
    vae,
    latent: torch.Tensor,
    geometry: Geometry,
    options: DecodeOptions = DecodeOptions(),
    *,
    callback: ProgressCallback | None = None,
) -> Iterator[torch.Tensor]:
    """
    Decodes a latent window by window and crops each to the target size: yields [t,3,H,W] in (about) [-1, 1],
    not clamped (the official `test()` return value, frame window by frame window).

    Parameters:
        vae (`star_core.vae.VideoVAE`): the video VAE.
        latent (`torch.Tensor`): [1,4,F,h,w] matching `geometry`.
        geometry (`Geometry`): the run's geometry.
        options (`DecodeOptions`): temporal windows and spatial tiles.
        callback (`Callable`, *optional*): `callback("decode", tiles_done, tiles_total)` after every VAE tile;
            raising aborts.
    """
    geometry.check_latent(latent)
    for window in _vae_decode_windows(vae, latent, options, callback):
        yield geometry.crop(window)


def decode(
    vae,
    latent: torch.Tensor,
    geometry: Geometry,
    options: DecodeOptions = DecodeOptions(),
    *,
    callback: ProgressCallback | None = None,
) -> Iterator[torch.Tensor]:
    """
    :func:`decode_pixels` converted to ComfyUI frames: yields [t,H,W,3] in 0..1 windows of exactly the target
    size; all windows together hold exactly `geometry.frames` frames.
    """
    for window in decode_pixels(vae, latent, geometry, options, callback=callback):
        yield pixels_to_frames(window.to(torch.float32))


def colour_fix(
    restored: torch.Tensor, lr: torch.Tensor, method: ColourMethod = "adain", strength: float = 1.0
) -> torch.Tensor:
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


def upscale_video(
    frames: torch.Tensor,
    *,
    model: ModelFn | torch.nn.Module,
    vae,
    positive: torch.Tensor,
    negative: torch.Tensor,
    scale: float | None = None,
    target: tuple[int, int] | None = None,
    padding: PaddingMode = "official",
    settings: SamplerSettings | None = None,
    noise: RunNoise | int = 0,
    sample_posterior: bool = True,
    encode_tile: int | None = None,
    decode_options: DecodeOptions = DecodeOptions(),
    colour: ColourMethod = "adain",
    colour_strength: float = 1.0,
    device: torch.device | str | None = None,
    callback: ProgressCallback | None = None,
) -> torch.Tensor:
    """
    Upscales an in-memory video with STAR: prepare → encode → sample → decode → crop → colour fix.

    Parameters:
        frames (`torch.Tensor`): LR video [T,H,W,3] in 0..1.
        model (`Callable` or `torch.nn.Module`): the STAR network or a `model_fn`.
        vae (`star_core.vae.VideoVAE`): the video VAE.
        positive (`torch.Tensor`), negative (`torch.Tensor`): contexts, e.g. from :func:`encode_prompts`.
        scale (`float`, *optional*), target (`tuple[int, int]`, *optional*): exactly one of them.
        padding (`str`): `"official"` or `"minimal"`.
        settings (`SamplerSettings`, *optional*): sampler settings (official fast mode by default).
        noise (`RunNoise` or `int`): a seed or a prepared RunNoise.
        sample_posterior (`bool`): VAE posterior sample (official) or mean.
        encode_tile (`int`, *optional*): spatial encoder tile in pixels.
        decode_options (`DecodeOptions`): temporal windows / spatial tiles of the decoder.
        colour (`str`), colour_strength (`float`): see :func:`colour_fix`.
        device (`torch.device`, *optional*): where sampling runs (default: the model's device, else CPU).
        callback (`Callable`, *optional*): `callback(stage, done, total)` for "encode", "sample", "decode".

    Returns:
        `torch.Tensor`: [T,H_target,W_target,3] float32 in 0..1 on CPU.
    """
    noise = RunNoise(noise) if isinstance(noise, int) else noise
    pixels, geometry = prepare_lr(frames, scale=scale, target=target, padding=padding)
    latent = encode_lr(vae, pixels, geometry, noise, sample=sample_posterior, tile=encode_tile, callback=callback)
    del pixels
    if device is None:
        device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else latent.device
    latent = sample(model, latent.to(device), positive, negative, settings, noise, callback=callback)
    out = torch.empty(geometry.frames, *geometry.target_size, 3)
    start = 0
    for window in decode(vae, latent, geometry, decode_options, callback=callback):
        count = window.shape[0]
        out[start:start + count] = colour_fix(window, frames[start:start + count], colour, colour_strength).cpu()
        start += count
    return out
