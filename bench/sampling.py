"""Sampling benchmark: seconds per model evaluation and peak RSS versus frame count at a fixed chunk length, and a
chunk-fusion study (deviation from an unchunked run and seam jumps) that picked the default fusion.

``python bench/sampling.py`` (tiny random model), ``--model full`` (released size, random weights, 8.2 GB fp32;
run under ``flock /tmp/star_heavy.lock``), ``--fusion-study``. Every measurement runs in a fresh subprocess so that
``ru_maxrss`` is that configuration's own peak.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from star_core.diffusion import SamplerSettings, plan_chunks, sample_star
from star_core.model import STARConfig, STARUNet
from star_core.tiny_models import TINY_STAR, star_weights

LATENT_HW = {"tiny": (18, 24), "full": (18, 24)}


def build_model(kind: str) -> STARUNet:
    """The tiny fixture-sized network or the released-size one, random weights, eval mode."""
    if kind == "full":
        from forward import random_model  # bench/forward.py: fills the 2 B weights in place

        return random_model(torch.float32, torch.float32)
    model = STARUNet(STARConfig(**TINY_STAR))
    model.load_state_dict(star_weights(seed=0))
    return model.eval().requires_grad_(False)


def _inputs(frames: int, hw: tuple[int, int], seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    lr = torch.randn(1, 4, frames, *hw, generator=g)
    noise = torch.randn(1, 4, frames, *hw, generator=g)
    positive, negative = torch.randn(1, 77, 1024, generator=g), torch.randn(1, 77, 1024, generator=g)
    return lr, noise, positive, negative


def _counted(model: STARUNet, calls: list[int]):
    def model_fn(x, t, context, hint):
        calls.append(x.shape[2])
        return model(x, t, context, hint)

    return model_fn


def measure(kind: str, frames: int, settings: SamplerSettings) -> dict:
    """One sampling run in this process: wall time, evaluations and peak RSS."""
    model = build_model(kind)
    lr, noise, positive, negative = _inputs(frames, LATENT_HW[kind])
    window = min(frames, settings.chunk_len)
    with torch.no_grad():  # warm-up call: one-time allocator/kernel setup stays out of the timing
        model(lr[:, :, :window], torch.tensor([899]), positive, lr[:, :, :window])
    calls: list[int] = []
    start = time.perf_counter()
    sample_star(_counted(model, calls), lr, positive, negative, settings, start_noise=noise, brownian=0)
    seconds = time.perf_counter() - start
    chunks = len(plan_chunks(frames, settings.chunk_len, settings.overlap, settings.fusion))
    return {"model": kind, "F": frames, "chunk_len": settings.chunk_len, "chunks": chunks, "evals": len(calls),
            "seconds": seconds, "s_per_eval": seconds / len(calls),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def fusion_study(frames: int, chunk_len: int, steps: int) -> list[dict]:
    """Chunked runs of the tiny model against the unchunked run of the same inputs and noise.

    ``dev`` = RMS(chunked - unchunked) / RMS(unchunked) of the final latent. With ``d_f = RMS(x[f+1] - x[f])`` and
    ``q_f = d_f(chunked) / d_f(unchunked) - 1`` (extra frame-to-frame change): ``seam`` = max q_f (the worst jump),
    ``flicker`` = mean q_f.
    """
    model = build_model("tiny")
    lr, noise, positive, negative = _inputs(frames, (6, 8), seed=2)

    def run(fusion: str, length: int, overlap: int | None) -> tuple[torch.Tensor, int]:
        calls: list[int] = []
        settings = SamplerSettings(mode="normal", steps=steps, chunk_len=length, overlap=overlap, fusion=fusion)
        out = sample_star(_counted(model, calls), lr, positive, negative, settings, start_noise=noise, brownian=3)
        return out, sum(calls)

    def frame_diffs(x: torch.Tensor) -> torch.Tensor:
        return (x[:, :, 1:] - x[:, :, :-1]).pow(2).mean(dim=(0, 1, 3, 4)).sqrt()

    ref, ref_frames = run("official", frames, None)
    ref_diffs = frame_diffs(ref)
    rows = []
    half = chunk_len // 2
    for fusion, overlap in (("official", None), ("linear", half), ("hann", half), ("linear", chunk_len // 4),
                            ("hann", chunk_len // 4)):
        out, evaluated = run(fusion, chunk_len, overlap)
        plan = plan_chunks(frames, chunk_len, overlap, fusion)
        rows.append({
            "fusion": fusion, "overlap": plan.spans[0][1] - plan.spans[1][0], "chunks": len(plan),
            "frame_evals_vs_unchunked": evaluated / ref_frames,
            "dev": ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item(),
            "seam": (frame_diffs(out) / ref_diffs - 1).max().item(),
            "flicker": (frame_diffs(out) / ref_diffs - 1).mean().item(),
        })
    return rows


def _subprocess(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, *args, "--json"], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"measurement {args} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--frames", type=int, nargs="+", default=None, help="default: 8 16 32 64 (full: 8 16 32)")
    parser.add_argument("--chunk-len", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="normal-mode steps (default: tiny 2, full 1)")
    parser.add_argument("--unchunked", action="store_true", help="add an unchunked run at the largest F")
    parser.add_argument("--fusion-study", action="store_true")
    parser.add_argument("--json", action="store_true", help="measure one configuration, print one JSON line")
    args = parser.parse_args()
    if args.fusion_study:
        rows = fusion_study(frames=32, chunk_len=8, steps=args.steps or 6)
        print("| fusion | overlap | chunks | frame-evals vs unchunked | dev (rel. RMS) | seam (max q) | flicker (mean q) |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['fusion']} | {r['overlap']} | {r['chunks']} | {r['frame_evals_vs_unchunked']:.2f} | "
                  f"{r['dev']:.4f} | {r['seam']:+.4f} | {r['flicker']:+.4f} |")
        return
    steps = args.steps or (1 if args.model == "full" else 2)
    if args.json:
        settings = SamplerSettings(mode="normal", steps=steps, chunk_len=args.chunk_len)
        print(json.dumps(measure(args.model, args.frames[0], settings)))
        return
    frames = args.frames or ([8, 16, 32] if args.model == "full" else [8, 16, 32, 64])
    runs = [(f, args.chunk_len) for f in frames] + ([(max(frames), max(frames))] if args.unchunked else [])
    print(f"model={args.model} latent={LATENT_HW[args.model]} mode=normal steps={steps} CFG two-pass, "
          f"fusion default, torch threads={torch.get_num_threads()}")
    print("| F | chunk_len | chunks | evals | total s | s / eval | s / (eval·frame) | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for f, length in runs:
        r = _subprocess(["--model", args.model, "--frames", str(f), "--chunk-len", str(length), "--steps", str(steps)])
        per_frame = r["seconds"] / (r["evals"] * min(length, f))
        print(f"| {f} | {length} | {r['chunks']} | {r['evals']} | {r['seconds']:.1f} | {r['s_per_eval']:.3f} | "
              f"{per_frame:.4f} | {r['peak_rss_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
