"""Training data: pairing, the errors a user can hit, seeded samples, captions, the on-the-fly degradation."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch

from star_core.train.data import ClipDataset, DataSettings, SeededSampler, collate, find_pairs
from star_core.train.degrade import DegradationSettings, degrade
from star_core.video_io import write_synthetic_clip

pytestmark = pytest.mark.usefixtures("one_thread")


def _frames(folder: Path, frames: np.ndarray) -> Path:
    """Writes uint8 [T,H,W,3] frames as PNGs."""
    folder.mkdir(parents=True)
    height, width = frames.shape[1:3]
    for i, image in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        with av.open(str(folder / f"{i:04d}.png"), "w") as out:
            stream = out.add_stream("png", rate=1)
            stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
            out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
    return folder


@pytest.fixture()
def paired(tmp_path) -> tuple[Path, Path]:
    hq, lq = tmp_path / "HQ", tmp_path / "LQ"
    hq.mkdir(), lq.mkdir()
    # a: frame folders, LQ x4 smaller and the same smooth content (so crops can be checked for alignment)
    base = torch.rand(6, 3, 12, 16, generator=torch.Generator().manual_seed(0))
    big = torch.nn.functional.interpolate(base, size=(48, 64), mode="bilinear")
    as_u8 = lambda x: (x * 255).round().byte().permute(0, 2, 3, 1).numpy()  # noqa: E731
    _frames(hq / "a", as_u8(big))
    _frames(lq / "a", as_u8(base))
    # b: videos of the same size (LQ in another container)
    write_synthetic_clip(hq / "b.mp4", frames=6, width=64, height=48, audio=False)
    write_synthetic_clip(lq / "b.mkv", frames=6, width=64, height=48, audio=False)
    (hq / "b.txt").write_text("  a red car \n", encoding="utf-8")
    return hq, lq


def test_pairs_by_name_with_factor_and_caption(paired):
    pairs = find_pairs(*paired)
    assert [p.name for p in pairs] == ["a", "b"]
    assert (pairs[0].hq.frames, pairs[0].hq.height, pairs[0].hq.width) == (6, 48, 64)
    assert (pairs[0].lq.height, pairs[0].lq.width) == (12, 16) and len(pairs[0].lq.files) == 6
    assert pairs[1].lq.path.suffix == ".mkv" and pairs[0].caption is None and pairs[1].caption == "a red car"


def test_samples_are_seeded_shaped_and_aligned(paired):
    settings = DataSettings(frames=3, crop=(24, 32), frame_stride=2, null_text_ratio=0.0, default_caption="clip")
    data = ClipDataset(find_pairs(*paired), settings)
    item = data[(1, 7)]
    assert item["hq"].shape == item["lq"].shape == (3, 3, 24, 32)
    assert -1 <= item["hq"].min() and item["hq"].max() <= 1 and item["caption"] == "a red car"
    again = data[(1, 7)]
    assert torch.equal(item["hq"], again["hq"]) and torch.equal(item["lq"], again["lq"])
    assert data[(0, 7)]["caption"] == "clip"
    # the x4 pair: the LQ crop is the HQ crop's region, bilinearly resized back (same content at both sizes)
    for seed in range(4):
        a = data[(0, seed)]
        assert (a["hq"] - a["lq"]).abs().mean() < 0.08, seed
    shifted = torch.roll(a["lq"], 4, dims=-1)
    assert (a["hq"] - shifted).abs().mean() > 0.15  # a 4-pixel misalignment would be visible
    crops = {tuple(data[(1, s)]["hq"][0, 0, :2, :2].flatten().tolist()) for s in range(6)}
    assert len(crops) > 1  # windows and positions vary with the seed
    batch = collate([item, a])
    assert batch["hq"].shape == (2, 3, 3, 24, 32) and batch["caption"] == ["a red car", "clip"]
    assert sorted(data.captions()) == ["", "a red car", "clip"]


def test_null_text_ratio(paired):
    data = ClipDataset(find_pairs(*paired), DataSettings(frames=2, crop=(16, 16), null_text_ratio=0.5))
    empty = sum(data[(1, s)]["caption"] == "" for s in range(40))
    assert 10 < empty < 30
    assert all(data[(1, s)]["caption"] == "" for s in range(5)) is False


def test_bad_inputs_are_named(tmp_path, paired):
    hq, lq = paired
    with pytest.raises(FileNotFoundError, match="clip folder .*nope does not exist"):
        find_pairs(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no training clips in .*empty"):
        find_pairs(tmp_path / "empty")
    other = tmp_path / "other"
    other.mkdir()
    write_synthetic_clip(other / "z.mp4", frames=6, width=16, height=12, audio=False)
    with pytest.raises(ValueError, match=r"no HQ/LQ pairs found: no clip name is in both"):
        find_pairs(hq, other)
    write_synthetic_clip(other / "a.mp4", frames=6, width=16, height=12, audio=False)
    with pytest.raises(ValueError, match=r"1 HQ clips have no LQ clip of the same name .*\['b'\]"):
        find_pairs(hq, other)
    write_synthetic_clip(other / "b.mp4", frames=5, width=16, height=12, audio=False)
    with pytest.raises(ValueError, match=r"HQ/LQ length mismatch: .*b\.mp4 has 6 frames but .*b\.mp4 has 5"):
        find_pairs(hq, other)
    (other / "b.mp4").unlink()
    write_synthetic_clip(other / "b.mp4", frames=6, width=20, height=12, audio=False)
    with pytest.raises(ValueError, match=r"HQ/LQ size mismatch: .* is 64x48 but .* is 20x12; .*16x12 for x4"):
        find_pairs(hq, other)
    pairs = find_pairs(hq, lq)
    with pytest.raises(ValueError, match=r"has 6 frames, fewer than the 7 a sample needs .*lower --frames"):
        ClipDataset(pairs, DataSettings(frames=4, frame_stride=2, crop=(16, 16)))
    with pytest.raises(ValueError, match=r"is 64x48, smaller than the crop 96x48"):
        ClipDataset(pairs, DataSettings(frames=2, crop=(48, 96)))
    three_hq, three_lq = tmp_path / "x3" / "HQ", tmp_path / "x3" / "LQ"
    _frames(three_hq / "c", np.zeros((2, 48, 48, 3), np.uint8))
    _frames(three_lq / "c", np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match=r"crop 16x16 is not divisible by the LQ factor 3 of c; .* by 24"):
        ClipDataset(find_pairs(three_hq, three_lq), DataSettings(frames=2, crop=(16, 16)))
    with pytest.raises(ValueError, match="multiples of 8"):
        DataSettings(crop=(20, 32))


def test_hq_only_degradation_is_seeded_and_smaller(paired):
    hq, _ = paired
    data = ClipDataset(find_pairs(hq), DataSettings(frames=4, crop=(48, 64), null_text_ratio=0.0))
    item = data[(0, 11)]
    assert item["lq"].shape == item["hq"].shape == (4, 3, 48, 64)
    assert torch.equal(item["lq"], data[(0, 11)]["lq"])
    assert not torch.equal(item["lq"], data[(0, 12)]["lq"])
    assert (item["lq"] - item["hq"]).abs().mean() > 0.01  # degraded, not a copy


@pytest.mark.parametrize("video_prob, codec", [(1.0, "libx264"), (1.0, "mpeg4"), (0.0, "jpeg")])
def test_degrade_stages(video_prob, codec):
    clip = torch.rand(4, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    codecs = (codec,) if codec != "jpeg" else ("libx264",)
    settings = DegradationSettings(video_prob=video_prob, codecs=codecs)
    out = degrade(clip, settings, generator=torch.Generator().manual_seed(3))
    assert out.shape == (4, 3, 16, 24) and out.dtype == torch.float32
    assert torch.equal(out * 255, (out * 255).round())  # exact uint8 levels after the compression
    assert torch.equal(out, degrade(clip, settings, generator=torch.Generator().manual_seed(3)))
    clean = DegradationSettings(blur_prob=0.0, second_order_prob=0.0, noise_sigma=(0.0, 0.0),
                                poisson_scale=(0.0, 0.0), resize_prob=(0.0, 0.0, 1.0), video_prob=video_prob,
                                codecs=codecs, crf=(0, 0), qscale=(2, 2), jpeg_quality=(100, 100))
    smooth = torch.nn.functional.interpolate(clip[..., :4, :6], size=(32, 48), mode="bilinear").clamp(0, 1)
    light = degrade(smooth, DegradationSettings(**{**clean.__dict__, "scale": 1}),
                    generator=torch.Generator().manual_seed(1))
    assert (light - smooth).abs().mean() < 0.03  # the compression alone, at its finest, stays close
    with pytest.raises(ValueError, match="too small"):
        degrade(torch.rand(1, 3, 16, 16), settings, generator=torch.Generator())


def test_sampler_epochs_and_ranks():
    sampler = SeededSampler(5, seed=3)
    epoch = [sampler.key(i)[0] for i in range(5)]
    assert sorted(epoch) == list(range(5))  # every clip once per epoch
    assert len({sampler.key(i)[1] for i in range(20)}) == 20
    ranks = [SeededSampler(5, 3, start=0, rank=r, world=2) for r in range(2)]
    it = [iter(s) for s in ranks]
    first = [next(i) for i in it]
    assert first == [sampler.key(0), sampler.key(1)]
    resumed = SeededSampler(5, 3, start=4)
    assert next(iter(resumed)) == sampler.key(4)
