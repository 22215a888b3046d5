"""Several ranks with torch.distributed (Gloo on this CPU machine, 1 thread per rank), launched by torchrun.

* two ranks give exactly the frames (and latents) of one process: the pipeline on a clip of 3 sampler chunks × 6
  diffusion tiles with VAE tiles and blended decode windows, the sampler over a 3-axis grid (chunks × rows ×
  columns; CFG in two calls, in one batch, and off), a single window (the CFG passes are shared then), and a run
  whose first evaluation runs out of memory on both ranks and is repeated with diffusion tiles (Replan);
* the CLI spreads a batch (diffusion tiles on): every video written once, the shared one identical to the
  one-process output;
* a rank killed mid-run ends the other within seconds with an error naming it, and no output file is left; a rank
  that hangs ends the run after the timeout, named.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from star_core.cli import write_demo_models
from star_core.distributed import Distributed, DistributedError, plan_batch
from star_core.frames import TensorSink, TensorSource
from star_core.host import HostContext
from star_core.pipeline import decode_to_sink, encode_lr, plan, prepare_lr
from star_core.seeds import RunNoise
from star_core.spec import DEFAULTS
from star_core.vae import load_svd_vae
from star_core.text.vocab import fetch_openclip_vocab
from star_core.video_io import read_frames, write_synthetic_clip

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
# ranks of the tiny models: 1 thread each, the worktree's star_core, no downloads
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(name, None)


def _run(command: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=ENV, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


# ---------------------------------------------------------------------------------------------- no processes

def test_items_are_owned_round_robin_and_cfg_passes_split_only_when_it_balances_better():
    single, two = Distributed(), Distributed(1, 2)
    assert [single.owner(k) for k in range(3)] == [0, 0, 0] and [two.owner(k) for k in range(5)] == [0, 1, 0, 1, 0]
    assert not single.active and two.active and not two.is_main
    assert two.split_passes(1, 2) and two.split_passes(3, 2)  # max calls 2 instead of 4 with 3 windows
    assert not two.split_passes(2, 2) and not two.split_passes(1, 1)
    assert not Distributed(0, 3).split_passes(3, 2) and Distributed(0, 4).split_passes(2, 2)
    got = single.exchange({0: torch.ones(2), 1: torch.zeros(1, 3)}, [(2,), (1, 3)], stage="x", what="test")
    assert [t.shape for t in got] == [(2,), (1, 3)]
    with pytest.raises(ValueError, match="must give items"):
        two.exchange({0: torch.ones(1)}, [(1,), (1,)], stage="x", what="test")


def test_batch_plan_processes_every_video_once_and_keeps_every_rank_busy():
    plan = plan_batch([5.0, 1.0, 3.0, 2.0, 4.0], 2)
    assert plan.shared == (0,)  # 5 mod 2 = 1 video shared: the largest
    assert sorted(plan.shared + plan.own[0] + plan.own[1]) == [0, 1, 2, 3, 4]
    assert plan.own == ((1, 4), (2, 3))  # largest first to the least loaded rank: 4+1 vs 3+2
    assert plan_batch([1.0], 3).shared == (0,) and plan_batch([1.0, 2.0], 1).own == ((0, 1),)


def test_a_failed_exchange_while_decoding_aborts_rank_0s_sink(fixtures_dir):
    """Rank 0 has begun writing when another rank fails: the sink is aborted, nothing half-written is kept."""
    vae = load_svd_vae(fixtures_dir / "vae_tiny.safetensors", config=fixtures_dir / "vae_tiny_config.json")

    class FailsInSecondRound(Distributed):
        def __init__(self):
            super().__init__(0, 2)
            self.rounds = 0

        def exchange(self, outputs, shapes, *, stage, what, to=None, **options):
            self.rounds += 1
            if self.rounds == 2:
                raise DistributedError(f"rank 0 stopped at {what}: rank 1 failed: boom")
            return [outputs[0]] + [torch.zeros(shape) for shape in shapes[1:]]

    class Sink(TensorSink):
        written = 0

        def write(self, frames):
            Sink.written += frames.shape[0]
            super().write(frames)

    frames = torch.rand(8, 8, 8, 3, generator=torch.Generator().manual_seed(3))
    spec = DEFAULTS.with_options({"output.scale": 2.0, "output.padding": "minimal", "decode.window": 2, "seed": 1})
    geometry = plan(TensorSource(frames).info, spec)
    latent = encode_lr(vae, prepare_lr(frames, scale=2, padding="minimal")[0], geometry, RunNoise(1))
    sink, work = Sink(), FailsInSecondRound()
    with pytest.raises(DistributedError, match="^rank 0 stopped at decode window 3-4 of 4: rank 1 failed: boom$"):
        decode_to_sink(vae, latent, geometry, TensorSource(frames), sink, spec, host=HostContext(distributed=work))
    assert Sink.written == 4 and sink.frames is None  # the first round (2 windows) was written, then aborted


# ------------------------------------------------------------------------------------------------- torchrun

def test_two_ranks_give_the_frames_and_latents_of_one_process(tmp_path: Path):
    worker = str(REPO / "tests" / "distributed_worker.py")
    _run([sys.executable, worker, str(tmp_path / "one.pt")], tmp_path)
    _run([*TORCHRUN, worker, str(tmp_path / "two.pt")], tmp_path)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["world"] == 1 and two["world"] == 2
    assert one["frames"].shape == (9, 20, 28, 3)
    for name in ("frames", "grid", "single", "batched", "unguided", "replanned"):
        assert torch.equal(one[name], two[name]), (name, (one[name] - two[name]).abs().max())
    # one out-of-memory error, on rank 1 only (the negative pass): rank 0 chose the smaller windows, once
    assert one["asked"] == [((1, 1, 1), "injected: window too large")]
    assert two["asked"] == [((1, 1, 1), "rank 1 ran out of memory at sampler evaluation 1")]
    # (with auto sizes, "control" carries the ranks' out-of-memory flags: 1 byte per rank and evaluation)
    assert one["traffic"] == {} and set(two["traffic"]) - {"control"} == {"encode", "sample", "decode"}
    assert two["sent"]["decode"] == 0  # rank 0 only receives decoded windows


def test_a_hung_rank_ends_the_run_after_the_timeout_naming_it(tmp_path: Path):
    started = time.monotonic()
    done = subprocess.run([*TORCHRUN, str(REPO / "tests" / "distributed_worker.py"), "--hang", "60"],
                          capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=120)
    assert done.returncode != 0 and time.monotonic() - started < 50  # the 4 s timeout, not the 60 s sleep
    assert "error: rank 0 stopped at test exchange 2: rank 1 (still at test exchange 1) did not get there within " \
           "4 s: it hangs" in done.stderr, done.stderr[-3000:]


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("dist_cli")
    write_demo_models(root / "models")
    inputs = root / "in"
    inputs.mkdir()
    for name, frames in (("a", 9), ("b", 5), ("c", 3)):
        write_synthetic_clip(inputs / f"{name}.mp4", frames=frames, width=32, height=24, fps=24)
    options = ["--comfy-models", str(root / "models"), "--model", str(root / "models/STAR/star_tiny.safetensors"),
               "--offline", "--tokenizer", str(fetch_openclip_vocab()), "--scale", "2", "--padding", "minimal",
               "--chunk-len", "4", "--chunk-overlap", "1", "--chunk-fusion", "hann", "--solver-mode", "normal",
               "--steps", "2", "--diffusion-tile", "48x32", "--decode-window", "2", "--decode-window-overlap", "1",
               "--codec", "ffv1", "--threads", "1"]
    return root, options


def _frames(path: Path) -> np.ndarray:
    return np.concatenate(list(read_frames(path, 64)))


def test_cli_batch_on_two_ranks_writes_every_video_once_and_the_shared_one_exactly(cli_setup):
    root, options = cli_setup
    cli = ["-m", "star_core", "upscale"]
    _run([sys.executable, *cli, str(root / "in" / "a.mp4"), "-o", str(root / "one" / "a.mkv"), "--quiet",
          *options], root)
    (root / "two").mkdir()
    (root / "two" / "b.mkv").write_bytes(b"done before")  # --skip-existing: done by an earlier run
    done = _run([*TORCHRUN, *cli, str(root / "in"), "-o", str(root / "two"), "--quiet", "--skip-existing",
                 *options], root)
    written = [line for line in done.stderr.splitlines() if " -> " in line]
    # a (9 frames) is shared by both ranks and written by rank 0, c goes whole to one rank, b is skipped once
    assert sorted(line.split()[2] for line in written) == [str(root / "in" / "a.mp4"), str(root / "in" / "c.mp4")]
    assert done.stderr.count("skip ") == 1 and "[rank 0] " + str(root / "in" / "a.mp4") in done.stderr
    assert sorted(p.name for p in (root / "two").iterdir()) == ["a.mkv", "b.mkv", "c.mkv"]
    assert (root / "two" / "b.mkv").read_bytes() == b"done before"
    assert np.array_equal(_frames(root / "one" / "a.mkv"), _frames(root / "two" / "a.mkv"))
    assert _frames(root / "two" / "c.mkv").shape == (3, 48, 64, 3)


def test_a_killed_rank_ends_the_other_with_an_error_naming_it_and_no_output(cli_setup):
    root, options = cli_setup
    out = root / "killed"
    command = [*TORCHRUN, "-m", "star_core", "upscale", str(root / "in" / "a.mp4"), "-o", str(out / "a.mkv"),
               *options, "--steps", "30"]
    launcher = subprocess.Popen(command, stderr=subprocess.PIPE, cwd=root, env=ENV)
    log: list[str] = []
    fd = launcher.stderr.fileno()
    reader = threading.Thread(target=lambda: log.extend(iter(lambda: os.read(fd, 4096).decode(errors="replace"), "")))
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while "steps:" not in "".join(log):  # rank 0's progress: the sampler runs on both ranks
            assert launcher.poll() is None and time.monotonic() < deadline, "".join(log)[-3000:]
            time.sleep(0.2)
        ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                 if p.environ().get("LOCAL_RANK") == "1"]
        assert len(ranks) == 1
        killed = time.monotonic()
        ranks[0].send_signal(signal.SIGKILL)
        launcher.wait(timeout=120)
        ended = time.monotonic() - killed
    finally:
        if launcher.poll() is None:
            launcher.kill()
        reader.join(timeout=10)
    stderr = "".join(log)
    assert launcher.returncode != 0
    # rank 0 either saw the connection drop or was stopped by torchrun first; either way it names rank 1
    errors = re.findall(r"error: \[rank 0\] rank 0 [^\n]*", stderr)  # (after the progress bars' escapes)
    assert len(errors) == 1 and "rank 1 stopped responding" in errors[0], stderr[-3000:]
    assert ended < 60
    assert not out.exists() or list(out.iterdir()) == []
