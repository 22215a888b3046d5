"""Pipeline composition: RunNoise (reproducible, injectable, official order) and tiny end-to-end runs."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from star_core.seeds import RunNoise


def test_run_noise_reproduces_the_official_cpu_draws(fixtures_dir):
    info = json.loads((fixtures_dir / "e2e_tiny_info.json").read_text())
    with safe_open(fixtures_dir / "e2e_tiny.safetensors", "pt") as f:
        posterior = f.get_tensor("posterior_eps")
        diffuse = f.get_tensor("diffuse_eps")
        entropy = int(f.get_tensor("brownian_tree_entropy_seed").item())
    frames = posterior.shape[0]
    noise = RunNoise(info["global_seed"])
    drawn = torch.cat([noise.posterior_eps_window(0, 1, tuple(posterior.shape[1:])),
                       noise.posterior_eps_window(1, frames - 1, tuple(posterior.shape[1:]))])
    assert torch.equal(drawn, posterior)
    assert torch.equal(noise.diffuse_eps(tuple(diffuse.shape)), diffuse)
    assert noise.brownian() == entropy
    # skipping the posterior draws (e.g. the mean was used) still gives the same start noise and entropy
    skipped = RunNoise(info["global_seed"])
    assert torch.equal(skipped.diffuse_eps(tuple(diffuse.shape)), diffuse)
    assert skipped.brownian() == entropy


def test_run_noise_injection_and_order():
    posterior = torch.randn(2, 4, 3, 5)
    diffuse = torch.randn(1, 4, 2, 3, 5)
    noise = RunNoise(posterior_eps=posterior, diffuse_eps=diffuse, brownian=123)
    assert torch.equal(noise.posterior_eps(0, (1, 4, 3, 5)), posterior[:1])
    assert torch.equal(noise.posterior_eps(1, (1, 4, 3, 5)), posterior[1:])
    assert torch.equal(noise.diffuse_eps((1, 4, 2, 3, 5)), diffuse)
    assert noise.brownian() == 123
    # injection overrides one stream, the seed still supplies (and aligns) the others
    seeded, mixed = RunNoise(5), RunNoise(5, diffuse_eps=diffuse)
    assert torch.equal(mixed.diffuse_eps((1, 4, 2, 3, 5)), diffuse)
    seeded.diffuse_eps((1, 4, 2, 3, 5))
    assert mixed.brownian() == seeded.brownian()
    with pytest.raises(ValueError, match="expected frame 0"):
        RunNoise(1).posterior_eps(1, (1, 4, 3, 5))
    with pytest.raises(ValueError, match="no seed and no injected diffuse_eps"):
        RunNoise().diffuse_eps((1, 4, 2, 3, 5))
    with pytest.raises(ValueError, match="after the start noise"):
        RunNoise(1).brownian()
    with pytest.raises(ValueError, match="!= latent shape"):
        RunNoise(diffuse_eps=diffuse).diffuse_eps((1, 4, 3, 3, 5))
    with pytest.raises(ValueError, match="seed must be an integer"):
        RunNoise(-1)


def test_run_noise_seeds_differ_and_repeat():
    a, b, c = RunNoise(1), RunNoise(1), RunNoise(2)
    shape = (1, 4, 3, 2, 8)
    ea, eb, ec = a.diffuse_eps(shape), b.diffuse_eps(shape), c.diffuse_eps(shape)
    assert torch.equal(ea, eb) and not torch.equal(ea, ec)
    assert a.brownian() == b.brownian() != c.brownian()
