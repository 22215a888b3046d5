"""The README's main job: `python -m star_core upscale --demo-tiny -o demo_out.mp4`, end to end with tiny models."""
from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av

from star_core.video_io import probe_video


def test_demo_tiny_end_to_end_keeps_frames_size_fps_and_audio(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "star_core", "upscale", "--demo-tiny", "-o", "demo_out.mp4",
                           "--quiet"], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "output is noise" in done.stderr
    info = probe_video(tmp_path / "demo_out.mp4")
    # generated clip: 8 frames of 48x32 at 24 fps with an AAC track, upscaled x2
    assert (info.frame_count, info.width, info.height, info.fps, info.has_audio) == (8, 96, 64, Fraction(24), True)
    with av.open(str(tmp_path / "demo_out.mp4")) as container:
        assert container.streams.audio[0].codec_context.name == "aac"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_out.mp4"]


def test_memory_budget_too_small_names_the_smallest_plan(tmp_path: Path) -> None:
    """--memory-budget below what even the smallest plan needs: one error line naming the plan and its need,
    exit status 1, no output file; a budget that is not positive is rejected up front."""
    def upscale(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "star_core", "upscale", "--demo-tiny", "-o", "out.mp4",
                               "--quiet", *flags], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})

    done = upscale("--memory-budget", "0.0001")
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stderr
    assert "nothing fits in 0.1 MiB (" in errors[0] and "the smallest plan (" in errors[0]
    # the demo sets --chunk-len 4 itself: named as set by hand (auto sizing leaves it alone)
    assert errors[0].endswith("; free memory or lower the output size; set by hand: --chunk-len ('auto' lets the "
                              "run choose smaller)")
    done = upscale("--memory-budget", "0")
    assert done.returncode == 1 and "error: --memory-budget must be a positive number of GiB, got 0.0" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
