"""Spatially tiled diffusion: tiles obey the network's size rule, one tile is the untiled run bit for bit, a
spatially local model gives the untiled result, and progress/Cancel act per tile evaluation."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from star_core import cli
from star_core.diffusion import SamplerSettings, sample_star
from star_core.diffusion.star_sampling import network_levels, plan_evaluations, tile_cells
from star_core.model.unet import check_latent_size, latent_size_fits
from star_core.pipeline import model_evaluations, model_function

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model(fixtures_dir):
    from star_core.checkpoint import load_star_model

    return load_star_model(fixtures_dir / "tiny_state_dict.safetensors", dtype=torch.float32).eval()


def _inputs(shape, context_width, seed=0):
    g = torch.Generator().manual_seed(seed)
    lr, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return lr, noise, torch.randn(1, 77, context_width, generator=g), torch.randn(1, 77, context_width, generator=g)


class LocalModel:
    """A spatially pointwise stand-in for the network (mixes frames, hint, context and t), recording its calls."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, x, t, context, hint):
        self.shapes.append(tuple(x.shape))
        scale = (t.float() / 1000).view(-1, 1, 1, 1, 1)
        ctx = context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        return torch.tanh(0.7 * x + 0.3 * hint * scale + ctx) + 0.1 * x.roll(1, dims=2)


@pytest.mark.parametrize("levels, shape", [(4, (90, 160)), (4, (66, 120)), (3, (10, 16)), (3, (30, 44))])
@pytest.mark.parametrize("tile", [(64, 64), (128, 256), (264, 200), (512, 512)])
def test_tiles_obey_the_size_rule_and_cover_with_positive_weights(levels, shape, tile):
    settings = SamplerSettings(tile=tile, tile_blend="hann")
    grid = plan_evaluations((1, 4, 5, *shape), settings, levels)
    assert grid.dims == (2, 3, 4)
    for axis, plan, length, name in zip("hw", grid.axes[1:], shape, ("h", "w")):
        sizes = {stop - start for start, stop in plan.spans}
        assert all(latent_size_fits(size, levels, name) for size in sizes), (name, sizes)
        assert plan.spans[0][0] == 0 and plan.spans[-1][1] == length
        assert all(b[0] < a[1] for a, b in zip(plan.spans, plan.spans[1:]))  # neighbours overlap
        assert all(bool((w > 0).all()) for w in plan.weights)  # never zero inside the frame
        requested = tile[0 if name == "h" else 1] // 8
        if len(plan) > 1:  # the largest accepted size within the request (or the smallest accepted one)
            size = sizes.pop()
            assert size <= requested or not any(latent_size_fits(s, levels, name) for s in range(1, requested + 1))
            assert not any(latent_size_fits(s, levels, name) for s in range(size + 1, requested + 1))
    for index in grid.indices():
        (_, _), (r0, r1), (c0, c1) = grid.spans(index)
        check_latent_size(r1 - r0, c1 - c0, levels)


def test_tile_cells_snaps_down_to_the_network_rule():
    assert tile_cells(512, 90, 4, "h") == 58 and tile_cells(512, 160, 4, "w") == 64  # 58 ≡ 2 (mod 8)
    assert tile_cells(520, 160, 4, "w") == 64 and tile_cells(600, 160, 4, "w") == 72
    assert tile_cells(8, 90, 4, "h") == 2 and tile_cells(8, 160, 4, "w") == 8  # smallest accepted sizes
    assert tile_cells(800, 90, 4, "h") == 90  # the whole axis
    assert tile_cells(100, 30, None, "h") == 12  # no size rule: any size
    assert tile_cells(48, 10, 3, "h") == 6 and tile_cells(32, 16, 3, "w") == 4  # the tiny 3-level network


