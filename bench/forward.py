"""Full-size STAR forward benchmark (random weights, CPU): median time of one UNet + ControlNet call and peak RSS.

``python bench/forward.py`` runs every configuration in a fresh subprocess and prints a table;
``python bench/forward.py --frames N [--weights bf16 --compute fp32] --json`` measures one configuration and prints
one JSON line. The GFLOP/s column sets the model's rate beside a plain 2048³ matmul measured in the same process, so
the efficiency can be read even on a loaded machine. Run it under ``flock /tmp/star_heavy.lock`` on a shared machine:
the fp32 model alone is 8.2 GB.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from star_core.model import STARUNet, cast_ops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (weights, compute, frames); pure-bf16 compute only where the CPU has native bf16 (else it is emulated, ~25x slower)
CONFIGS = (("fp32", "fp32", 4), ("fp32", "fp32", 8), ("bf16", "fp32", 4), ("bf16", "fp32", 8),
           ("bf16", "bf16", 4), ("bf16", "bf16", 8))
LATENT_HW = (18, 24)
OFFICIAL = {4: (5.6, 8.33), 8: (10.2, 8.44)}  # official code on this machine, fp32: seconds, peak RSS GB


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def random_model(dtype: torch.dtype, compute_dtype: torch.dtype) -> STARUNet:
    """Builds the released config on ``meta`` and fills each tensor in place (no second copy of the weights)."""
    ops = nn if compute_dtype == dtype else cast_ops
    model = STARUNet(operations=ops, device="meta", dtype=dtype, compute_dtype=compute_dtype).to_empty(device="cpu")
    norm_weights = {id(m.weight) for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # the fixture recipe's scales keep activations in a realistic range
            if id(p) in norm_weights:
                p.normal_(1.0, 0.1, generator=gen)
            elif p.ndim == 1:
                p.normal_(0.0, 0.05, generator=gen)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
    return model.eval().requires_grad_(False)


def matmul_gflops(n: int = 2048, repeats: int = 3) -> float:
    """This machine's fp32 GEMM rate right now (a reference for the model's rate, e.g. under load)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def forward_gflop(frames: int) -> float:
    """Floating-point work of one forward at this frame count, counted on ``meta`` (no memory, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = STARUNet()
        x = torch.zeros(1, 4, frames, *LATENT_HW)
        context = torch.zeros(1, 77, 1024)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x, torch.tensor([899], device="meta"), context, x)
    return counter.get_total_flops() / 1e9


def measure(frames: int, weights: str, compute: str, repeats: int = 3) -> dict[str, float]:
    """One configuration in this process: a warm-up call, then the median of ``repeats`` timed calls."""
    dtype = DTYPES[compute]
    model = random_model(DTYPES[weights], dtype)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    rss_loaded = _peak_rss_mb()
    gen = torch.Generator().manual_seed(1)
    h, w = LATENT_HW
    x = torch.randn(1, 4, frames, h, w, generator=gen).to(dtype)
    hint = torch.randn(1, 4, frames, h, w, generator=gen).to(dtype)
    context = torch.randn(1, 77, 1024, generator=gen).to(dtype)
    t = torch.tensor([899])
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            start = time.perf_counter()
            out = model(x, t, context, hint)
            if i:
                times.append(time.perf_counter() - start)
            del out
    return {"frames": frames, "weights": weights, "compute": compute, "seconds": statistics.median(times),
            "peak_rss_mb": _peak_rss_mb(), "weights_mb": weights_mb, "rss_after_init_mb": rss_loaded,
            "matmul_gflops": matmul_gflops()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, help="measure only this frame count (in this process)")
    parser.add_argument("--weights", choices=sorted(DTYPES), default="fp32", help="weight dtype (default fp32)")
    parser.add_argument("--compute", choices=sorted(DTYPES), help="compute dtype (default: the weight dtype)")
    parser.add_argument("--json", action="store_true", help="print one JSON line (with --frames)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.frames is not None:
        result = measure(args.frames, args.weights, args.compute or args.weights)
        print(json.dumps(result) if args.json else result)
        return 0
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"STAR full-size forward, latent [1,4,F,{LATENT_HW[0]},{LATENT_HW[1]}], t=899, hint, "
          f"{torch.get_num_threads()} threads, CPU capability {capability}")
    gflop = {frames: forward_gflop(frames) for frames in OFFICIAL}
    print("one forward: " + ", ".join(f"F={f}: {g:.0f} GFLOP" for f, g in gflop.items()))
    print("| weights | compute | F | seconds | vs official | GFLOP/s (plain matmul) | peak RSS GiB "
          "| RSS above weights GiB | weights GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for weights, compute, frames in CONFIGS:
        if compute == "bf16" and "AVX512" not in capability:
            print(f"| {weights} | {compute} | {frames} | skipped: no native bf16 on this CPU ({capability}) ||||||")
            continue
        cmd = [sys.executable, __file__, "--frames", str(frames), "--weights", weights, "--compute", compute, "--json",
               "--threads", str(torch.get_num_threads())]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(f"| {weights} | {compute} | {frames} | failed: {proc.stderr.strip().splitlines()[-1:]} ||||||")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        ratio = r["seconds"] / OFFICIAL[frames][0]
        rate = f"{gflop[frames] / r['seconds']:.0f} ({r['matmul_gflops']:.0f})"
        gib = {k: r[k] / 1024 for k in ("peak_rss_mb", "weights_mb")}
        print(f"| {weights} | {compute} | {frames} | {r['seconds']:.2f} | {ratio:.2f}x | {rate} "
              f"| {gib['peak_rss_mb']:.2f} | {gib['peak_rss_mb'] - gib['weights_mb']:.2f} | {gib['weights_mb']:.2f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
