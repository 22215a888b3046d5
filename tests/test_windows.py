"""The one window/blend module (star_core.windows): plans, weights, streaming blend, grids of tiles."""
from __future__ import annotations

import pytest
import torch

from star_core.vae.base import validate_tile
from star_core.windows import Grid, plan_tiles, plan_windows


@pytest.mark.parametrize("length, size, expected", [
    (5, 3, [(0, 3), (3, 5)]),  # the official 3-frame decode of the VAE fixture: chunks 3 + 2
    (1, 3, [(0, 1)]),
    (6, 3, [(0, 3), (3, 6)]),
    (7, 3, [(0, 3), (3, 6), (6, 7)]),
])
def test_cut_plan_is_official_chunking(length: int, size: int, expected: list) -> None:
    plan = plan_windows(length, size, 0, "cut")
    assert list(plan.spans) == expected
    assert all(bool((w == 1).all()) for w in plan.weights)


@pytest.mark.parametrize("fusion", ["linear", "hann"])
@pytest.mark.parametrize("length, size, overlap", [(10, 4, 2), (100, 32, 8), (7, 4, 1), (33, 16, 4), (17, 16, 15)])
def test_overlapping_plan_covers_axis_with_full_windows(length: int, size: int, overlap: int, fusion: str) -> None:
    spans = plan_windows(length, size, overlap, fusion).spans
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(stop - start == size for start, stop in spans)
    assert all(prev[1] - nxt[0] >= overlap for prev, nxt in zip(spans, spans[1:]))
    assert all(nxt[0] > prev[0] for prev, nxt in zip(spans, spans[1:]))


def test_overlapping_plan_examples() -> None:
    assert plan_windows(10, 4, 2).spans == ((0, 4), (2, 6), (4, 8), (6, 10))
    assert plan_windows(12, 16, 4).spans == ((0, 12),)  # a window larger than the axis is clipped to it


@pytest.mark.parametrize("length, size, overlap, fusion, message", [
    (0, 3, 0, "cut", "length must be an integer >= 1"), (5, 0, 0, "cut", "window size must be an integer >= 1"),
    (5, 3, 3, "linear", r"overlap must be an integer in \[0, 3\)"), (5, 3, -1, "hann", "overlap must be"),
    (5, 3, 1, "cut", "'cut' windows do not overlap"), (10, 4, 1, "official", "always overlaps by 2"),
    (5, 3, 0, "cubic", "fusion must be one of"),
])
def test_plan_rejects_bad_arguments(length: int, size: int, overlap: int, fusion: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_windows(length, size, overlap, fusion)


@pytest.mark.parametrize("fusion", ["linear", "hann"])
@pytest.mark.parametrize("length, size, overlap", [(10, 4, 2), (100, 32, 8), (7, 4, 1), (40, 16, 15), (9, 4, 0)])
def test_weights_never_vanish_and_normalise_to_one(length: int, size: int, overlap: int, fusion: str) -> None:
    plan = plan_windows(length, size, overlap, fusion)
    for weight in plan.weights:
        assert bool((weight > 0).all())  # also at a window's first and last element
    normalised = torch.zeros(length)
    total = plan.weight_sum()
    for (start, stop), weight in zip(plan.spans, plan.weights):
        normalised[start:stop] += weight / total[start:stop]
    torch.testing.assert_close(normalised, torch.ones(length), rtol=0, atol=1e-6)
    # the axis ends belong to one window only, with full weight
    assert plan.weights[0][0].item() == 1.0 and plan.weights[-1][-1].item() == 1.0


def test_linear_ramp_across_an_overlap() -> None:
    plan = plan_windows(6, 4, 2, "linear")
    assert plan.spans == ((0, 4), (2, 6))
    torch.testing.assert_close(plan.weights[0], torch.tensor([1.0, 1.0, 2 / 3, 1 / 3]))
    torch.testing.assert_close(plan.weights[1], torch.tensor([1 / 3, 2 / 3, 1.0, 1.0]))


@pytest.mark.parametrize("length, size, overlap, fusion", [
    (23, 8, None, "linear"), (23, 8, 5, "hann"), (10, 4, None, "official"), (40, 32, None, "official"),
    (7, 3, 0, "cut"), (5, 8, 2, "linear"),
])
def test_streaming_blend_equals_the_whole_blend(length: int, size: int, overlap, fusion: str) -> None:
    """blend_stream (windows arrive one by one, finished positions leave at once) == accumulate + normalize."""
    plan = plan_windows(length, size, overlap, fusion)
    outputs = [torch.randn(stop - start, 3, generator=torch.Generator().manual_seed(i))
               for i, (start, stop) in enumerate(plan.spans)]
    acc = torch.zeros(length, 3)
    for index, out in enumerate(outputs):
        plan.accumulate(acc, index, out, dim=0)
    whole = plan.normalize(acc, dim=0)
    pieces = list(plan.blend_stream(iter(outputs)))
    assert torch.equal(torch.cat(pieces), whole)
    # a piece leaves as soon as no later window covers it: never more than one window's worth is held back
    starts = [0] + [sum(p.shape[0] for p in pieces[:i]) for i in range(1, len(pieces))]
    assert all(start < length for start in starts) and sum(p.shape[0] for p in pieces) == length


def test_streaming_blend_of_agreeing_windows_is_exact_where_one_window_covers() -> None:
    full = torch.randn(6, 2)
    plan = plan_windows(6, 4, 2, "linear")
    blended = torch.cat(list(plan.blend_stream(full[a:b] for a, b in plan.spans)))
    assert torch.equal(blended[:2], full[:2]) and torch.equal(blended[4:], full[4:])
    torch.testing.assert_close(blended, full, rtol=0, atol=1e-6)


def test_grid_of_tiles_reproduces_a_local_function() -> None:
    """A per-pixel function evaluated tile by tile and blended equals the whole-image result."""
    image = torch.randn(2, 3, 37, 50)
    grid = plan_tiles((37, 50), (16, 24), (4, 8), dims=(2, 3))
    assert grid.shape == (3, 3) and len(grid) == 9
    acc = torch.zeros_like(image)
    for index in grid.indices():
        grid.accumulate(acc, index, grid.slice(image, index).tanh())
    torch.testing.assert_close(grid.normalize(acc), image.tanh(), rtol=0, atol=2e-6)


def test_single_window_grid_is_bit_identical() -> None:
    x = torch.randn(1, 4, 5, 6, 7)
    grid = Grid((plan_windows(5, 8), plan_windows(6, 6), plan_windows(7, 9)), (2, 3, 4))
    assert grid.is_single()
    acc = torch.zeros_like(x)
    grid.accumulate(acc, (0, 0, 0), x * 3)
    assert torch.equal(grid.normalize(acc), x * 3)


@pytest.mark.parametrize("tile, overlap, message", [
    (100, 16, "multiple of 8"), (0, 0, "multiple of 8"), (64, 12, "overlap 12 px is invalid"),
    (64, 64, "must be smaller than the tile"), (64, -8, "overlap -8 px is invalid"),
])
def test_validate_tile_messages(tile: int, overlap: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_tile("VAE tile", tile, overlap)


def test_validate_tile_accepts_good_values() -> None:
    validate_tile("VAE tile", 512, 64)
    validate_tile("VAE tile", 8, 0)