def test_plan_is_chunks_times_tiles_chunk_major():
    settings = SamplerSettings(chunk_len=4, overlap=1, tile=(48, 64), tile_overlap=16)
    grid = plan_evaluations((1, 4, 7, 10, 16), settings, 3)
    assert grid.shape == (2, 2, 3)
    assert list(grid.indices())[:4] == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0)]
    assert grid.axes[1].spans == ((0, 6), (4, 10)) and grid.axes[2].spans == ((0, 8), (4, 12), (8, 16))
    assert model_evaluations(settings, (1, 4, 7, 10, 16), 3) == 14 * 12 * 2
    untiled = plan_evaluations((1, 4, 7, 10, 16), dataclasses.replace(settings, tile=None), 3)
    assert untiled.shape == (2, 1, 1)


def test_one_tile_is_the_untiled_run_bit_for_bit(tiny_model):
    lr, noise, positive, negative = _inputs((1, 4, 3, 10, 16), tiny_model.config.context_dim)
    base = SamplerSettings(mode="normal", steps=2)
    untiled = sample_star(tiny_model, lr, positive, negative, base, start_noise=noise, brownian=4)
    for tile in ((80, 128), (4096, 4096), (80, 4096)):
        tiled = sample_star(tiny_model, lr, positive, negative, dataclasses.replace(base, tile=tile),
                            start_noise=noise, brownian=4)
        assert torch.equal(tiled, untiled), tile
    # with temporal chunks: one tile per chunk is the chunked run bit for bit
    chunked = dataclasses.replace(base, chunk_len=2, overlap=1)
    a = sample_star(tiny_model, lr, positive, negative, chunked, start_noise=noise, brownian=4)
    b = sample_star(tiny_model, lr, positive, negative, dataclasses.replace(chunked, tile=(80, 128)),
                    start_noise=noise, brownian=4)
    assert torch.equal(a, b)


def test_tiles_of_a_real_network_are_valid_and_differ_a_little(tiny_model):
    lr, noise, positive, negative = _inputs((1, 4, 2, 10, 16), tiny_model.config.context_dim, seed=1)
    model_fn = model_function(tiny_model)
    assert network_levels(model_fn) == network_levels(tiny_model) == 3
    shapes = []

    def recording(x, t, context, hint):
        shapes.append(tuple(x.shape[3:]))
        return model_fn(x, t, context, hint)

    recording.config = tiny_model.config
    base = SamplerSettings(mode="normal", steps=2)
    untiled = sample_star(model_fn, lr, positive, negative, base, start_noise=noise, brownian=2)
    tiled = sample_star(recording, lr, positive, negative, dataclasses.replace(base, tile=(48, 96), tile_overlap=16),
                        start_noise=noise, brownian=2)
    assert sorted(set(shapes)) == [(6, 12)] and len(shapes) == 2 * 4 * 2  # steps x 2x2 tiles x CFG passes
    difference = (tiled - untiled).abs().max().item()
    assert torch.isfinite(tiled).all() and 0 < difference < 10 * untiled.abs().max().item()


@pytest.mark.parametrize("batch_cfg", [False, True])
@pytest.mark.parametrize("cfg", [7.5, 1.0])
def test_local_model_tiled_equals_untiled(cfg, batch_cfg):
    """Blending each tile's positive and negative predictions and guiding the whole chunk (CFG rescale std per
    chunk) reproduces the untiled run for a model that looks at one position at a time; each tile gets its own
    slice of the hint."""
    lr, noise, positive, negative = _inputs((1, 4, 6, 14, 20), 16, seed=2)
    base = SamplerSettings(mode="normal", steps=4, cfg=cfg, batch_cfg=batch_cfg, chunk_len=4, overlap=2)
    untiled = sample_star(LocalModel(), lr, positive, negative, base, start_noise=noise, brownian=3)
    model = LocalModel()
    tiled = sample_star(model, lr, positive, negative,
                        dataclasses.replace(base, tile=(48, 64), tile_overlap=16, tile_blend="hann"),
                        start_noise=noise, brownian=3)
    assert {shape[3:] for shape in model.shapes} == {(6, 8)}
    assert len(model.shapes) == 4 * 2 * 3 * 3 * (1 if cfg == 1 or batch_cfg else 2)
    torch.testing.assert_close(tiled, untiled, rtol=0, atol=2e-5)


