"""Verify group ``sampling``: schedule tables (``schedule.json``) and official ``sample_sr`` runs (``tiny_sampling_*``).

Every run listed in ``tiny_sampling_info.json`` (key K <-> ``tiny_sampling_K.safetensors``) is reproduced twice with
the tiny model: once with the recorded Brownian noise injected, once through torchsde with the recorded entropy.
All settings come from the info file.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..diffusion import BrownianTreeNoiseSampler, SamplerSettings, c_in, discretized_timesteps, k_sigmas, plan_chunks
from ..diffusion import alphas_vp, sample_star, sigmas_vp
from ..diffusion.schedule import diffuse, model_timestep, t_to_sigma
from .forward import load_fixture_model
from .report import Report

INFO_FILE = "tiny_sampling_info.json"
SCHEDULE_FILE = "schedule.json"
SCHEDULE_TOL = 1e-6
_SCHEDULE_KEY = re.compile(r"^(fast|normal)_(\d+)$")


def _check_schedule(path: Path, report: Report) -> None:
    data = json.loads(path.read_text())
    for name, table in (("sigmas_vp", sigmas_vp()), ("alphas_vp", alphas_vp())):
        if name in data:
            report.compare(f"schedule/{name}", table, torch.tensor(data[name]), tol=SCHEDULE_TOL)
    for key, entry in data.items():
        if not isinstance(entry, dict):
            continue
        match = _SCHEDULE_KEY.match(key)
        if match is None:
            report.fail(f"schedule/{key}", "entry name is not '<fast|normal>_<steps>'; cannot tell its settings")
            continue
        timesteps = discretized_timesteps(match[1], int(match[2]))
        sigmas = k_sigmas(timesteps)
        expected = {
            "discretized_timesteps": timesteps,
            "k_sigmas_before_discard": torch.cat([t_to_sigma(timesteps), torch.zeros(1)]),
            "k_sigmas_used": sigmas,
            "c_in": torch.stack([c_in(sigma) for sigma in sigmas[:-1]]),
        }
        for field, actual in expected.items():
            if field in entry:
                report.compare(f"schedule/{key}/{field}", actual, torch.tensor(entry[field]), tol=SCHEDULE_TOL)
        if "model_timesteps_rounded" in entry:
            rounded = [int(model_timestep(sigma)) for sigma in sigmas[:-1]]
            report.equal(f"schedule/{key}/model_timesteps_rounded", rounded, entry["model_timesteps_rounded"])


def _numbered(tensors: dict[str, torch.Tensor], prefix: str) -> list[str]:
    return sorted((k for k in tensors if re.fullmatch(rf"{prefix}\d+", k)), key=lambda k: int(k[len(prefix):]))


def _check_run(stem: str, run: dict, tensors: dict[str, torch.Tensor], model, forward: dict[str, torch.Tensor],
               report: Report) -> None:
    kwargs = run["sample_sr_kwargs"]
    unsupported = {k: kwargs.get(k) for k, v in (("solver", "dpmpp_2m_sde"), ("discretization", "trailing"),
                                                 ("t_min", 0)) if kwargs.get(k) != v}
    if unsupported or run.get("diffuse_t", kwargs["t_max"]) != kwargs["t_max"]:
        report.fail(stem, f"unsupported sample_sr settings {unsupported} (diffuse_t {run.get('diffuse_t')}); "
                          "STAR samples with dpmpp_2m_sde, trailing, t_min 0 and diffuse_t = t_max")
        return
    lr_latent = tensors["lr_latent"]
    frames = lr_latent.shape[2]
    settings = SamplerSettings(mode=kwargs["solver_mode"], steps=kwargs["steps"], cfg=kwargs["guide_scale"],
                               rescale=kwargs["guide_rescale"], t_max=kwargs["t_max"],
                               chunk_len=run["max_chunk_len"], fusion="official")
    official = run["chunk_inds"] or [[0, frames]]
    plan = plan_chunks(frames, settings.chunk_len, fusion="official")
    report.equal(f"{stem}/chunk_inds", [list(w) for w in plan.spans], [list(w) for w in official])
    if "noised_lr" in tensors and "eps" in tensors:
        report.compare(f"{stem}/noised_lr", diffuse(lr_latent, kwargs["t_max"], tensors["eps"]), tensors["noised_lr"])

    sigmas = k_sigmas(discretized_timesteps(settings.mode, settings.steps, settings.t_max))
    noise_keys = _numbered(tensors, "brownian_noise_step")
    if "brownian_tree_entropy_seed" in run:
        entropy = int(run["brownian_tree_entropy_seed"])
    else:
        entropy = int(tensors["brownian_tree_entropy_seed"].item())
    positive = sigmas[sigmas > 0]
    tree = BrownianTreeNoiseSampler(tensors["noised_lr"] * sigmas[0], positive.min(), positive.max(), entropy)
    for i, key in enumerate(noise_keys):
        report.compare(f"{stem}/{key}", tree(sigmas[i], sigmas[i + 1]), tensors[key])

    x0_keys = _numbered(tensors, "x0_step")
    for label, brownian in (("injected noise", [tensors[k] for k in noise_keys]), ("torchsde", entropy)):
        x0s: list[torch.Tensor] = []
        final = sample_star(model, lr_latent, forward["y"], forward["y_neg"], settings, start_noise=tensors["eps"],
                            brownian=brownian, callback=lambda step, total, x, x0: x0s.append(x0.clone()))
        for key in x0_keys:
            step = int(key[len("x0_step"):])
            if step >= len(x0s):
                report.fail(f"{stem}/{key} ({label})", f"the sampler made only {len(x0s)} model evaluations")
            else:
                report.compare(f"{stem}/{key} ({label})", x0s[step], tensors[key])
        report.compare(f"{stem}/final_latent ({label})", final, tensors["final_latent"])


def run(fixture_dir: Path, report: Report) -> bool:
    """Checks ``schedule.json`` and every sampling run listed in ``tiny_sampling_info.json``.

    Parameters:
        fixture_dir (`Path`): a star_tiny-format fixture directory.
        report (`Report`): where results are printed and tallied.

    Returns:
        `bool`: False when the directory holds none of this group's files.
    """
    schedule = fixture_dir / SCHEDULE_FILE
    files = sorted(fixture_dir.glob("tiny_sampling_*.safetensors"))
    info_path = fixture_dir / INFO_FILE
    if not schedule.is_file() and not files and not info_path.is_file():
        return False
    if schedule.is_file():
        _check_schedule(schedule, report)
    if not files and not info_path.is_file():
        return True
    if not info_path.is_file():
        report.fail(INFO_FILE, f"missing in {fixture_dir}: it holds the settings of {[f.name for f in files]}")
        return True
    info = json.loads(info_path.read_text())
    runs = {f"tiny_sampling_{key}": entry for key, entry in info.items()}
    for path in files:
        if path.stem not in runs:
            print(f"note: {path.name} has no entry in {INFO_FILE}; not checked", flush=True)
    model = None
    for stem, entry in runs.items():
        path = fixture_dir / f"{stem}.safetensors"
        if not path.is_file():
            report.fail(stem, f"listed in {INFO_FILE} but {path.name} is missing")
            continue
        if model is None:
            model = load_fixture_model(fixture_dir, report).eval()
            forward = load_file(fixture_dir / "tiny_forward.safetensors")
        try:
            _check_run(stem, entry, load_file(path), model, forward, report)
        except KeyError as missing:
            report.fail(stem, f"{path.name} or its {INFO_FILE} entry lacks {missing}; regenerate the fixture set")
    return True
