"""Verify group ``vae``: SVD VAE fixtures (``vae_*_config.json`` + ``vae_*.safetensors`` + ``vae_*_io.safetensors``).

Encode with the stored posterior noise → posterior mean/std/sample and the scaled latent; decode the stored latent
with the fixture's temporal chunking → decoded frames. Every setting comes from ``vae_*_info.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from ..vae import load_svd_vae
from .report import Report


def _sets(fixture_dir: Path) -> list[str]:
    """Stems ``vae_X`` having config, weights and io files."""
    return sorted(config.name[: -len("_config.json")] for config in fixture_dir.glob("vae_*_config.json")
                  if (fixture_dir / config.name.replace("_config.json", ".safetensors")).is_file()
                  and (fixture_dir / config.name.replace("_config.json", "_io.safetensors")).is_file())


def run(fixture_dir: Path, report: Report) -> bool:
    """Runs every VAE fixture set in ``fixture_dir``; False when there is none."""
    stems = _sets(fixture_dir)
    for stem in stems:
        io_name = f"{stem}_io"
        info_file = fixture_dir / f"{stem}_info.json"
        io_info = json.loads(info_file.read_text()).get("io", {}) if info_file.is_file() else {}
        try:
            vae = load_svd_vae(fixture_dir / f"{stem}.safetensors", config=fixture_dir / f"{stem}_config.json")
        except (ValueError, FileNotFoundError) as error:
            report.fail(stem, f"could not load the VAE: {error}")
            continue
        io = load_file(str(fixture_dir / f"{io_name}.safetensors"))
        if "frames" in io:
            frames = io["frames"]
            mean, std = vae.posterior(frames)
            if "posterior_mean" in io:
                report.compare(f"{io_name}/posterior_mean", mean, io["posterior_mean"])
            if "posterior_std" in io:
                report.compare(f"{io_name}/posterior_std", std, io["posterior_std"])
            if "posterior_eps" in io:
                eps = io["posterior_eps"]
                if "posterior_sample" in io:
                    report.compare(f"{io_name}/posterior_sample", mean + std * eps, io["posterior_sample"])
                if "latent" in io:
                    report.compare(f"{io_name}/latent", vae.encode(frames, eps), io["latent"])
        if "latent" in io and "decoded" in io:
            window = int(io_info.get("decode_chunk", 3))
            report.compare(f"{io_name}/decoded", vae.decode(io["latent"], window=window), io["decoded"])
    return bool(stems)
