"""VAE posterior over the white-padded frame against the official code at three more geometries (issue #11,
row 22): the official padding plan, and the encoder in the verify dtype (float64) and the production dtype
(float32), each within the 1e-4 budget. Data: tests/fixtures/official_posterior (README there)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from star_core.pipeline import prepare_lr
from star_core.vae import load_svd_vae
from star_core.verify.e2e import ENCODER_DTYPE, TOL_LATENT

DATA = Path(__file__).parent / "fixtures" / "official_posterior"
CASES = json.loads((DATA / "posterior.json").read_text())


@pytest.fixture(scope="module")
def stored() -> dict[str, torch.Tensor]:
    return load_file(str(DATA / "posterior.safetensors"))


# Every geometry in the verify dtype; the production dtype on one (it is the official op sequence in float32).
RUNS = [(name, ENCODER_DTYPE) for name in sorted(CASES)] + [("wider_than_1280_720x1320", torch.float32)]


@pytest.mark.timeout(1800)  # three 720x1280 float64 encodes: ~2 min alone, much longer on a busy machine
@pytest.mark.parametrize("name, dtype", RUNS, ids=[f"{n}-{str(d)[6:]}" for n, d in RUNS])
def test_posterior_over_padded_frame_matches_official(fixtures_dir, stored, name, dtype):
    case = CASES[name]
    lr = stored[f"{name}.lr_frames_uint8_rgb"].to(torch.float32) / 255
    pixels, geometry = prepare_lr(lr, scale=case["upscale"], padding="official")
    assert list(geometry.padding) == case["pad_to_fit"] and list(pixels.shape[1:]) == case["padded_frame"]
    vae = load_svd_vae(fixtures_dir / "vae_tiny.safetensors", config=fixtures_dir / "vae_tiny_config.json", dtype=dtype)
    with torch.inference_mode():
        mean, std = vae.posterior(pixels)
    for key, actual in (("posterior_mean", mean), ("posterior_std", std)):
        err = (actual.double() - stored[f"{name}.{key}"].double()).abs().max().item()
        print(f"{name} {key} {dtype}: max|Δ| = {err:.2e}")
        assert err <= TOL_LATENT, (key, err)
