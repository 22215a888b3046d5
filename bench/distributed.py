"""Distributed sampling benchmark: 1 rank vs N ranks (torchrun, Gloo on CPU / NCCL on GPUs) on the same run.

``python bench/distributed.py`` prints the table for the tiny random model and the released-size one (2.04 B
random parameters, bf16 weights computed in fp32: 4.1 GB per rank; run it under ``flock /tmp/star_heavy.lock`` on a
shared machine), 1 thread per rank; ``--ranks 1 2 4`` on a machine with more cores or GPUs (``--device cuda``: one
GPU per rank). ``--worker`` is one measurement in this process (started by the table, alone or under torchrun).

Per configuration: the sampler's wall seconds per step (median over the steps; every rank does its share of the
windows, then the predictions are exchanged), the bytes each rank receives and sends per step, the seconds per step
a rank spends waiting in the exchange (transfer plus waiting for slower ranks), the speed-up over 1 rank, and a
check that the N-rank latent equals the 1-rank one bit for bit.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from star_core.diffusion import SamplerSettings, sample_star  # noqa: E402
from star_core.diffusion.star_sampling import model_passes, network_levels, plan_evaluations  # noqa: E402
from star_core.distributed import Distributed  # noqa: E402
from star_core.model import STARConfig, STARUNet  # noqa: E402
from star_core.pipeline import model_function  # noqa: E402
from star_core.tiny_models import TINY_STAR, star_weights  # noqa: E402

# latent [1,4,F,h,w] and sampler of each model size: 2 chunks of 4 frames (overlap 1) x diffusion tiles (tiny: 2 rows
# x 2 columns of 10x16 latent cells; full: 3 columns of 10x8, the released network's size rule) x 2 CFG passes
CONFIGS = {
    "tiny": dict(frames=7, hw=(18, 24), steps=4, chunk_len=4, overlap=1, tile=(80, 128), tile_overlap=None),
    "full": dict(frames=7, hw=(10, 16), steps=1, chunk_len=4, overlap=1, tile=(80, 64), tile_overlap=16),
}


def build_model(kind: str, device: torch.device) -> STARUNet:
    """The tiny network or the released-size one (bf16 weights, fp32 compute), random weights, on ``device``."""
    if kind == "full":
        from forward import random_model  # bench/forward.py: fills the 2 B weights in place

        return random_model(torch.bfloat16, torch.float32).to(device)
    model = STARUNet(STARConfig(**TINY_STAR))
    model.load_state_dict(star_weights(seed=0))
    return model.eval().requires_grad_(False).to(device)


def worker(kind: str, device: str, threads: int) -> dict | None:
    """One run of the sampler on this rank; rank 0 returns the measurements."""
    torch.set_num_threads(threads)
    work = Distributed.from_env(device)
    with work.guard():
        config = CONFIGS[kind]
        model = build_model(kind, work.device)
        g = torch.Generator().manual_seed(1)
        shape = (1, 4, config["frames"], *config["hw"])
        lr, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        positive, negative = torch.randn(1, 77, 1024, generator=g), torch.randn(1, 77, 1024, generator=g)
        settings = SamplerSettings(mode="normal", steps=config["steps"], chunk_len=config["chunk_len"],
                                   overlap=config["overlap"], fusion="linear", tile=config["tile"],
                                   tile_overlap=config["tile_overlap"])
        stamps = [time.perf_counter()]

        def on_step(step, steps, x, x0):
            if work.device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        latent = sample_star(model_function(model), lr.to(work.device), positive.to(work.device),
                             negative.to(work.device), settings, start_noise=noise.to(work.device), brownian=7,
                             callback=on_step, work=work)
        if not work.is_main:
            return None
        steps = len(stamps) - 1
        grid = plan_evaluations(shape, settings, network_levels(model))
        windows = len(grid)
        return {"model": kind, "ranks": work.world_size, "device": str(work.device), "latent": list(shape),
                "windows": windows, "grid": list(grid.shape), "calls_per_step": windows * model_passes(settings.cfg, settings.batch_cfg),
                "step_s": statistics.median(b - a for a, b in zip(stamps, stamps[1:])),
                "received_per_step": work.traffic.get("sample", 0) / steps,
                "sent_per_step": work.sent.get("sample", 0) / steps,
                "wait_per_step_s": work.waited.get("sample", 0.0) / steps,
                "latent_sha1": hashlib.sha1(latent.cpu().numpy().tobytes()).hexdigest()}


def run_config(kind: str, ranks: int, device: str, threads: int) -> dict:
    """One measurement in fresh processes (torchrun for more than one rank)."""
    launcher = [sys.executable] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    command = [*launcher, __file__, "--worker", kind, "--device", device, "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{kind} on {ranks} rank(s) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=sorted(CONFIGS), help="one measurement in this process")
    parser.add_argument("--models", nargs="+", choices=sorted(CONFIGS), default=["tiny", "full"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--device", default="cpu", help="cpu (Gloo) or cuda (NCCL, one GPU per rank)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of every configuration, alternating 1 rank and N ranks; the median is printed "
                             "(a loaded machine drifts)")
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker, args.device, args.threads)
        if result is not None:
            print(json.dumps(result), flush=True)
        return 0
    print(f"STAR sampler on 1 vs N ranks, {args.device}, {args.threads} thread(s) per rank, median of {args.repeats} "
          "run(s); per step: every rank runs its windows' (chunks x diffusion tiles) network calls, then every window's "
          "positive and negative v (fp32) are all-gathered")
    print("| model | latent | chunks x rows x cols | calls/step | ranks | s/step | speed-up | received/rank/step | sent/rank/step "
          "| exchange wait s/step | latent = 1 rank |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind in args.models:
        runs: dict[int, list[dict]] = {ranks: [] for ranks in args.ranks}
        for _ in range(args.repeats):
            for ranks in args.ranks:
                runs[ranks].append(run_config(kind, ranks, args.device, args.threads))
        base = None
        for ranks in args.ranks:
            r = dict(runs[ranks][0], step_s=statistics.median(run["step_s"] for run in runs[ranks]),
                     wait_per_step_s=statistics.median(run["wait_per_step_s"] for run in runs[ranks]))
            if len({run["latent_sha1"] for run in runs[ranks]}) != 1:
                r["latent_sha1"] = "differs between repeats"
            base = base or r
            same = "yes" if r["latent_sha1"] == base["latent_sha1"] else "NO"
            latent = "x".join(str(n) for n in r["latent"][2:])
            grid = "x".join(str(n) for n in r["grid"])
            print(f"| {kind} | {latent} | {grid} | {r['calls_per_step']} | {ranks} | {r['step_s']:.3f} "
                  f"| {base['step_s'] / r['step_s']:.2f}x | {_mib(r['received_per_step'])} "
                  f"| {_mib(r['sent_per_step'])} | {r['wait_per_step_s']:.3f} | {same} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
