"""Geometry: official and minimal pad plans, target sizes, upscale + pad, exact crop back for any size."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from star_core.geometry import (
    Geometry, minimal_padding, pad_to_fit, padding_plan, plan_geometry, target_size, upscale_and_pad,
)


def _network_ok(latent_h: int, latent_w: int, levels: int = 3) -> bool:
    """Simulates the UNet's Downsample (rows padded by 2, cols by 1, stride 2) and Upsample (×2, crop a row top
    and bottom) and says whether the skip connections line up."""
    hs, ws = [latent_h], [latent_w]
    for _ in range(levels):
        hs.append((hs[-1] + 4 - 3) // 2 + 1)
        ws.append((ws[-1] + 2 - 3) // 2 + 1)
    for level in range(levels, 0, -1):
        if hs[level] * 2 - 2 != hs[level - 1] or ws[level] * 2 != ws[level - 1]:
            return False
    return True


def test_pad_to_fit_equals_official(fixtures_dir):
    plans = json.loads((fixtures_dir / "pipeline_helpers.json").read_text())["pad_to_fit"]
    assert plans, "pipeline_helpers.json has no pad_to_fit cases"
    for key, expected in plans.items():
        h, w = map(int, key.split("x"))
        assert list(pad_to_fit(h, w)) == expected, key


@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (16, 64), (17, 65), (288, 512), (720, 1280), (961, 1703), (90, 2000)])
def test_minimal_padding_is_minimal_and_valid(h, w):
    left, right, top, bottom = minimal_padding(h, w)
    ph, pw = h + top + bottom, w + left + right
    assert ph % 64 == 16 and pw % 64 == 0
    assert _network_ok(ph // 8, pw // 8)
    # minimal: no smaller canvas fits
    assert top + bottom < 64 and left + right < 64
    assert abs(left - right) <= 1 and abs(top - bottom) <= 1
    # the official plan is never smaller
    lo, ro, to, bo = pad_to_fit(h, w)
    assert h + to + bo >= ph and w + lo + ro >= pw


def test_official_plan_is_valid_for_the_network():
    for h in range(1, 1500, 37):
        for w in range(1, 2600, 53):
            left, right, top, bottom = pad_to_fit(h, w)
            assert _network_ok((h + top + bottom) // 8, (w + left + right) // 8), (h, w)


def test_target_size_and_validation():
    assert target_size(144, 256, scale=2) == (288, 512)
    assert target_size(3, 5, scale=1.5) == (4, 8)  # round half to even, never 0
    assert target_size(144, 256, target=(300, 500)) == (300, 500)
    with pytest.raises(ValueError, match="exactly one of scale"):
        target_size(10, 10)
    with pytest.raises(ValueError, match="exactly one of scale"):
        target_size(10, 10, scale=2, target=(20, 20))
    with pytest.raises(ValueError, match="scale must be a positive number"):
        target_size(10, 10, scale=0)
    with pytest.raises(ValueError, match="target must be two integers"):
        target_size(10, 10, target=(20.5, 20))
    with pytest.raises(ValueError, match="target must be two positive integers"):
        target_size(10, 10, target=(0, 20))
    with pytest.raises(ValueError, match="input frame size"):
        target_size(0, 10, scale=2)
    with pytest.raises(ValueError, match="padding must be one of"):
        padding_plan(10, 10, "reflect")
    with pytest.raises(ValueError, match="at least 1 frame"):
        plan_geometry(0, 10, 10, scale=2)


@pytest.mark.parametrize("mode", ["official", "minimal"])
@pytest.mark.parametrize("frames,h,w,scale", [(1, 7, 9, 2), (2, 13, 5, 3), (1, 1, 1, 4)])
def test_upscale_pad_crop_roundtrip_exact(mode, frames, h, w, scale):
    geometry = plan_geometry(frames, h, w, scale=scale, padding=mode, fps=25.0)
    assert geometry.target_size == (h * scale, w * scale)
    lr = torch.rand(frames, 3, h, w) * 2 - 1
    padded = upscale_and_pad(lr, geometry)
    assert tuple(padded.shape) == (frames, 3, *geometry.padded_size)
    left, right, top, bottom = geometry.padding
    if top:
        assert torch.all(padded[:, :, :top] == 1.0)
    if right:
        assert torch.all(padded[..., -right:] == 1.0)
    expected = F.interpolate(lr, [h * scale, w * scale], mode="bilinear", align_corners=False)
    assert torch.equal(geometry.crop(padded), expected)
    assert Geometry.from_dict(geometry.to_dict()) == geometry


def test_geometry_rejects_mismatches():
    geometry = plan_geometry(3, 8, 8, scale=2, padding="minimal")
    with pytest.raises(ValueError, match="does not match its geometry"):
        geometry.check_latent(torch.zeros(1, 4, 2, *geometry.latent_size))
    with pytest.raises(ValueError, match="not the padded size"):
        geometry.crop(torch.zeros(3, 3, 16, 16))
    with pytest.raises(ValueError, match="the geometry expects"):
        upscale_and_pad(torch.zeros(1, 3, 9, 8), geometry)
    with pytest.raises(ValueError, match="lacks 'padding'"):
        Geometry.from_dict({"original_size": (1, 1), "target_size": (1, 1), "frames": 1})
