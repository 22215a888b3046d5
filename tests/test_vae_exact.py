"""Exact tiled SVD VAE: tiled encode moments and window decode equal the untiled network (max |Δ| <= 1e-4)."""
from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from star_core.tiny_models import svd_vae_weights
from star_core.vae import SpatialTiling, SVDVideoVAE, build_vae, load_svd_vae
from star_core.vae import exact
from star_core.vae.exact import (Attend, TileGrid, UnsupportedLayer, decoder_program, encoder_program,
                                 parking_cost, run_exact)

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 1e-4  # fp32, max abs on [-1, 1] frames / latent moments


@pytest.fixture(scope="module")
def fixture_vae(fixtures_dir: Path) -> SVDVideoVAE:
    """The official tiny VAE (1 layer per block: the encoder has a mid-block attention, the decoder none)."""
    return load_svd_vae(fixtures_dir / "vae_tiny.safetensors", config=fixtures_dir / "vae_tiny_config.json")


@pytest.fixture(scope="module")
def deep_vae() -> SVDVideoVAE:
    """A narrow random SVD VAE with the released depth (2 layers per block: decoder mid-block attention too)."""
    return SVDVideoVAE(build_vae(svd_vae_weights((32, 32, 64, 64), 2, seed=3)))


@pytest.fixture(scope="module", params=["fixture", "deep"])
def vae(request: pytest.FixtureRequest, fixture_vae: SVDVideoVAE, deep_vae: SVDVideoVAE) -> SVDVideoVAE:
    return fixture_vae if request.param == "fixture" else deep_vae


