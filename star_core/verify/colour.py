"""Verify group ``colour``: the AdaIN and wavelet colour-fix vectors of ``units.safetensors``."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ..colour import adain_color_fix, wavelet_color_fix
from .report import Report

UNITS_FILE = "units.safetensors"
# Both official vectors colour-fix the same restored frames (0..255, [T,H,W,C], the tensor2vid layout).
TARGET_KEY = "adain.target_THWC_0_255"


def _lr_thwc_0_1(source_tchw_m1_1: torch.Tensor) -> torch.Tensor:
    """Official LR frames ([T,C,H,W] in -1..1) as star_core's [T,H,W,C] 0..1 layout."""
    return ((source_tchw_m1_1 + 1) / 2).permute(0, 2, 3, 1)


def run(fixture_dir: Path, report: Report) -> bool:
    """Compares ``adain.out_THWC_0_255`` and ``wavelet.out_THWC_0_255`` (0..255 space, as stored)."""
    path = Path(fixture_dir) / UNITS_FILE
    if not path.is_file():
        return False
    units = load_file(str(path))
    stem = path.stem
    checks = (
        ("adain.out_THWC_0_255", "adain.source_TCHW_m1_1", adain_color_fix),
        ("wavelet.out_THWC_0_255", "wavelet.source_TCHW_m1_1_resized", wavelet_color_fix),
    )
    ran = False
    for out_key, source_key, fix in checks:
        if out_key not in units:
            continue
        ran = True
        missing = [k for k in (TARGET_KEY, source_key) if k not in units]
        if missing:
            report.fail(f"{stem}/{out_key}", f"inputs {missing} missing from {path.name}")
            continue
        out = fix(units[TARGET_KEY] / 255, _lr_thwc_0_1(units[source_key])) * 255
        report.compare(f"{stem}/{out_key}", out, units[out_key])
    return ran
