"""DPM++(2M) SDE + CFG rescale + chunking against the official sampler fixtures, and sampler behaviour."""
from __future__ import annotations

import dataclasses

import json

import pytest
import torch
from safetensors.torch import load_file

from star_core.diffusion import BrownianTreeNoiseSampler, SamplerSettings, k_sigmas, sample_star
from star_core.diffusion.guidance import cfg_rescale
from star_core.diffusion.schedule import discretized_timesteps


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    from star_core.verify.forward import load_fixture_model

    model = load_fixture_model(fixtures_dir).eval()
    forward = load_file(fixtures_dir / "tiny_forward.safetensors")
    info = json.loads((fixtures_dir / "tiny_sampling_info.json").read_text())
    return model, forward, info


def _settings(run: dict) -> SamplerSettings:
    kwargs = run["sample_sr_kwargs"]
    return SamplerSettings(mode=kwargs["solver_mode"], steps=kwargs["steps"], cfg=kwargs["guide_scale"],
                           rescale=kwargs["guide_rescale"], t_max=kwargs["t_max"], chunk_len=run["max_chunk_len"],
                           fusion="official")


@pytest.mark.parametrize("key", ["nochunk", "chunked"])
def test_official_sampler_fixture(tiny, fixtures_dir, key):
    model, forward, info = tiny
    data = load_file(fixtures_dir / f"tiny_sampling_{key}.safetensors")
    noises = [data[f"brownian_noise_step{i:02d}"] for i in range(info[key]["n_brownian_calls"])]
    x0s = []
    final = sample_star(model, data["lr_latent"], forward["y"], forward["y_neg"], _settings(info[key]),
                        start_noise=data["eps"], brownian=noises,
                        callback=lambda step, total, x, x0: x0s.append(x0.clone()))
    assert len(x0s) == 14
    errors = {"final_latent": (final - data["final_latent"]).abs().max().item()}
    for i in range(info[key]["n_x0_records"]):
        errors[f"x0_step{i:02d}"] = (x0s[i] - data[f"x0_step{i:02d}"]).abs().max().item()
    print(f"{key}: max|Δ| " + ", ".join(f"{k}={v:.2e}" for k, v in errors.items()))
    assert max(errors.values()) <= 1e-4, errors


def test_brownian_tree_reproduces_recorded_noise(fixtures_dir):
    data = load_file(fixtures_dir / "tiny_sampling_chunked.safetensors")
    sigmas = k_sigmas(discretized_timesteps("fast", 15))
    positive = sigmas[sigmas > 0]
    tree = BrownianTreeNoiseSampler(data["noised_lr"] * sigmas[0], positive.min(), positive.max(),
                                    int(data["brownian_tree_entropy_seed"].item()))
    for i in range(13):
        assert torch.equal(tree(sigmas[i], sigmas[i + 1]), data[f"brownian_noise_step{i:02d}"]), i


class ToyModel:
    """Cheap batch-independent stand-in for the network: mixes x, hint, a context statistic and t."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, x, t, context, hint):
        self.calls.append(x.shape[0])
        scale = (t.float() / 1000).view(-1, 1, 1, 1, 1)
        ctx = context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        return torch.tanh(0.7 * x + 0.3 * hint * scale + ctx) + 0.1 * x.roll(1, dims=2)


def _toy_inputs(frames=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    lr = torch.randn(1, 4, frames, 6, 8, generator=g)
    noise = torch.randn(1, 4, frames, 6, 8, generator=g)
    positive, negative = torch.randn(1, 77, 16, generator=g), torch.randn(1, 77, 16, generator=g)
    return lr, noise, positive, negative


def test_batch_cfg_equals_two_passes():
    lr, noise, positive, negative = _toy_inputs()
    two, one = ToyModel(), ToyModel()
    settings = SamplerSettings(mode="normal", steps=5, chunk_len=4, fusion="hann")
    a = sample_star(two, lr, positive, negative, settings, start_noise=noise, brownian=5)
    settings = dataclasses.replace(settings, batch_cfg=True)
    b = sample_star(one, lr, positive, negative, settings, start_noise=noise, brownian=5)
    assert (a - b).abs().max().item() <= 1e-5
    assert set(two.calls) == {1} and set(one.calls) == {2} and len(two.calls) == 2 * len(one.calls)


def test_seeds_reproducible_and_distinct():
    lr, noise, positive, negative = _toy_inputs()
    settings = SamplerSettings(mode="normal", steps=4)
    runs = [sample_star(ToyModel(), lr, positive, negative, settings, start_noise=noise, brownian=e) for e in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1])
    assert (runs[0] - runs[2]).abs().max().item() > 1e-3


def test_callback_reports_steps_and_interrupts():
    lr, noise, positive, negative = _toy_inputs()
    model, seen = ToyModel(), []

    class Stop(Exception):
        pass

    def callback(step, total, x, x0):
        seen.append((step, total, tuple(x.shape), tuple(x0.shape)))
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        sample_star(model, lr, positive, negative, SamplerSettings(), start_noise=noise, brownian=0, callback=callback)
    assert [s[:2] for s in seen] == [(0, 14), (1, 14), (2, 14)]
    assert all(s[2] == s[3] == tuple(lr.shape) for s in seen)
    assert len(model.calls) == 3 * 2  # no model evaluation after the interrupting step


def test_chunked_run_matches_unchunked_within_chunk_for_official_single_window():
    lr, noise, positive, negative = _toy_inputs(frames=5)
    whole = sample_star(ToyModel(), lr, positive, negative, SamplerSettings(mode="normal", steps=3, chunk_len=32),
                        start_noise=noise, brownian=9)
    exact = sample_star(ToyModel(), lr, positive, negative,
                        SamplerSettings(mode="normal", steps=3, chunk_len=5, fusion="official"),
                        start_noise=noise, brownian=9)
    assert torch.equal(whole, exact)


def test_cfg_rescale_formula():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    out = cfg_rescale(cond, uncond, 7.5, 0.2)
    guided = uncond + 7.5 * (cond - uncond)
    for b in range(2):
        ratio = cond[b].std() / guided[b].std()
        assert torch.allclose(out[b], guided[b] * (0.2 * ratio + 0.8), atol=1e-6)
    assert torch.allclose(cfg_rescale(cond, uncond, 7.5, 1.0).flatten(1).std(1), cond.flatten(1).std(1), atol=1e-5)


def test_bad_inputs_raise():
    lr, noise, positive, negative = _toy_inputs()
    with pytest.raises(ValueError, match="start_noise has shape"):
        sample_star(ToyModel(), lr, positive, negative, SamplerSettings(), start_noise=noise[:, :, :2], brownian=0)
    with pytest.raises(ValueError, match="injected noise tensors given"):
        sample_star(ToyModel(), lr, positive, negative, SamplerSettings(), start_noise=noise, brownian=[noise])
    with pytest.raises(ValueError, match="sampler.fusion must be one of official, linear, hann; got 'cubic'"):
        SamplerSettings(fusion="cubic")
    with pytest.raises(ValueError, match=r"sampler.cfg must be a finite number, got nan"):
        SamplerSettings(cfg=float("nan"))
    with pytest.raises(ValueError, match=r"sampler.overlap \(4\) must be smaller than the chunk length \(4\)"):
        SamplerSettings(chunk_len=4, overlap=4)
    with pytest.raises(ValueError, match="Brownian entropy"):
        sample_star(ToyModel(), lr, positive, negative, SamplerSettings(), start_noise=noise, brownian=-1)
