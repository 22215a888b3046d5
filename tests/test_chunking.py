"""Temporal chunk plans (official windows, the crash-free replacement, cross-fade windows) and fusion weights."""
from __future__ import annotations

import json
import math

import pytest
import torch

from star_core.diffusion.chunking import FUSIONS, plan_chunks
from star_core.windows import official_overlap, official_spans

LENGTHS = [1, 2, 3, 4, 5, 8, 12, 16, 32]


def _assert_valid(plan, frames):
    covered = torch.zeros(frames, dtype=torch.bool)
    previous = (-1, -1)
    for (start, end), weight in zip(plan.spans, plan.weights):
        assert 0 <= start < end <= frames
        assert start > previous[0] and end > previous[1]
        assert weight.shape == (end - start,) and bool((weight >= 0).all())
        covered[start:end] = True
        previous = (start, end)
    assert plan.spans[0][0] == 0 and plan.spans[-1][1] == frames and bool(covered.all())
    assert bool((plan.weight_sum() > 0).all())


def test_official_windows_match_make_chunks(fixtures_dir):
    cases = json.loads((fixtures_dir / "pipeline_helpers.json").read_text())["make_chunks"]
    assert len(cases) >= 5
    for name, expected in cases.items():
        frames, length = (int(part[1:]) for part in name.split("_"))
        assert official_spans(frames, length) == [tuple(w) for w in expected], name
        plan = plan_chunks(frames, length, fusion="official")
        if frames > 1.25 * length:
            assert plan.spans == tuple(tuple(w) for w in expected), name
        else:  # the official stitching crashes on its single window here: two windows of at most L frames
            assert len(plan.spans) == 2 and all(e - s <= length for s, e in plan.spans), name


@pytest.mark.parametrize("length", LENGTHS)
def test_official_plan_for_every_frame_count(length):
    stride = length - official_overlap(length)
    for frames in range(1, 201):
        plan = plan_chunks(frames, length, fusion="official")
        _assert_valid(plan, frames)
        # hard cuts: every frame comes from exactly one window, unscaled
        assert all(set(w.unique().tolist()) <= {0.0, 1.0} for w in plan.weights)
        assert torch.equal(plan.weight_sum(), torch.ones(frames))
        if frames <= length:
            assert plan.spans == ((0, frames),)
        elif frames > 1.25 * length:
            starts = [s for s, _ in plan.spans]
            assert starts == [k * stride for k in range(len(starts))]
            assert all(e - s == length for s, e in plan.spans[:-1])
            assert all(s + 1.25 * length < frames for s in starts[:-1]) and starts[-1] + 1.25 * length >= frames
        else:
            assert plan.spans == ((0, length), (stride, frames))


@pytest.mark.parametrize("fusion", ["linear", "hann"])
@pytest.mark.parametrize("length,overlap", [(1, 0), (4, 1), (5, 2), (8, None), (12, 6), (16, 0), (32, None), (32, 20)])
def test_crossfade_plan_for_every_frame_count(fusion, length, overlap):
    wanted = length // 4 if overlap is None else overlap
    for frames in range(1, 201):
        plan = plan_chunks(frames, length, overlap, fusion)
        _assert_valid(plan, frames)
        if frames <= length:
            assert plan.spans == ((0, frames),)
            continue
        assert all(e - s == length for s, e in plan.spans)
        gaps = [a[1] - b[0] for a, b in zip(plan.spans, plan.spans[1:])]
        assert min(gaps) >= wanted
        assert len(plan.spans) == math.ceil((frames - wanted) / (length - wanted))
        for weight in plan.weights:  # never zero at a window's first or last frame
            assert weight[0] > 0 and weight[-1] > 0


def test_crossfade_ramps():
    linear = plan_chunks(7, 5, overlap=3, fusion="linear")
    assert linear.spans == ((0, 5), (2, 7))
    assert torch.allclose(linear.weights[1], torch.tensor([0.25, 0.5, 0.75, 1.0, 1.0]))
    assert torch.allclose(linear.weights[0], torch.tensor([1.0, 1.0, 0.75, 0.5, 0.25]))
    hann = plan_chunks(7, 5, overlap=3, fusion="hann")
    ramp = torch.sin(torch.tensor([1.0, 2.0, 3.0]) * math.pi / 8) ** 2
    assert torch.allclose(hann.weights[1][:3], ramp) and torch.allclose(hann.weights[0][2:], 1 - ramp)
    assert torch.allclose(hann.weight_sum(), torch.ones(7))


def test_official_fusion_is_the_hard_cut_stitch():
    frames, length = 10, 4
    plan = plan_chunks(frames, length, fusion="official")
    generator = torch.Generator().manual_seed(0)
    chunks = [torch.randn(1, 4, e - s, 3, 2, generator=generator) for s, e in plan.spans]
    acc = torch.zeros(1, 4, frames, 3, 2)
    for index, chunk in enumerate(chunks):
        plan.accumulate(acc, index, chunk, dim=2)
    fused = plan.normalize(acc, dim=2)
    overlap = plan.spans[0][1] - plan.spans[1][0]
    cut = overlap // 2
    pieces = [chunks[0][:, :, :length + cut - overlap]]
    pieces += [c[:, :, cut:c.shape[2] + cut - overlap] for c in chunks[1:-1]]
    pieces += [chunks[-1][:, :, cut:]]
    assert torch.equal(fused, torch.cat(pieces, dim=2))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_fusion_reproduces_agreeing_chunks(fusion):
    frames = 23
    plan = plan_chunks(frames, 8, fusion=fusion)
    full = torch.randn(1, 4, frames, 2, 3, generator=torch.Generator().manual_seed(1))
    acc = torch.zeros_like(full)
    for index, (start, end) in enumerate(plan.spans):
        plan.accumulate(acc, index, full[:, :, start:end], dim=2)
    assert (plan.normalize(acc, dim=2) - full).abs().max().item() <= 1e-6


def test_bad_plans_raise():
    with pytest.raises(ValueError, match="fusion must be one of"):
        plan_chunks(10, 4, fusion="cubic")
    with pytest.raises(ValueError, match="overlap must be an integer in"):
        plan_chunks(10, 4, overlap=4, fusion="linear")
    with pytest.raises(ValueError, match="official plan always overlaps by 2"):
        plan_chunks(10, 4, overlap=1, fusion="official")
    with pytest.raises(ValueError, match="frames must be a positive integer"):
        plan_chunks(0, 4)
    with pytest.raises(ValueError, match="chunk_len must be a positive integer"):
        plan_chunks(10, 0)
