"""Verify group ``units``: the LIEM gates and the sinusoidal timestep embedding from ``units.safetensors``."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ..model import SpatialLIEM, TemporalLIEM, sinusoidal_embedding
from .report import Report

UNITS_FILE = "units.safetensors"


def _check_liem(units: dict[str, torch.Tensor], prefix: str, module: torch.nn.Module, stem: str, report: Report) -> bool:
    keys = [f"{prefix}.conv1.weight", f"{prefix}.in", f"{prefix}.out"]
    if keys[2] not in units:
        return False
    missing = [k for k in keys if k not in units]
    if missing:
        report.fail(f"{stem}/{keys[2]}", f"inputs {missing} missing")
        return True
    module.load_state_dict({"conv1.weight": units[keys[0]]})
    with torch.inference_mode():
        report.compare(f"{stem}/{keys[2]}", module(units[keys[1]]), units[keys[2]])
    return True


def run(fixture_dir: Path, report: Report) -> bool:
    """Compares ``liem_spatial.out``, ``liem_temporal.out`` and ``sinusoidal_<dim>`` (dim read from the key)."""
    path = Path(fixture_dir) / UNITS_FILE
    if not path.is_file():
        return False
    units = load_file(str(path))
    stem = path.stem
    ran = _check_liem(units, "liem_spatial", SpatialLIEM(), stem, report)
    ran = _check_liem(units, "liem_temporal", TemporalLIEM(), stem, report) or ran
    for key in sorted(k for k in units if k.startswith("sinusoidal_") and k != "sinusoidal_t"):
        ran = True
        if "sinusoidal_t" not in units:
            report.fail(f"{stem}/{key}", "input sinusoidal_t missing")
            continue
        report.compare(f"{stem}/{key}", sinusoidal_embedding(units["sinusoidal_t"], units[key].shape[1]), units[key])
    return ran
