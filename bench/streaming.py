"""Peak memory of a streaming run (``star_core.pipeline.run``) versus video length, with the tiny random models.

Each measurement is a fresh process on a generated clip. The driver parses the same options as the CLI
(``star_core.cli.build_parser``, ``spec_from_args``), loads the models once (``cli.load_components``), resets the
kernel's peak-RSS counter (``/proc/self/clear_refs``) and calls ``pipeline.run(FileSource, VideoFileSink, ...)``
directly: ``run peak`` is the peak of encode → sample → decode → write alone (model loading before it is the same
for every length). ``CLI peak`` is a second fresh process running the whole ``python -m star_core upscale``
command (``ru_maxrss`` of the child: models, prompts and the run). ``OMP_NUM_THREADS`` defaults to 1 and
``MALLOC_MMAP_THRESHOLD_`` to 128 KiB (see `measure`).

    python bench/streaming.py                       # table for 16, 64, 256 frames
    python bench/streaming.py --one 64 --json       # one measurement as a JSON line (used by the tests)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DRIVER = r"""
import json, resource, sys, time
from pathlib import Path
import torch
from star_core import cli, pipeline
from star_core.host import HostContext
from star_core.video_io import FileSource, VideoFileSink

def _status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":"))

args = cli.build_parser().parse_args(sys.argv[1:])
spec = cli.spec_from_args(args)
torch.set_num_threads(args.threads or 1)
components = cli.load_components(args, spec, torch.device("cpu"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
stats = {"stream_start_kb": _status("VmRSS")}
started = time.perf_counter()
pipeline.run(FileSource(args.inputs[0]), VideoFileSink(args.output), spec, components, HostContext())
stats["stream_seconds"] = time.perf_counter() - started
stats["stream_peak_kb"] = _status("VmHWM")
stats["process_peak_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("STREAM_STATS " + json.dumps(stats), file=sys.stderr)
"""

# The unmodified command, reporting the process's peak RSS when it exits.
CLI_DRIVER = r"""
import atexit, resource, sys
from star_core.cli import main
atexit.register(lambda: print("CLI_PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr))
sys.exit(main(sys.argv[1:]))
"""


def _env() -> dict:
    # Large blocks straight from mmap, so freed memory leaves the RSS at once: the peak then tracks live memory
    # instead of how much glibc happens to keep cached (which made repeated runs differ by ~100 MB).
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072")}


def measure(frames: int, *, width: int, height: int, scale: int, models: Path, work: Path,
            extra: list[str], cli_too: bool = True) -> dict:
    """Upscale a generated ``frames``-frame clip in fresh processes and return its memory/time figures."""
    from star_core.video_io import write_synthetic_clip

    clip = write_synthetic_clip(work / f"in_{frames}.mp4", frames=frames, width=width, height=height)
    out = work / f"out_{frames}.mp4"
    options = [str(clip), "-o", str(out), "--quiet", "--offline", "--comfy-models", str(models),
               "--model", str(models / "STAR" / "star_tiny.safetensors"), "--scale", str(scale), *extra]
    done = subprocess.run([sys.executable, "-c", DRIVER, "upscale", *options], capture_output=True, text=True,
                          env=_env())
    if done.returncode != 0:
        raise RuntimeError(f"upscale of {frames} frames failed ({done.returncode}):\n{done.stderr[-3000:]}")
    line = next(l for l in done.stderr.splitlines() if l.startswith("STREAM_STATS "))
    stats = json.loads(line.split(" ", 1)[1])
    row = {"frames": frames, **{k.replace("_kb", "_mb"): v / 1024 for k, v in stats.items() if k.endswith("_kb")},
           "stream_seconds": stats["stream_seconds"], "output": str(out)}
    if cli_too:
        done = subprocess.run([sys.executable, "-c", CLI_DRIVER, "upscale", *options, "-o", str(work / "cli.mp4")],
                              capture_output=True, text=True, env=_env())
        if done.returncode != 0:
            raise RuntimeError(f"CLI upscale of {frames} frames failed:\n{done.stderr[-3000:]}")
        line = next(l for l in done.stderr.splitlines() if l.startswith("CLI_PEAK_KB "))
        row["cli_peak_mb"] = int(line.split()[1]) / 1024
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--no-cli", action="store_true", help="measure pipeline.run only (skip the CLI process)")
    parser.add_argument("--one", type=int, help="measure one frame count only")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--models", type=Path, help="tiny models tree (default: written to a temp folder)")
    parser.add_argument("--sampler", default="--solver-mode normal --steps 2 --cfg 1 --chunk-len 8",
                        help="sampler options passed to the CLI (default: short, it is memory being measured)")
    args = parser.parse_args()
    frame_counts = [args.one] if args.one else args.frames
    extra = ["--padding", "minimal", "--threads", "1", *args.sampler.split()]
    with tempfile.TemporaryDirectory(prefix="star_bench_") as tmp:
        work = Path(tmp)
        models = args.models
        if models is None:
            from star_core.cli import write_demo_models

            models = work / "models"
            write_demo_models(models)
        rows = [measure(f, width=args.width, height=args.height, scale=args.scale, models=models, work=work,
                        extra=extra, cli_too=not args.no_cli) for f in frame_counts]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"input {args.width}x{args.height}, x{args.scale}, minimal padding, sampler: {args.sampler}")
    print("| frames | run start MB | run peak MB | run peak - start MB | driver process peak MB | CLI process peak MB "
          "| run s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['frames']} | {r['stream_start_mb']:.0f} | {r['stream_peak_mb']:.0f} | "
              f"{r['stream_peak_mb'] - r['stream_start_mb']:.0f} | {r['process_peak_mb']:.0f} | "
              f"{r.get('cli_peak_mb', float('nan')):.0f} | {r['stream_seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
