"""VAE posterior over the white-padded frame against the official code at three more geometries (issue #11,
row 22): the official padding plan, and the encoder in the verify dtype (float64) and the production dtype
(float32), each within the 1e-4 budget; and verify's posterior budget against how far the official code itself
lands when rerun on the verify machine. Data: tests/fixtures/official_posterior (README there), made with the
shipped star_tiny VAE."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from star_core.pipeline import prepare_lr
from star_core.vae import load_svd_vae
from star_core.checkpoint import file_sha256
from star_core.verify.e2e import (
    ENCODER_DTYPE, POSTERIOR_FLOOR_FACTOR, POSTERIOR_KEYS, POSTERIOR_MIN_FLOOR, POSTERIOR_TOL_MAX, TOL_LATENT,
    check_posterior,
    fp32_posterior_floor, posterior_budget,
)
from star_core.verify.report import Report

DATA = Path(__file__).parent / "fixtures" / "official_posterior"
CASES = json.loads((DATA / "posterior.json").read_text())


@pytest.fixture(scope="module")
def stored() -> dict[str, torch.Tensor]:
    return load_file(str(DATA / "posterior.safetensors"))


@pytest.fixture(scope="module")
def rerun() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(DATA / "rerun.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    return load_file(str(DATA / "rerun.safetensors")), metadata


def require_shipped_set(fixtures_dir: Path, files: dict[str, str]) -> None:
    """The official numbers here were made with the shipped star_tiny files; another fixture set has other ones."""
    for name, sha in files.items():
        if file_sha256(fixtures_dir / name) != sha:
            pytest.skip(f"{fixtures_dir / name} is not the shipped star_tiny file the official numbers in {DATA} "
                        f"were made with (SHA-256 {sha[:12]}…)")


def load_vae(fixtures_dir: Path, dtype: torch.dtype):
    return load_svd_vae(fixtures_dir / "vae_tiny.safetensors", config=fixtures_dir / "vae_tiny_config.json",
                        dtype=dtype)


# Every geometry in the verify dtype; the production dtype on one (it is the official op sequence in float32).
RUNS = [(name, ENCODER_DTYPE) for name in sorted(CASES)] + [("wider_than_1280_720x1320", torch.float32)]


@pytest.mark.timeout(1800)  # three 720x1280 float64 encodes: ~2 min alone, much longer on a busy machine
@pytest.mark.parametrize("name, dtype", RUNS, ids=[f"{n}-{str(d)[6:]}" for n, d in RUNS])
def test_posterior_over_padded_frame_matches_official(fixtures_dir, stored, rerun, name, dtype):
    require_shipped_set(fixtures_dir, {"vae_tiny.safetensors": rerun[1]["vae_sha256"]})
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


@pytest.mark.timeout(1800)  # one 720x1280 frame in float64 and twice in float32: ~1 min alone
def test_verify_posterior_budget_against_the_official_codes_own_rerun(fixtures_dir, rerun):
    """The shipped e2e set's frame where the official code, rerun on the verify machine at 1 thread, lands farthest
    from the fixture machine's recording: past TOL_LATENT on posterior_std. Ours in the verify dtype lands closer,
    and within the budget verify measures for these frames."""
    data, metadata = rerun
    require_shipped_set(fixtures_dir, {"vae_tiny.safetensors": metadata["vae_sha256"],
                                       "e2e_tiny.safetensors": metadata["e2e_sha256"]})
    frame = int(metadata["frame"])
    recorded = load_file(str(fixtures_dir / "e2e_tiny.safetensors"))
    info = json.loads((fixtures_dir / "e2e_tiny_info.json").read_text())
    lr = recorded["lr_frames_uint8_rgb"][frame:frame + 1].to(torch.float32) / 255
    pixels, _ = prepare_lr(lr, scale=info["upscale"], padding="official")
    with torch.inference_mode():
        exact = dict(zip(POSTERIOR_KEYS, load_vae(fixtures_dir, ENCODER_DTYPE).posterior(pixels)))
        floors, production = fp32_posterior_floor(load_vae(fixtures_dir, torch.float32), pixels, exact)
    official = {}
    for key in POSTERIOR_KEYS:
        expected = recorded[key][frame:frame + 1].double()
        official[key] = (data[f"official_1_thread.{key}"].double() - expected).abs().max().item()
        ours = (exact[key].double() - expected).abs().max().item()
        users = (production[key].double() - expected).abs().max().item()
        budget = posterior_budget(floors[key])
        print(f"{key}: official rerun {official[key]:.2e}, ours float64 {ours:.2e}, ours fp32 {users:.2e}, "
              f"fp32 floor {floors[key]:.2e}, budget {budget:.1e}")
        assert ours <= official[key] and ours <= budget, (key, ours, official[key], budget)
        assert users <= budget and official[key] <= budget, (key, users, official[key], budget)
    # the fixed 1e-4 budget would fail the official code itself on this set
    assert official["posterior_std"] > TOL_LATENT


def test_posterior_budget_follows_the_measured_floor():
    # never below two roundings of the largest floor measured for the official code, which covers its own reruns
    assert posterior_budget(0.0) == pytest.approx(POSTERIOR_FLOOR_FACTOR * POSTERIOR_MIN_FLOOR)
    assert posterior_budget(0.0) > 1.16e-4
    assert posterior_budget(2e-4) == pytest.approx(POSTERIOR_FLOOR_FACTOR * 2e-4)
    assert posterior_budget(1.0) == POSTERIOR_TOL_MAX


class _Shifted:
    """An fp32 encoder that is wrong by `shift` everywhere (a dtype-specific bug)."""

    def __init__(self, vae, shift: float):
        self.vae, self.shift = vae, shift

    def posterior(self, pixels):
        return tuple(t + self.shift for t in self.vae.posterior(pixels))


def test_check_posterior_lines(fixtures_dir, capsys):
    pixels = torch.linspace(-1, 1, 3 * 48 * 64).reshape(1, 3, 48, 64)
    vae, encoder = load_vae(fixtures_dir, torch.float32), load_vae(fixtures_dir, ENCODER_DTYPE)
    with torch.inference_mode():
        exact = dict(zip(POSTERIOR_KEYS, encoder.posterior(pixels)))
        report = Report()
        check_posterior(report, "set", exact, vae, encoder, pixels)
        assert report.failures == [] and report.count == 4
        assert "set/posterior_std: our fp32 encoder lands" in capsys.readouterr().out
        # the recording off by as much as the official code's own rerun (1.16e-4): within the budget
        report = Report()
        check_posterior(report, "set", {k: v + 1.2e-4 for k, v in exact.items()}, vae, encoder, pixels)
        assert report.failures == []
        # the recording off by more than the budget
        report = Report()
        check_posterior(report, "set", {k: v + 2 * POSTERIOR_TOL_MAX for k, v in exact.items()}, vae, encoder, pixels)
        assert report.failures == ["set/posterior_mean", "set/posterior_mean (fp32, as users run it)",
                                   "set/posterior_std", "set/posterior_std (fp32, as users run it)"]
        # a broken fp32 path cannot widen its own budget past the cap: named, and its comparison fails
        report = Report()
        check_posterior(report, "set", exact, _Shifted(vae, 1e-3), encoder, pixels)
        assert report.failures == ["set/posterior_mean fp32 floor", "set/posterior_mean (fp32, as users run it)",
                                   "set/posterior_std fp32 floor", "set/posterior_std (fp32, as users run it)"]
        # a set that records no posterior: nothing checked
        report = Report()
        check_posterior(report, "set", {}, vae, encoder, pixels)
        assert report.count == 0
