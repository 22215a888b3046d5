"""Pipeline composition: RunNoise (reproducible, injectable, official order) and tiny end-to-end runs."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from star_core.checkpoint import load_star_model
from star_core.frames import TensorSink, TensorSource, to_uint8
from star_core.host import HostContext
from star_core.pipeline import (
    Components, decode, decode_pixels, encode_lr, model_evaluations, prepare_lr, prepare_windows, run, upscale_video,
)
from star_core.seeds import RunNoise
from star_core.spec import DEFAULTS, DecodeSpec
from star_core.vae import SpatialTiling, load_svd_vae


def test_run_noise_reproduces_the_official_cpu_draws(fixtures_dir):
    info = json.loads((fixtures_dir / "e2e_tiny_info.json").read_text())
    with safe_open(fixtures_dir / "e2e_tiny.safetensors", "pt") as f:
        posterior = f.get_tensor("posterior_eps")
        diffuse = f.get_tensor("diffuse_eps")
        entropy = int(f.get_tensor("brownian_tree_entropy_seed").item())
    frames = posterior.shape[0]
    noise = RunNoise(info["global_seed"])
    drawn = torch.cat([noise.posterior_eps_window(0, 1, tuple(posterior.shape[1:])),
                       noise.posterior_eps_window(1, frames - 1, tuple(posterior.shape[1:]))])
    assert torch.equal(drawn, posterior)
    assert torch.equal(noise.diffuse_eps(tuple(diffuse.shape)), diffuse)
    assert noise.brownian() == entropy
    # skipping the posterior draws (e.g. the mean was used) still gives the same start noise and entropy
    skipped = RunNoise(info["global_seed"])
    assert torch.equal(skipped.diffuse_eps(tuple(diffuse.shape)), diffuse)
    assert skipped.brownian() == entropy


def test_run_noise_injection_and_order():
    posterior = torch.randn(2, 4, 3, 5)
    diffuse = torch.randn(1, 4, 2, 3, 5)
    noise = RunNoise(posterior_eps=posterior, diffuse_eps=diffuse, brownian=123)
    assert torch.equal(noise.posterior_eps(0, (1, 4, 3, 5)), posterior[:1])
    assert torch.equal(noise.posterior_eps(1, (1, 4, 3, 5)), posterior[1:])
    assert torch.equal(noise.diffuse_eps((1, 4, 2, 3, 5)), diffuse)
    assert noise.brownian() == 123
    # injection overrides one stream, the seed still supplies (and aligns) the others
    seeded, mixed = RunNoise(5), RunNoise(5, diffuse_eps=diffuse)
    assert torch.equal(mixed.diffuse_eps((1, 4, 2, 3, 5)), diffuse)
    seeded.diffuse_eps((1, 4, 2, 3, 5))
    assert mixed.brownian() == seeded.brownian()
    with pytest.raises(ValueError, match="expected frame 0"):
        RunNoise(1).posterior_eps(1, (1, 4, 3, 5))
    with pytest.raises(ValueError, match="no seed and no injected diffuse_eps"):
        RunNoise().diffuse_eps((1, 4, 2, 3, 5))
    with pytest.raises(ValueError, match="after the start noise"):
        RunNoise(1).brownian()
    with pytest.raises(ValueError, match="!= latent shape"):
        RunNoise(diffuse_eps=diffuse).diffuse_eps((1, 4, 3, 3, 5))
    with pytest.raises(ValueError, match="seed must be an integer"):
        RunNoise(-1)


def test_run_noise_seeds_differ_and_repeat():
    a, b, c = RunNoise(1), RunNoise(1), RunNoise(2)
    shape = (1, 4, 3, 2, 8)
    ea, eb, ec = a.diffuse_eps(shape), b.diffuse_eps(shape), c.diffuse_eps(shape)
    assert torch.equal(ea, eb) and not torch.equal(ea, ec)
    assert a.brownian() == b.brownian() != c.brownian()


# ---- tiny end-to-end runs (tiny UNet and VAE of the fixture set, random contexts) -------------------------------

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_parts(fixtures_dir):
    model = load_star_model(fixtures_dir / "tiny_state_dict.safetensors", dtype=torch.float32)
    vae = load_svd_vae(fixtures_dir / "vae_tiny.safetensors", config=fixtures_dir / "vae_tiny_config.json")
    g = torch.Generator().manual_seed(0)
    width = model.config.context_dim
    return Components(model, vae, torch.randn(1, 77, width, generator=g), torch.randn(1, 77, width, generator=g))


NON_OFFICIAL = {"output.scale": 2.0, "output.padding": "minimal", "sampler.mode": "normal", "sampler.steps": 2,
                "sampler.chunk_len": 3, "sampler.overlap": 1, "sampler.fusion": "hann", "decode.window": 2,
                "decode.window_overlap": 1, "decode.tile": 32, "decode.tile_overlap": 16, "seed": 7}


def test_tiny_run_non_official_options_exact_output(tiny_parts):
    """Minimal padding, odd sizes, blended chunks, overlapping decode windows and spatial tiles."""
    frames = torch.rand(5, 10, 14, 3, generator=torch.Generator().manual_seed(1))
    spec = DEFAULTS.with_options(NON_OFFICIAL)
    events = []
    out = upscale_video(frames, spec, tiny_parts, HostContext(progress=events.append))
    assert out.shape == (5, 20, 28, 3) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    samples = [e for e in events if e.stage == "sample"]
    calls = model_evaluations(spec.sampler, (1, 4, 5, 10, 8))
    assert calls == 2 * 2 * 2  # 2 steps x 2 chunks (3 frames, overlap 1, over 5) x 2 CFG passes
    assert [e.done for e in samples if e.step is None] == list(range(calls))  # before every network call
    assert [(e.step, e.steps, e.done, e.total) for e in samples if e.step is not None] == [(1, 2, 4, 8), (2, 2, 8, 8)]
    assert all(e.x0.shape == (1, 4, 5, 10, 8) for e in samples if e.step is not None)  # 20x28 padded to 80x64
    assert [e.stage for e in events if e.stage != "sample"][-1] == "decode"
    for stage in ("encode", "decode"):
        last = [e for e in events if e.stage == stage][-1]
        assert last.done == last.total > 0
    # the same seed gives the same video, another seed another one
    assert torch.equal(out, upscale_video(frames, spec, tiny_parts))
    other = upscale_video(frames, spec.with_options({"seed": 8}), tiny_parts)
    assert (other - out).abs().max() > 1e-3


def test_interrupt_stops_within_one_network_call_and_aborts_the_sink(tiny_parts):
    frames = torch.rand(3, 6, 8, 3, generator=torch.Generator().manual_seed(2))
    spec = DEFAULTS.with_options({**NON_OFFICIAL, "decode.tile": None})
    calls = []

    class Cancelled(Exception):
        pass

    def interrupt():
        if len(calls) >= 3:
            raise Cancelled

    def model_fn(x, t, context, hint):
        calls.append(1)
        return tiny_parts.model(x, t, context, hint)

    sink = TensorSink()
    parts = Components(model_fn, tiny_parts.vae, tiny_parts.positive, tiny_parts.negative)
    with pytest.raises(Cancelled):
        run(TensorSource(frames), sink, spec, parts, HostContext(interrupt=interrupt))
    assert len(calls) == 3 and sink.frames is None  # nothing was begun: the sink only opens for decoding

    decoded = []

    def interrupt_in_decode():
        if decoded:
            raise Cancelled

    class Sink(TensorSink):
        def write(self, frames):
            decoded.append(frames.shape[0])
            super().write(frames)

    sink = Sink()
    with pytest.raises(Cancelled):
        run(TensorSource(frames), sink, spec, tiny_parts, HostContext(interrupt=interrupt_in_decode))
    assert decoded == [1] and sink.frames is None  # stopped at the next tile, the sink aborted


def test_streamed_stages_match_whole_video_calls(tiny_parts):
    """encode from an iterator of windows == from a tensor; streamed blended decode == the VAE's whole decode."""
    vae = tiny_parts.vae
    frames = torch.rand(4, 9, 11, 3, generator=torch.Generator().manual_seed(2))
    pixels, geometry = prepare_lr(frames, target=(17, 23), padding="minimal", fps=24.0)
    assert geometry.target_size == (17, 23) and geometry.fps == 24.0
    whole = encode_lr(vae, pixels, geometry, RunNoise(3))
    windows = prepare_windows((frames[i:i + 3] for i in range(0, 4, 3)), geometry)
    streamed = encode_lr(vae, windows, geometry, RunNoise(3))
    assert torch.equal(whole, streamed)
    options = DecodeSpec(window=2, window_overlap=1, tile=32, tile_overlap=8)
    chunks = list(decode_pixels(vae, whole, geometry, options))
    assert [c.shape[0] for c in chunks] == [1, 1, 2]  # a frame leaves as soon as its windows are decoded
    reference = vae.decode(whole, 2, 1, tiling=SpatialTiling(32, 8))
    assert (torch.cat(chunks) - geometry.crop(reference)).abs().max() < 1e-5
    images = torch.cat(list(decode(vae, whole, geometry, options)))
    assert images.shape == (4, 17, 23, 3)


