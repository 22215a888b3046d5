"""Streaming: the CLI's peak memory while processing a video does not grow with the video's length.

Measured in fresh processes by ``bench/streaming.py`` (which resets the kernel's peak-RSS counter right before
the video is processed, so model loading is left out); full tables come from running that script directly.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from star_core.cli import write_demo_models

BENCH = Path(__file__).resolve().parents[1] / "bench" / "streaming.py"


def _measure(frames: int, models: Path) -> dict:
    sampler = "--solver-mode normal --steps 1 --cfg 1 --chunk-len 8"  # short: memory is what is measured
    command = [sys.executable, str(BENCH), "--one", str(frames), "--json", "--models", str(models),
               "--width", "96", "--height", "64", "--sampler", sampler, "--no-cli"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_peak_rss_of_8_and_64_frames_differs_by_less_than_20_percent(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_demo_models(models)
    short, long = _measure(8, models), _measure(64, models)
    assert long["stream_peak_mb"] < 1.2 * short["stream_peak_mb"], (short, long)
    # The per-video working set (peak above the RSS at the start of the video): holding the 64 frames (LR,
    # upscaled/padded pixels, decoded output) would add >= 60 MB at this size, +40 % or more on the 110-150 MB
    # measured for 8 frames; streaming measured +2 % on the peak and +9 % on the working set.
    working_short = short["stream_peak_mb"] - short["stream_start_mb"]
    working_long = long["stream_peak_mb"] - long["stream_start_mb"]
    assert working_long < 1.3 * working_short, (short, long)
