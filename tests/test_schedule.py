"""Schedule tables, timestep discretisation, k-sigmas, c_in and the rounded model timesteps against schedule.json."""
from __future__ import annotations

import json

import pytest
import torch

from star_core.diffusion import schedule


@pytest.fixture(scope="module")
def table(fixtures_dir):
    return json.loads((fixtures_dir / "schedule.json").read_text())


def test_vp_tables_equal_official(table):
    assert (schedule.sigmas_vp() - torch.tensor(table["sigmas_vp"])).abs().max().item() <= 1e-6
    assert (schedule.alphas_vp() - torch.tensor(table["alphas_vp"])).abs().max().item() <= 1e-6
    assert schedule.sigmas_vp()[999].item() == 1.0 and schedule.alphas_vp()[999].item() == 0.0


@pytest.mark.parametrize("key", ["fast_15", "normal_15", "normal_50"])
def test_timesteps_sigmas_and_rounded_t(table, key):
    mode, steps = key.split("_")
    expected = table[key]
    timesteps = schedule.discretized_timesteps(mode, int(steps))
    assert timesteps.tolist() == expected["discretized_timesteps"]
    sigmas = schedule.k_sigmas(timesteps)
    assert sigmas.tolist() == expected["k_sigmas_used"]
    assert torch.cat([schedule.t_to_sigma(timesteps), torch.zeros(1)]).tolist() == expected["k_sigmas_before_discard"]
    assert [int(schedule.model_timestep(s)) for s in sigmas[:-1]] == expected["model_timesteps_rounded"]
    c_in = torch.stack([schedule.c_in(s) for s in sigmas[:-1]])
    assert (c_in - torch.tensor(expected["c_in"])).abs().max().item() <= 1e-7


def test_fast_mode_is_the_fixed_14_evaluations():
    sigmas = schedule.k_sigmas(schedule.discretized_timesteps("fast", 50))
    assert len(sigmas) == 15 and sigmas[-1].item() == 0.0
    rounded = [int(schedule.model_timestep(s)) for s in sigmas[:-1]]
    assert rounded == [899, 799, 699, 599, 500, 454, 409, 363, 318, 272, 227, 181, 136, 90]


@pytest.mark.parametrize("steps", [1, 2, 7, 25])
def test_normal_mode_gives_steps_evaluations(steps):
    timesteps = schedule.discretized_timesteps("normal", steps)
    assert len(timesteps) == steps + 1 and timesteps[0].item() == 899.0
    sigmas = schedule.k_sigmas(timesteps)
    assert len(sigmas) == steps + 1 and sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())


def test_sigma_to_t_inverts_t_to_sigma():
    t = torch.tensor([1.0, 90.09, 450.5, 899.0])
    back = torch.cat([schedule.sigma_to_t(s) for s in schedule.t_to_sigma(t)])
    assert (back - t).abs().max().item() < 1e-3


def test_diffuse_matches_recorded_start(fixtures_dir):
    from safetensors.torch import load_file

    data = load_file(fixtures_dir / "tiny_sampling_nochunk.safetensors")
    noised = schedule.diffuse(data["lr_latent"], 899, data["eps"])
    assert torch.equal(noised, data["noised_lr"])


def test_denoise_to_t_max():
    assert schedule.t_max_for_denoise(1.0) == 899
    assert schedule.t_max_for_denoise(0.5) == 449
    with pytest.raises(ValueError, match="denoise must be in"):
        schedule.t_max_for_denoise(1.5)


def test_bad_settings_raise_actionable_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        schedule.discretized_timesteps("slow", 15)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        schedule.discretized_timesteps("normal", 0)
    with pytest.raises(ValueError, match="use mode='normal'"):
        schedule.discretized_timesteps("fast", 15, t_max=400)
    assert len(schedule.discretized_timesteps("normal", 10, t_max=400)) == 11
