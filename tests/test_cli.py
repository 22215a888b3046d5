"""The headless command: bad inputs, output planning, --skip-existing, the offline message, `download`."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from star_core import cli
from star_core.video_io import write_synthetic_clip

# One torch thread: on a loaded 2-core machine two spinning threads make tiny models many times slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "star_core", "upscale", *args], capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=600)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    write_synthetic_clip(folder / "good.mp4", frames=3, width=32, height=16)
    write_synthetic_clip(folder / "empty.mp4", frames=0, width=32, height=16, audio=False)
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    return folder


@pytest.mark.parametrize(("name", "message"), [("empty.mp4", "holds no video frames"),
                                               ("broken.mp4", "cannot read .*broken.mp4 as a video")])
def test_bad_input_gives_clear_error_and_no_output(clips: Path, tmp_path: Path, capsys, name: str,
                                                   message: str) -> None:
    out = tmp_path / "out.mp4"
    assert cli.main(["upscale", str(clips / name), "-o", str(out), "--offline", "--quiet"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert list(tmp_path.iterdir()) == []


def test_missing_input_and_output_conflicts(clips: Path, tmp_path: Path, capsys) -> None:
    assert cli.main(["upscale", str(tmp_path / "nope.mp4"), "-o", str(tmp_path / "o.mp4")]) == cli.EXIT_FAILED
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["upscale", str(clips / "good.mp4"), "-o", str(clips / "good.mp4")]) == cli.EXIT_FAILED
    assert "would overwrite its input" in capsys.readouterr().err
    assert cli.main(["upscale", str(tmp_path / "*.mkv"), "-o", str(tmp_path)]) == cli.EXIT_FAILED
    assert "matches no file" in capsys.readouterr().err
    assert cli.main(["upscale", "-o", str(tmp_path / "o.mp4")]) == cli.EXIT_FAILED
    assert "--demo-tiny" in capsys.readouterr().err
    assert cli.main(["upscale", str(clips / "good.mp4"), "-o", str(tmp_path / "o.mp4"),
                     "--colour-strength", "1.5"]) == cli.EXIT_FAILED
    assert "--colour-strength must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert cli.main(["upscale", str(clips / "good.mp4"), "-o", str(tmp_path / "o.mp4"), "--decode-tile", "100"]) \
        == cli.EXIT_FAILED
    assert "multiple of 8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["upscale", str(clips / "good.mp4"), "-o", "x.mp4", "--target-size", "1080by1920"])
    assert "HEIGHTxWIDTH" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_folder_and_glob_inputs_map_to_output_folder(clips: Path, tmp_path: Path) -> None:
    pairs = cli.plan_outputs(cli.expand_inputs([str(clips)]), tmp_path / "out", "h264")
    names = ("broken.mp4", "empty.mp4", "good.mp4")
    assert [(s.name, d) for s, d in pairs] == [(n, tmp_path / "out" / n) for n in names]
    pairs = cli.plan_outputs(cli.expand_inputs([str(clips / "g*.mp4")]), tmp_path / "out", "ffv1")
    assert pairs == [(clips / "good.mp4", tmp_path / "out" / "good.mkv")]
    assert cli.plan_outputs(cli.expand_inputs([str(clips / "good.mp4")]), tmp_path / "x.mov", "h264") == \
        [(clips / "good.mp4", tmp_path / "x.mov")]


def test_skip_existing_skips_before_loading_anything(clips: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "good.mp4").write_bytes(b"done before")
    code = cli.main(["upscale", str(clips / "good.mp4"), "-o", str(tmp_path), "--skip-existing", "--offline"])
    assert code == 0
    assert "skip" in capsys.readouterr().err
    assert (tmp_path / "good.mp4").read_bytes() == b"done before"


def test_offline_without_models_lists_every_file_and_exits_3(clips: Path, tmp_path: Path) -> None:
    done = run_cli(str(clips / "good.mp4"), "-o", str(tmp_path / "out.mp4"), "--offline",
                   "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
    assert done.returncode == cli.EXIT_MODELS_MISSING
    for name in ("light_deg.pt", "open_clip_pytorch_model.bin", "vae/config.json",
                 "vae/diffusion_pytorch_model.fp16.safetensors"):
        assert name in done.stderr
    assert done.stderr.count("expected size:") == done.stderr.count("put it at:") >= 4
    assert str(tmp_path / "cache" / "SherryX" / "STAR" / "I2VGen-XL-based" / "light_deg.pt") in done.stderr
    assert not (tmp_path / "out.mp4").exists()


def test_download_command_reports_missing_files_offline(tmp_path: Path, capsys) -> None:
    assert cli.main(["download", "--model", "heavy", "--offline", "--cache-dir", str(tmp_path)]) == \
        cli.EXIT_MODELS_MISSING
    err = capsys.readouterr().err
    assert "heavy_deg.pt" in err and err.count("note: gated repository") == 2
    assert list(tmp_path.iterdir()) == []


def test_progress_bars_follow_pipeline_events() -> None:
    from star_core.host import ProgressEvent

    progress = cli.Progress("clip.mp4", enabled=True)  # bars draw on the captured stderr
    progress(ProgressEvent("encode", 4, 12))
    progress(ProgressEvent("sample", 30, 84))  # 84 calls = 14 steps x 3 chunks x 2 (CFG)
    progress(ProgressEvent("sample", 36, 84, step=6, steps=14))
    progress(ProgressEvent("decode", 3, 12))
    bars = progress.bars
    assert (bars["encode"].n, bars["encode"].total) == (4, 12)
    assert (bars["sample"].n, bars["sample"].total) == (36, 84)
    assert (bars["steps"].n, bars["steps"].total) == (6, 14)
    assert (bars["decode"].n, bars["decode"].total) == (3, 12)
    progress.close()
