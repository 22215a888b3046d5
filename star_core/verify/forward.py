"""Verify group ``forward``: one UNet + ControlNet evaluation (``tiny_forward.safetensors``)."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..checkpoint import load_state_dict_file, load_star_model
from ..model import STARConfig, STARUNet, config_from_state_dict
from .report import Report

FORWARD_FILE = "tiny_forward.safetensors"
STATE_DICT_FILE = "tiny_state_dict.safetensors"
CONFIG_FILE = "tiny_config.json"  # official constructor arguments; the only source of the head split
INPUT_KEYS = ("x_t", "t", "y", "hint")


def fixture_config(fixture_dir: Path, sd: dict[str, torch.Tensor], report: Report | None = None) -> STARConfig:
    """
    The config inferred from the state dict; when the directory has ``tiny_config.json`` its head split (not visible
    in tensor shapes) is used and, given a report, every shape-derived field is checked against it.
    """
    config = config_from_state_dict(sd)
    path = fixture_dir / CONFIG_FILE
    if not path.is_file():
        return config
    args = json.loads(path.read_text())["constructor_args"]
    stated = STARConfig(**{f.name: args[f.name] for f in dataclasses.fields(STARConfig) if f.name in args})
    config = dataclasses.replace(config, num_heads=stated.num_heads, head_dim=stated.head_dim)
    if report is not None:
        report.equal(f"{path.stem}/inferred_config", config, stated)
    return config


def load_fixture_model(fixture_dir: Path, report: Report | None = None) -> STARUNet:
    """
    The fixture directory's tiny model in float32, built through `load_star_model` like a user's checkpoint, with
    the head split of ``tiny_config.json`` when present. Other verify groups use this so every group runs the same
    network for any fixture set.
    """
    fixture_dir = Path(fixture_dir)
    config = fixture_config(fixture_dir, load_state_dict_file(fixture_dir / STATE_DICT_FILE), report)
    return load_star_model(fixture_dir / STATE_DICT_FILE, dtype=torch.float32, config=config)


def run(fixture_dir: Path, report: Report) -> bool:
    """Builds the model from the directory's state dict through `load_star_model` and compares every output key."""
    fixture_dir = Path(fixture_dir)
    path = fixture_dir / FORWARD_FILE
    if not path.is_file():
        return False
    stem = path.stem
    data = load_file(str(path))
    missing = [k for k in INPUT_KEYS if k not in data]
    if missing or not (fixture_dir / STATE_DICT_FILE).is_file():
        report.fail(stem, f"inputs {missing} missing" if missing else f"{STATE_DICT_FILE} missing beside {path.name}")
        return True
    model = load_fixture_model(fixture_dir, report)
    x, t, y, hint = (data[k] for k in INPUT_KEYS)
    with torch.inference_mode():
        if "out" in data:
            report.compare(f"{stem}/out", model(x, t, y, hint), data["out"])
        if "out_hint_none" in data:
            report.compare(f"{stem}/out_hint_none", model(x, t, y, None), data["out_hint_none"])
        control_keys = sorted(k for k in data if re.fullmatch(r"control_\d+", k))
        if control_keys:
            controls = model.VideoControlNet(x, t, y, hint)
            if len(controls) != len(control_keys):
                report.fail(f"{stem}/control", f"{len(controls)} residuals, fixture has {len(control_keys)}")
            for key, actual in zip(control_keys, controls):
                report.compare(f"{stem}/{key}", actual, data[key])
    return True