def test_progress_and_cancel_per_tile_evaluation():
    lr, noise, positive, negative = _inputs((1, 4, 3, 10, 16), 16, seed=3)
    settings = SamplerSettings(mode="normal", steps=2, tile=(48, 64), tile_overlap=16)
    seen = []
    sample_star(LocalModel(), lr, positive, negative, settings, start_noise=noise, brownian=1,
                on_evaluation=lambda done, total: seen.append((done, total)))
    total = 2 * 2 * 3 * 2  # steps x rows x columns x CFG passes
    assert seen == [(k, total) for k in range(total)]

    class Cancelled(Exception):
        pass

    def cancel(done, total):
        if done == 5:
            raise Cancelled

    model = LocalModel()
    with pytest.raises(Cancelled):
        sample_star(model, lr, positive, negative, settings, start_noise=noise, brownian=1, on_evaluation=cancel)
    assert len(model.shapes) == 5  # stopped before the sixth tile evaluation


def test_tile_settings_errors_name_the_option():
    with pytest.raises(ValueError, match=r"sampler.tile must be two integers \(height, width\) in \[8, 16384\] "
                                         r"pixels, got \(4, 64\)"):
        SamplerSettings(tile=(4, 64))
    with pytest.raises(ValueError, match=r"sampler.tile_overlap \(64 px\) must be smaller than the tile \(64x512 px\)"):
        SamplerSettings(tile=(64, 512), tile_overlap=64)
    with pytest.raises(ValueError, match="sampler.tile_blend must be one of linear, hann; got 'official'"):
        SamplerSettings(tile_blend="official")
    # a tile the network rounds below the overlap
    settings = SamplerSettings(tile=(120, 512), tile_overlap=96)
    with pytest.raises(ValueError, match=r"sampler.tile_overlap \(96 px\) must be smaller than the tile height the "
                                         r"network accepts \(80 px for a tile of 120x512 px\)"):
        plan_evaluations((1, 4, 1, 90, 160), settings, 4)


def test_cli_flags(tmp_path, capsys):
    def spec(*flags):
        return cli.spec_from_args(cli.build_parser().parse_args(["upscale", "in.mp4", "-o", "out.mp4", *flags]))

    assert spec().sampler.tile == "auto"  # whole frames when they fit the memory budget (star_core.autosize)
    assert spec("--diffusion-tile", "AUTO").sampler.tile == "auto"
    tiled = spec("--diffusion-tile", "512", "--diffusion-tile-overlap", "64", "--diffusion-tile-blend", "hann")
    assert (tiled.sampler.tile, tiled.sampler.tile_overlap, tiled.sampler.tile_blend) == ((512, 512), 64, "hann")
    assert spec("--diffusion-tile", "528x1024").sampler.tile == (528, 1024)
    assert spec("--diffusion-tile", "off").sampler.tile is None
    with pytest.raises(cli.InputError, match=r"--diffusion-tile-overlap \(64 px\) must be smaller than the tile"):
        spec("--diffusion-tile", "64", "--diffusion-tile-overlap", "64")
    with pytest.raises(SystemExit):
        spec("--diffusion-tile", "big")
    assert "--diffusion-tile: must be pixels as N, HEIGHTxWIDTH" in capsys.readouterr().err


