"""Memory after cancelled runs and after queued runs (issue #11, rows 15 and 16), with the tiny random models.

Each measurement is one fresh process; RSS is ``VmRSS`` after a ``gc.collect()``, in MB. ``MALLOC_MMAP_THRESHOLD_``
is 128 KiB (as in ``bench/streaming.py``), so freed tensors leave the RSS at once and the figures track live memory.

* ``cancel`` (row 15): loads the models once like the command line, runs the same video to the end twice (warm-up),
  then cancels runs while encoding, while sampling, while decoding and while writing (``KeyboardInterrupt``, what
  Ctrl-C raises, from the host's interrupt check or from the sink), three rounds, then one more full run. Each
  cancelled run must leave no file; the RSS after it is compared with the RSS after the warm-up runs.
* ``queue`` (row 16): the ComfyUI nodes on the test host stub (``tests/comfy_stub``), five queued runs alternating
  two checkpoints (model loader → LR encode → sampler → decode). Like ComfyUI's executor it keeps the previous
  run's outputs until the next run replaces them, and like ComfyUI's memory manager it holds models weakly. After
  each run: RSS and how many STAR networks are still alive *without* a garbage collection (ComfyUI warns of a
  leak when a model outlives its patcher that way).

    python bench/robustness.py                  # both tables
    python bench/robustness.py cancel --json    # one measurement as a JSON line (used by the tests)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

COMMON = r"""
import gc, json, sys, weakref
from pathlib import Path
import torch

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024

def settled():
    gc.collect()
    return rss_mb()
"""

CANCEL = COMMON + r"""
from star_core import cli, pipeline
from star_core.host import HostContext
from star_core.video_io import FileSource, VideoFileSink, write_synthetic_clip

work, models, vocab = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
rounds, frames, steps = (int(v) for v in sys.argv[4:7])
clip = write_synthetic_clip(work / "in.mp4", frames=frames, width=48, height=32)
out = work / "out" / "out.mp4"
args = cli.build_parser().parse_args(["upscale", str(clip), "-o", str(out), "--offline", "--comfy-models", str(models),
    "--model", str(models / "STAR" / "star_tiny.safetensors"), "--tokenizer", vocab, "--padding", "minimal",
    "--scale", "2", "--solver-mode", "normal", "--steps", str(steps), "--chunk-len", "4"])
spec = cli.spec_from_args(args)
torch.set_num_threads(1)
components = cli.load_components(args, spec, torch.device("cpu"))

at_cancel = []

def ctrl_c():
    at_cancel.append(rss_mb())  # what the run held when it was stopped
    raise KeyboardInterrupt

class Cancel:
    # Ctrl-C while `stage` runs: KeyboardInterrupt from the host's interrupt check, or from the sink's write
    def __init__(self, stage):
        self.stage, self.current = stage, None
    def progress(self, event):
        self.current = event.stage
    def interrupt(self):
        # the stage's first progress event follows its first check: this stops at the stage's second tile/call
        if self.stage is not None and self.current == self.stage:
            ctrl_c()

def run(stage=None):
    at_cancel.clear()
    cancel = Cancel(stage)
    source = FileSource(clip)
    sink = VideoFileSink(out, source=source, log=lambda m: None)
    if stage == "write":
        write = sink.write
        def failing(frames, written=[]):
            write(frames)
            written.append(1)
            if len(written) == 2:
                ctrl_c()
        sink.write = failing
    host = HostContext(progress=cancel.progress, interrupt=cancel.interrupt)
    try:
        pipeline.run(source, sink, spec, components, host)
        finished = True
    except KeyboardInterrupt:
        finished = False
    files = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
    if finished:
        out.unlink()
    return {"run": stage or "full", "finished": finished, "files_left": files if not finished else [],
            "rss_at_cancel_mb": at_cancel[0] if at_cancel else None, "rss_mb": settled()}

rows = [{"run": "models loaded", "finished": True, "files_left": [], "rss_at_cancel_mb": None, "rss_mb": settled()}]
rows += [run(), run()]
for _ in range(rounds):
    rows += [run(stage) for stage in ("encode", "sample", "decode", "write")]
rows.append(run())
print("BENCH_JSON " + json.dumps(rows))
"""

QUEUE = COMMON + r"""
sys.path.insert(0, sys.argv[3])
import harness
import comfy.model_management as mm
from star_core.tiny_models import write_tree

