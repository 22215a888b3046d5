"""``--manifest FILE``: the full-size model built on ``meta`` against a key manifest (``star_keys_i2vgenxl.json``)."""
from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import torch

from ..model import STARConfig, STARUNet, config_from_state_dict
from .report import Report


def check_manifest(path: Path, report: Report) -> None:
    """
    Builds `STARUNet` with the manifest's ``constructor_defaults`` on ``meta`` and compares key names, order and
    shapes, key/parameter/buffer counts, per-submodule parameter totals, and the config inferred back from the shapes.

    Parameters:
        path (`Path`): the manifest JSON.
        report (`Report`): where the results go.
    """
    path = Path(path)
    stem = path.stem
    if not path.is_file():
        report.fail(stem, f"manifest {path} not found")
        return
    manifest = json.loads(path.read_text())
    args = manifest.get("constructor_defaults", {})
    config = STARConfig(**{f.name: args[f.name] for f in dataclasses.fields(STARConfig) if f.name in args})
    with torch.device("meta"):
        model = STARUNet(config)
    sd = model.state_dict()
    entries = {e["key"]: tuple(e["shape"]) for e in manifest["keys"]}
    report.equal(f"{stem}/keys", list(sd), [e["key"] for e in manifest["keys"]])
    wrong = [k for k, v in sd.items() if k in entries and tuple(v.shape) != entries[k]]
    report.equal(f"{stem}/shapes", wrong, [])
    report.equal(f"{stem}/num_keys", len(sd), manifest["num_keys"])
    report.equal(f"{stem}/num_params_total", sum(p.numel() for p in model.parameters()), manifest["num_params_total"])
    report.equal(f"{stem}/num_buffers", len(list(model.buffers())), manifest.get("num_buffers", 0))
    if "params_per_top_level_submodule" in manifest:
        per_module: dict[str, int] = defaultdict(int)
        for name, p in model.named_parameters():
            per_module[name.split(".", 1)[0]] += p.numel()
        report.equal(f"{stem}/params_per_top_level_submodule", dict(per_module),
                     manifest["params_per_top_level_submodule"])
    report.equal(f"{stem}/config_from_state_dict", config_from_state_dict(sd), config)