def test_pipeline_run_with_tiles(tiny_model, fixtures_dir):
    from star_core.host import HostContext
    from star_core.pipeline import Components, upscale_video
    from star_core.spec import DEFAULTS
    from star_core.vae import load_svd_vae

    vae = load_svd_vae(fixtures_dir / "vae_tiny.safetensors", config=fixtures_dir / "vae_tiny_config.json")
    g = torch.Generator().manual_seed(0)
    width = tiny_model.config.context_dim
    parts = Components(tiny_model, vae, torch.randn(1, 77, width, generator=g), torch.randn(1, 77, width, generator=g))
    frames = torch.rand(3, 10, 14, 3, generator=torch.Generator().manual_seed(1))
    spec = DEFAULTS.with_options({"output.scale": 2.0, "output.padding": "minimal", "sampler.mode": "normal",
                                  "sampler.steps": 2, "sampler.tile": (48, 32)})
    events = []
    out = upscale_video(frames, spec, parts, HostContext(progress=events.append))
    assert out.shape == (3, 20, 28, 3) and torch.isfinite(out).all()
    calls = model_evaluations(spec.sampler, (1, 4, 3, 10, 8), 3)
    assert calls == 2 * (2 * 3) * 2  # steps x (2 rows of 6 x 3 columns of 4 latent cells) x CFG passes
    assert [e.done for e in events if e.stage == "sample" and e.step is None] == list(range(calls))


def test_out_of_memory_evaluation_is_repeated_with_smaller_windows():
    """An injected OOM for windows above 40 latent cells: the evaluation is repeated with the replanned tiles and
    the run equals one planned with those tiles from the start; other errors propagate untouched."""
    from star_core.diffusion.star_sampling import Replan

    lr, noise, positive, negative = _inputs((1, 4, 3, 10, 16), 16, seed=4)
    settings = SamplerSettings(mode="normal", steps=3)
    tiled = dataclasses.replace(settings, tile=(48, 64), tile_overlap=16)

    def model(x, t, context, hint):
        if x.shape[3] * x.shape[4] > 48:
            raise torch.OutOfMemoryError("injected: window too large")
        return LocalModel()(x, t, context, hint)

    asked = []

    def smaller(grid, error):
        asked.append((grid.shape, str(error)))
        return plan_evaluations(lr.shape, tiled)

    replan = Replan(lambda error: isinstance(error, torch.OutOfMemoryError), smaller)
    seen = []
    out = sample_star(model, lr, positive, negative, settings, start_noise=noise, brownian=5, replan=replan,
                      on_evaluation=lambda done, total: seen.append((done, total)))
    assert asked == [((1, 1, 1), "injected: window too large")]  # once: the smaller plan is kept
    assert torch.equal(out, sample_star(model, lr, positive, negative, tiled, start_noise=noise, brownian=5))
    total = 3 * 6 * 2
    assert seen == [(0, 3 * 2)] + [(k, total) for k in range(total)]

    def broken(x, t, context, hint):
        raise RuntimeError("not a memory problem")

    with pytest.raises(RuntimeError, match="not a memory problem"):
        sample_star(broken, lr, positive, negative, settings, start_noise=noise, brownian=5, replan=replan)
    assert len(asked) == 1


def test_vae_tile_mode_reaches_the_vae(fixtures_dir):
    """decode.tile_mode from the spec: exact tiles give the untiled decode, fast ones differ."""
    from star_core.geometry import plan_geometry
    from star_core.pipeline import decode_pixels
    from star_core.spec import DEFAULTS
    from star_core.vae import load_svd_vae

    vae = load_svd_vae(fixtures_dir / "vae_tiny.safetensors", config=fixtures_dir / "vae_tiny_config.json")
    geometry = plan_geometry(2, 40, 32, scale=2.0, padding="minimal")
    latent = torch.randn(1, 4, 2, *geometry.latent_size, generator=torch.Generator().manual_seed(5))

    def decoded(**options):
        spec = DEFAULTS.with_options({f"decode.{k}": v for k, v in options.items()})
        return torch.cat(list(decode_pixels(vae, latent, geometry, spec.decode)))

    whole = decoded()
    exact = decoded(tile=32, tile_overlap=16)
    fast = decoded(tile=32, tile_overlap=16, tile_mode="fast")
    assert (exact - whole).abs().max().item() <= 1e-4
    assert (fast - whole).abs().max().item() > 1e-3