models = Path(sys.argv[1])
write_tree(models, ["star", "vae_tiny"])
second = write_tree(Path(sys.argv[2]), ["star"], seed=11)["star"]
second.rename(models / "STAR" / "star_tiny_b.safetensors")
torch.set_num_threads(1)
nodes = harness.node_classes(harness.load_pack(models))
run = harness.run
g = torch.Generator().manual_seed(0)
positive = [[torch.randn(1, 77, 1024, generator=g), {}]]
negative = [[torch.randn(1, 77, 1024, generator=g), {}]]
frames = torch.rand(4, 24, 32, 3, generator=g)
(vae,) = run(nodes["STARVAELoader"], vae_name="svd_vae_tiny.safetensors")  # same input every run: cached
networks, previous, rows = [], None, [{"run": 0, "checkpoint": "-", "rss_mb": settled(), "alive": 0}]
for index, name in enumerate(["star_tiny.safetensors", "star_tiny_b.safetensors"] * 2 + ["star_tiny.safetensors"]):
    (model,) = run(nodes["STARModelLoader"], ckpt_name=name, weight_dtype="auto")
    networks.append(weakref.ref(model.model))
    lr = run(nodes["STARLREncode"], vae=vae, images=frames, video=None, fps=24.0, scale=2.0, target_width=0,
             target_height=0, padding="minimal", posterior="sample", seed=666, tile=0, tile_overlap=32)[0]
    (latent,) = run(nodes["STARSampler"], star_model=model, positive=positive, negative=negative, lr_latent=lr,
                    solver_mode="normal", steps=2, cfg=7.5, rescale=0.2, denoise=1.0, chunk_length=4,
                    chunk_overlap=-1, fusion="linear")
    (images,) = run(nodes["STARTiledVAEDecode"], samples=latent, vae=vae, tile=0, tile_overlap=64, temporal_window=3,
                    temporal_overlap=0)
    previous = (model, lr, latent, images)  # the executor's cache: this run's outputs replace the last run's
    del model, lr, latent, images
    mm.loaded.clear()  # ComfyUI's current_loaded_models holds models weakly (LoadedModel._model is a weakref)
    alive = sum(ref() is not None for ref in networks)  # no gc.collect() yet: reference counting alone
    rows.append({"run": index + 1, "checkpoint": name, "alive": alive, "rss_mb": settled()})
print("BENCH_JSON " + json.dumps(rows))
"""


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072")}


def _driver(code: str, *argv: str) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=_env(), cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"driver failed ({done.returncode}):\n{done.stderr[-3000:]}")
    line = next(l for l in done.stdout.splitlines() if l.startswith("BENCH_JSON "))
    return json.loads(line.split(" ", 1)[1])


def measure_cancel(models: Path | None = None, rounds: int = 3, frames: int = 12, steps: int = 3) -> list[dict]:
    """Row 15: RSS after full and cancelled runs in one process (see the module docstring); a ``frames``-frame
    48x32 clip at x2, ``steps`` normal-mode steps with CFG, 4-frame chunks."""
    from star_core.cli import write_demo_models
    from star_core.text.vocab import fetch_openclip_vocab

    with tempfile.TemporaryDirectory(prefix="star_bench_") as tmp:
        work = Path(tmp)
        if models is None:
            models = work / "models"
            write_demo_models(models)
        return _driver(CANCEL, str(work), str(models), str(fetch_openclip_vocab()), str(rounds), str(frames),
                       str(steps))


def measure_queue() -> list[dict]:
    """Row 16: RSS and live STAR networks after each of 5 queued node runs alternating two checkpoints."""
    with tempfile.TemporaryDirectory(prefix="star_bench_") as tmp:
        return _driver(QUEUE, str(Path(tmp) / "models"), str(Path(tmp) / "second"), str(REPO / "tests" / "comfy_stub"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", choices=("cancel", "queue", "both"), default="both")
    parser.add_argument("--json", action="store_true", help="print one JSON line per measurement")
    parser.add_argument("--models", type=Path, help="the --demo-tiny models tree for 'cancel' (default: written)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the four cancelled runs for 'cancel'")
    args = parser.parse_args()
    if args.what in ("cancel", "both"):
        rows = measure_cancel(args.models, args.rounds)
        if args.json:
            print(json.dumps({"cancel": rows}))
        else:
            warm = rows[2]["rss_mb"]
            print("Row 15: cancelled runs (12 frames 48x32 -> x2, 3 steps, CFG, 4-frame chunks), one process")
            print("| # | run | finished | files left | RSS when stopped MB | RSS after MB | after vs warm full run MB |")
            print("|---:|---|---|---|---:|---:|---:|")
            for i, r in enumerate(rows):
                stopped = "-" if r["rss_at_cancel_mb"] is None else f"{r['rss_at_cancel_mb']:.1f}"
                print(f"| {i} | {r['run']} | {r['finished']} | {', '.join(r['files_left']) or '-'} | {stopped} | "
                      f"{r['rss_mb']:.1f} | {r['rss_mb'] - warm:+.1f} |")
    if args.what in ("queue", "both"):
        rows = measure_queue()
        if args.json:
            print(json.dumps({"queue": rows}))
        else:
            print("Row 16: 5 queued node runs alternating two checkpoints (host stub), one process")
            print("| run | checkpoint | STAR networks alive (no gc) | RSS MB | vs run 1 MB |")
            print("|---:|---|---:|---:|---:|")
            for r in rows:
                print(f"| {r['run']} | {r['checkpoint']} | {r['alive']} | {r['rss_mb']:.1f} | "
                      f"{r['rss_mb'] - rows[1]['rss_mb']:+.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
