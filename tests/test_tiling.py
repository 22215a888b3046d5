"""Span plans and feather weights (star_core.tiling)."""
from __future__ import annotations

import pytest
import torch

from star_core.tiling import feather_weights, plan_spans, validate_tile


@pytest.mark.parametrize("length, size, expected", [
    (5, 3, [(0, 3), (3, 5)]),  # the official 3-frame decode of the VAE fixture: chunks 3 + 2
    (1, 3, [(0, 1)]),
    (6, 3, [(0, 3), (3, 6)]),
    (7, 3, [(0, 3), (3, 6), (6, 7)]),
])
def test_plan_without_overlap_is_official_chunking(length: int, size: int, expected: list) -> None:
    assert plan_spans(length, size, 0) == expected


@pytest.mark.parametrize("length, size, overlap", [(10, 4, 2), (100, 32, 8), (7, 4, 1), (33, 16, 4), (17, 16, 15)])
def test_overlapping_plan_covers_axis_with_full_windows(length: int, size: int, overlap: int) -> None:
    spans = plan_spans(length, size, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(stop - start == size for start, stop in spans)
    assert all(prev[1] - nxt[0] >= overlap for prev, nxt in zip(spans, spans[1:]))
    assert all(nxt[0] > prev[0] for prev, nxt in zip(spans, spans[1:]))


def test_overlapping_plan_examples() -> None:
    assert plan_spans(10, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert plan_spans(12, 16, 4) == [(0, 12)]  # a window larger than the axis is clipped to it


@pytest.mark.parametrize("length, size, overlap", [(0, 3, 0), (5, 0, 0), (5, 3, 3), (5, 3, -1)])
def test_plan_rejects_bad_arguments(length: int, size: int, overlap: int) -> None:
    with pytest.raises(ValueError, match="plan_spans"):
        plan_spans(length, size, overlap)


@pytest.mark.parametrize("length, size, overlap", [(10, 4, 2), (100, 32, 8), (7, 4, 1), (5, 3, 0), (40, 16, 15)])
def test_feather_weights_are_a_positive_partition_of_unity(length: int, size: int, overlap: int) -> None:
    spans = plan_spans(length, size, overlap)
    weights = feather_weights(spans, length)
    total = torch.zeros(length)
    for (start, stop), weight in zip(spans, weights):
        assert weight.shape == (stop - start,)
        assert bool((weight > 0).all())
        total[start:stop] += weight
    torch.testing.assert_close(total, torch.ones(length), rtol=0, atol=1e-6)
    # the image/clip borders belong to one window only, with full weight
    assert weights[0][0].item() == 1.0 and weights[-1][-1].item() == 1.0


def test_feather_ramp_is_linear_across_the_overlap() -> None:
    weights = feather_weights([(0, 4), (2, 6)], 6)
    torch.testing.assert_close(weights[0], torch.tensor([1.0, 1.0, 0.75, 0.25]))
    torch.testing.assert_close(weights[1], torch.tensor([0.25, 0.75, 1.0, 1.0]))


def test_feather_weights_reject_gaps() -> None:
    with pytest.raises(ValueError, match="do not cover"):
        feather_weights([(0, 2), (3, 5)], 5)


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