def _frames(height: int, width: int, count: int = 1, seed: int = 0) -> torch.Tensor:
    """Non-stationary content (a gradient plus noise), so that tiles' own statistics differ from the frame's."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-0.8, 0.8, width)[None, None, None, :] * torch.tensor([1.0, -0.5, 0.2])[None, :, None, None]
    return (ramp + 0.4 * torch.rand(count, 3, height, width, generator=g) - 0.2).clamp(-1, 1)


def _latent(height: int, width: int, frames: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-1.0, 1.0, height)[:, None]
    return 0.2 * (torch.randn(1, 4, frames, height, width, generator=g) + ramp)


# (frame height, frame width, tile px): tiles in rows x columns on the latent grid
LAYOUTS = {
    "2x2": (64, 64, 32),  # latent 8x8, tiles 4
    "3x2 uneven": (80, 56, 32),  # latent 10x7: rows 4+4+2, columns 4+3
    "tiles smaller than the halo": (32, 40, 8),  # 1 latent px per tile (4x5 tiles), far below the receptive field
    "1 px wider": (65, 97, 32),  # edge-padded to 72x104, latent 9x13: last row and column of tiles 1 px wide
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_exact_encode_equals_untiled(vae: SVDVideoVAE, layout: str) -> None:
    height, width, tile = LAYOUTS[layout]
    frames = _frames(height, width, count=2)
    mean, std = vae.posterior(frames)
    calls = []
    tiled_mean, tiled_std = vae.posterior(frames, tiling=SpatialTiling(tile, 0),
                                          callback=lambda done, total: calls.append((done, total)))
    assert tiled_mean.shape == mean.shape == (2, 4, -(-height // 8), -(-width // 8))
    assert (tiled_mean - mean).abs().max() <= TOLERANCE
    assert (tiled_std - std).abs().max() <= TOLERANCE
    grid = TileGrid.plan(mean.shape[2], mean.shape[3], tile // 8)
    total = 2 * encoder_program(vae.model).sweeps * len(grid)  # frames x sweeps x tiles
    assert calls == [(done, total) for done in range(1, total + 1)]
    # the layout does exercise cross-tile layers: independent tiles are far off
    fast = vae.posterior(frames, tiling=SpatialTiling(tile, 0, "fast"))[0]
    assert (fast - mean).abs().max() > 100 * TOLERANCE


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_exact_decode_equals_untiled(vae: SVDVideoVAE, layout: str) -> None:
    height, width, tile = LAYOUTS[layout]
    latent = _latent(-(-height // 8), -(-width // 8))
    reference = vae.decode(latent)  # one official window of 3 frames
    calls = []
    tiled = vae.decode(latent, tiling=SpatialTiling(tile, 0), callback=lambda done, total: calls.append(total))
    assert tiled.shape == reference.shape == (3, 3, latent.shape[3] * 8, latent.shape[4] * 8)
    assert (tiled - reference).abs().max() <= TOLERANCE
    grid = TileGrid.plan(latent.shape[3], latent.shape[4], tile // 8)
    assert len(calls) == calls[-1] == decoder_program(vae.model).sweeps * len(grid)
    fast = vae.decode(latent, tiling=SpatialTiling(tile, 0, "fast"))
    assert (fast - reference).abs().max() > 100 * TOLERANCE


def test_decoder_with_attention_is_covered(fixture_vae: SVDVideoVAE, deep_vae: SVDVideoVAE) -> None:
    """The released VAE's decoder has a mid-block attention; the 1-layer fixture's has none."""
    assert sum(isinstance(step, Attend) for step in decoder_program(deep_vae.model).steps) == 1
    assert not any(isinstance(step, Attend) for step in decoder_program(fixture_vae.model).steps)
    assert sum(isinstance(step, Attend) for step in encoder_program(fixture_vae.model).steps) == 1


def test_exact_decode_windows_and_overlap(deep_vae: SVDVideoVAE) -> None:
    """Several temporal windows (last one shorter) and blended overlapping windows, tiled exactly."""
    latent = _latent(6, 5, frames=5)
    for window, overlap in ((3, 0), (3, 1)):
        reference = deep_vae.decode(latent, window, overlap)
        tiled = deep_vae.decode(latent, window, overlap, tiling=SpatialTiling(24, 8))
        assert tiled.shape == (5, 3, 48, 40)
        assert (tiled - reference).abs().max() <= TOLERANCE


def test_single_tile_is_the_untiled_network(fixture_vae: SVDVideoVAE) -> None:
    frames, latent = _frames(40, 48), _latent(5, 6)
    tiling = SpatialTiling(48, 0)
    assert torch.equal(fixture_vae.posterior(frames, tiling=tiling)[0], fixture_vae.posterior(frames)[0])
    assert torch.equal(fixture_vae.decode(latent, tiling=tiling), fixture_vae.decode(latent))


def test_executor_on_one_tile_matches_diffusers(deep_vae: SVDVideoVAE) -> None:
    """The re-expressed layers themselves (one tile, so no cross-tile reduction) against diffusers' forward."""
    model = deep_vae.model
    frames, z = _frames(24, 32), _latent(3, 4)[0].transpose(0, 1)
    with torch.no_grad():
        moments = model.quant_conv(model.encoder(frames))
        decoded = model.decode(z, num_frames=3).sample
        grid = TileGrid.plan(3, 4, 4)
        assert len(grid) == 1
        torch.testing.assert_close(run_exact(encoder_program(model), frames, grid, device="cpu"), moments,
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(run_exact(decoder_program(model), z, grid, device="cpu"), decoded,
                                   rtol=0, atol=1e-5)


def test_tile_grid() -> None:
    grid = TileGrid.plan(10, 7, 4)
    assert grid.rows == ((0, 4), (4, 8), (8, 10)) and grid.cols == ((0, 4), (4, 7)) and len(grid) == 6
    assert grid.cores(8)[-1] == ((64, 80), (32, 56))


def test_interrupt_aborts_between_tiles(fixture_vae: SVDVideoVAE) -> None:
    class Stop(Exception):
        pass

    def stop(done: int, total: int) -> None:
        if done == 5:
            raise Stop(f"{done}/{total}")

    with pytest.raises(Stop, match="5/"):
        fixture_vae.decode(_latent(8, 8), tiling=SpatialTiling(32, 0), callback=stop)
    with pytest.raises(Stop, match="5/"):
        fixture_vae.posterior(_frames(64, 64), tiling=SpatialTiling(32, 0), callback=stop)


def test_options_and_unsupported_layers(deep_vae: SVDVideoVAE) -> None:
    assert SpatialTiling(64, 0).mode == "exact" and SpatialTiling(64, 0).park == "auto"  # exact is the default
    assert SpatialTiling(8, 32).overlap == 32  # exact tiles ignore the overlap (fast ones need it below the tile)
    with pytest.raises(ValueError, match="smaller than the tile"):
        SpatialTiling(8, 32, "fast")
    with pytest.raises(ValueError, match="multiple of 8"):
        SpatialTiling(12, 0)
    with pytest.raises(ValueError, match="mode 'blend' is invalid: use 'exact'"):
        SpatialTiling(64, 0, mode="blend")
    with pytest.raises(ValueError, match="park='gpu' is invalid: use 'auto', 'device' or 'host'"):
        SpatialTiling(64, 0, park="gpu")
    latent = _latent(4, 4)
    assert torch.equal(deep_vae.decode(latent, tiling=SpatialTiling(16, 0, park="host")),
                       deep_vae.decode(latent, tiling=SpatialTiling(16, 0, park="device")))  # both the CPU here
    model = build_vae(svd_vae_weights((32, 32), 1, seed=0))
    model.encoder.conv_act = nn.GELU()
    with pytest.raises(UnsupportedLayer, match="GELU.*mode='fast'"):
        encoder_program(model)


def test_parking_cost_matches_the_buffers_of_a_run(deep_vae: SVDVideoVAE, monkeypatch: pytest.MonkeyPatch) -> None:
    """`parking_cost` (geometry only) against the buffers a real run allocates and frees."""
    live, peak = [0], [0]
    allocate = exact._Parking.empty

    def tracked(self, shape, dtype):
        buffer = allocate(self, shape, dtype)
        live[0] += buffer.nbytes
        peak[0] = max(peak[0], live[0])
        weakref.finalize(buffer, lambda n=buffer.nbytes: live.__setitem__(0, live[0] - n))
        return buffer

    monkeypatch.setattr(exact._Parking, "empty", tracked)
    program, z = decoder_program(deep_vae.model), _latent(5, 6)[0].transpose(0, 1)
    grid = TileGrid.plan(5, 6, 2)
    with torch.no_grad():
        output = run_exact(program, z, grid, device="cpu")
    cost = parking_cost(program, grid, frames=3)
    assert cost.parked_peak == peak[0]  # (at full resolution, long after the caller's input was last read)
    assert live[0] == output.nbytes  # everything else was freed after its last use
    whole = parking_cost(program, TileGrid.plan(5, 6, 6), frames=3)
    assert whole.parked_peak == cost.parked_peak  # parking does not depend on the tiles
    assert whole.traffic < cost.traffic < 1.6 * whole.traffic  # halos: each tile re-reads a thin border
    assert whole.keys_values == cost.keys_values == 3 * 30 * 2 * 64 * 4  # frames x tokens x (k, v) x width x fp32
    assert parking_cost(program, grid, frames=3, itemsize=2).traffic * 2 == cost.traffic


def test_exact_tiles_under_low_precision_autocast(fixtures_dir: Path, fixture_vae: SVDVideoVAE) -> None:
    """Under bf16 autocast (the GPU decode's mode) the exact tiles park bf16 activations and normalise in fp32,
    like torch's autocast GroupNorm: they stay within bf16 rounding of the untiled autocast decode."""
    vae = load_svd_vae(fixtures_dir / "vae_tiny.safetensors", config=fixtures_dir / "vae_tiny_config.json",
                       decode_autocast=torch.bfloat16)
    latent = _latent(4, 6, frames=2)
    untiled, tiled = vae.decode(latent), vae.decode(latent, tiling=SpatialTiling(16, 0))
    assert tiled.dtype == torch.float32
    reference = fixture_vae.decode(latent)
    assert (untiled - reference).abs().max() > 1e-3  # autocast did run in bf16
    assert (tiled - untiled).abs().max() < 0.1 and (tiled - reference).abs().max() < 0.1
