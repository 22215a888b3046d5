"""Colour fix: official AdaIN / wavelet vectors, the strength blend and input validation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from star_core.colour import adain_color_fix, apply_colour_fix, upscale_source, wavelet_color_fix
from star_core.verify.colour import run as verify_colour
from star_core.verify.report import Report


@pytest.fixture(scope="module")
def units(fixtures_dir):
    return load_file(str(fixtures_dir / "units.safetensors"))


def _lr(source_tchw_m1_1: torch.Tensor) -> torch.Tensor:
    return ((source_tchw_m1_1 + 1) / 2).permute(0, 2, 3, 1)


def _video(seed: int, t: int, h: int, w: int) -> torch.Tensor:
    return torch.rand(t, h, w, 3, generator=torch.Generator().manual_seed(seed))


def test_adain_matches_official_vector(units):
    out = adain_color_fix(units["adain.target_THWC_0_255"] / 255, _lr(units["adain.source_TCHW_m1_1"])) * 255
    assert out.shape == (4, 24, 32, 3)
    assert (out - units["adain.out_THWC_0_255"]).abs().max().item() <= 1e-4


def test_wavelet_matches_official_vector(units):
    out = wavelet_color_fix(units["adain.target_THWC_0_255"] / 255,
                            _lr(units["wavelet.source_TCHW_m1_1_resized"])) * 255
    assert (out - units["wavelet.out_THWC_0_255"]).abs().max().item() <= 1e-4


def test_verify_group_passes_on_fixtures(fixtures_dir, capsys):
    report = Report()
    assert verify_colour(fixtures_dir, report) is True
    assert report.count == 2 and report.failures == []
    assert "PASS units/adain.out_THWC_0_255" in capsys.readouterr().out


def test_adain_transfers_per_frame_channel_statistics():
    restored = 0.25 + 0.5 * _video(1, 2, 16, 20)  # inside 0..1 after the fix, so clamping does not interfere
    lr = 0.3 + 0.4 * _video(2, 2, 4, 5)
    out = adain_color_fix(restored, lr)
    assert torch.allclose(out.mean(dim=(1, 2)), lr.mean(dim=(1, 2)), atol=1e-5)
    assert torch.allclose(out.std(dim=(1, 2)), lr.std(dim=(1, 2)), atol=1e-4)


def test_wavelet_resizes_the_source_bilinearly():
    restored, lr = _video(3, 2, 24, 32), _video(4, 2, 6, 8)
    resized = F.interpolate(lr.permute(0, 3, 1, 2), size=(24, 32), mode="bilinear", align_corners=False)
    expected = wavelet_color_fix(restored, resized.permute(0, 2, 3, 1))
    assert torch.equal(wavelet_color_fix(restored, lr), expected)


def test_strength_zero_returns_the_upscaled_source():
    restored, lr = _video(5, 3, 12, 16), _video(6, 3, 3, 4)
    expected = F.interpolate(lr.permute(0, 3, 1, 2), size=(12, 16), mode="bilinear", align_corners=False)
    for method in ("adain", "wavelet", "none"):
        out = apply_colour_fix(restored, lr, method=method, strength=0.0)
        assert out.shape == (3, 12, 16, 3)
        assert torch.equal(out, expected.permute(0, 2, 3, 1))


def test_strength_one_returns_the_restored_video():
    restored, lr = _video(7, 3, 12, 16), _video(8, 3, 3, 4)
    assert torch.equal(apply_colour_fix(restored, lr, method="none", strength=1.0), restored)
    assert torch.equal(apply_colour_fix(restored, lr, method="adain"), adain_color_fix(restored, lr))
    assert torch.equal(apply_colour_fix(restored, lr, method="wavelet"), wavelet_color_fix(restored, lr))


def test_partial_strength_blends_linearly():
    restored, lr = _video(9, 2, 8, 8), _video(10, 2, 4, 4)
    half = apply_colour_fix(restored, lr, method="adain", strength=0.25)
    expected = 0.75 * upscale_source(lr, (8, 8)) + 0.25 * adain_color_fix(restored, lr)
    assert (half - expected).abs().max().item() < 1e-6


def test_single_pixel_source_is_finite():
    out = apply_colour_fix(_video(11, 2, 4, 4), _video(12, 2, 1, 1), method="adain")
    assert out.shape == (2, 4, 4, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("restored", "lr", "kwargs", "message"),
    [
        (torch.rand(2, 4, 4, 3), torch.rand(3, 2, 2, 3), {}, "restored has 2 frames but lr has 3"),
        (torch.rand(2, 4, 4, 3), torch.rand(2, 2, 2, 4), {}, "channels"),
        (torch.rand(4, 4, 3), torch.rand(2, 2, 2, 3), {}, r"restored must be a \[T,H,W,C\] tensor"),
        (torch.rand(2, 4, 4, 3), (torch.rand(2, 2, 2, 3) * 255).to(torch.uint8), {}, "divide uint8 frames by 255"),
        (torch.rand(2, 4, 4, 3), torch.rand(2, 2, 2, 3), {"method": "lab"}, "'lab' is not one of"),
        (torch.rand(2, 4, 4, 3), torch.rand(2, 2, 2, 3), {"strength": 1.5}, r"strength must be a number in \[0, 1\]"),
    ],
)
def test_bad_input_is_named(restored, lr, kwargs, message):
    with pytest.raises(ValueError, match=message):
        apply_colour_fix(restored, lr, **kwargs)


def test_adain_reproduces_the_end_to_end_output(fixtures_dir):
    """The official tail of the e2e fixture: tensor2vid of the decoded video, then AdaIN against the LR frames."""
    from safetensors import safe_open

    with safe_open(str(fixtures_dir / "e2e_tiny.safetensors"), "pt") as f:
        decoded, lr_frames = f.get_tensor("video_decoded"), f.get_tensor("lr_frames")
        expected, expected_uint8 = f.get_tensor("output_float"), f.get_tensor("output_uint8")
    frames_0_255 = (decoded[0] * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 3, 0) * 255  # [T,H,W,C], as tensor2vid
    out = adain_color_fix(frames_0_255 / 255, _lr(lr_frames)) * 255
    assert out.shape == expected.shape
    assert (out - expected).abs().max().item() <= 1e-4
    assert torch.equal(out.to(torch.uint8), expected_uint8)