def test_one_frame_and_errors(tiny_parts):
    vae = tiny_parts.vae
    frames = torch.rand(1, 7, 9, 3, generator=torch.Generator().manual_seed(4))
    spec = DEFAULTS.with_options({"output.target": (13, 17), "output.padding": "minimal", "sampler.mode": "normal",
                                  "sampler.steps": 2, "sampler.cfg": 1.0, "colour.method": "wavelet",
                                  "colour.strength": 0.5, "seed": 1})
    out = upscale_video(frames, spec, tiny_parts)
    assert out.shape == (1, 13, 17, 3)
    pixels, geometry = prepare_lr(frames, scale=2, padding="minimal")
    with pytest.raises(ValueError, match="needs a RunNoise"):
        encode_lr(vae, pixels, geometry)
    with pytest.raises(ValueError, match="got 1 frames, the geometry says 2"):
        encode_lr(vae, pixels, dataclasses.replace(geometry, frames=2), sample=False)
    with pytest.raises(ValueError, match=r"\[T,H,W,3\]"):
        prepare_lr(torch.rand(1, 3, 7, 9), scale=2)
    with pytest.raises(ValueError, match="does not match its geometry"):
        list(decode(vae, torch.zeros(1, 4, 2, 2, 8), geometry))


def test_uint8_truncates_like_the_official_writer():
    frames = torch.tensor([0.0, 0.999 / 255, 1.999 / 255, 0.5, 1.0, 1.5, -0.2]).view(1, 1, 7, 1)
    assert to_uint8(frames).flatten().tolist() == [0, 0, 1, 127, 255, 255, 0]
