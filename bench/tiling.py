"""Spatially tiled diffusion: how far tiles move the result, and what they cost or save at high resolution.

``python bench/tiling.py --study`` — the tiny random model (fixture architecture), a full fast-mode sampling run
(14 evaluations, CFG 7.5 + rescale 0.2) on a latent ``[1,4,4,18,24]``, tiled vs untiled: max|Δ| and relative RMS
of the sampled latent for 2×2 tiles with each blend and a few overlaps.

``python bench/tiling.py --flops`` — the work of one released-size forward of one frame, untiled against 2×2
tiles, counted on ``meta`` (no weights, no time): total GFLOP and the attention matmuls' share, from 528×896 px to
4K. Attention grows with the square of a frame's tokens, everything else linearly, so tiles pay for their overlap
only at high resolution.

``python bench/tiling.py --forward`` — the released-size network (2.04 B random fp32 weights, 8.2 GB) on one frame
of a large latent: one untiled forward against the 2×2 tiles that
:func:`star_core.diffusion.star_sampling.plan_evaluations` cuts (the sum of the tile forwards), each in a fresh
process: seconds (median of ``--repeats``, after a warm-up forward on a small latent) and peak RSS. Run it under
``flock /tmp/star_heavy.lock`` on a shared machine. ``--measure untiled|tiled --json`` measures one configuration
in this process.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from star_core.diffusion import SamplerSettings, sample_star
from star_core.diffusion.star_sampling import network_levels, plan_evaluations
from star_core.model import STARConfig, STARUNet
from star_core.tiny_models import TINY_STAR, star_weights

STUDY_LATENT = (1, 4, 4, 18, 24)
# (tile px, overlap px) giving 2x2 tiles of the 18x24 latent under the tiny network's size rule (H ≡ 2, W ≡ 0 mod 4):
# 10x16 cells overlapping by 2x8, and 14x20 cells overlapping by 10x16
STUDY_TILES = (((80, 128), None), ((112, 160), None))
FORWARD_LATENT = (66, 112)  # 528x896 px, valid for the released network (H ≡ 2, W ≡ 0 mod 8)
FORWARD_TILE = ((336, 512), 64)  # 2x2 tiles of 42x64 latent cells
# (label, latent (h, w), tile px) for the FLOP table: 2x2 tiles of each, overlapping by 64 px or more
FLOP_SIZES = (("528x896", (66, 112), (336, 512)), ("720p", (90, 160), (432, 704)),
              ("1080p", (138, 240), (624, 1024)), ("4K", (274, 480), (1168, 1984)))


def tiny_model() -> STARUNet:
    model = STARUNet(STARConfig(**TINY_STAR))
    model.load_state_dict(star_weights(seed=0))
    return model.eval().requires_grad_(False)


def study() -> list[dict]:
    """Tiny model, fast mode: every 2x2 tiling against the untiled run of the same inputs and noise."""
    model = tiny_model()
    g = torch.Generator().manual_seed(2)
    lr, noise = torch.randn(STUDY_LATENT, generator=g), torch.randn(STUDY_LATENT, generator=g)
    width = model.config.context_dim
    positive, negative = torch.randn(1, 77, width, generator=g), torch.randn(1, 77, width, generator=g)
    base = SamplerSettings()
    untiled = sample_star(model, lr, positive, negative, base, start_noise=noise, brownian=3)
    def row(out: torch.Tensor, **labels) -> dict:
        return {**labels, "max_abs": (out - untiled).abs().max().item(),
                "rel_rms": ((out - untiled).pow(2).mean().sqrt() / untiled.pow(2).mean().sqrt()).item(),
                "ref_max": untiled.abs().max().item()}

    # the scale of the differences: the untiled run with another Brownian seed is another sample
    other = sample_star(model, lr, positive, negative, base, start_noise=noise, brownian=4)
    rows = [row(other, blend="untiled, other SDE seed", tile="-", grid="1x1", overlap="-")]
    for blend in ("linear", "hann"):
        for tile, overlap in STUDY_TILES:
            settings = dataclasses.replace(base, tile=tile, tile_overlap=overlap, tile_blend=blend)
            grid = plan_evaluations(STUDY_LATENT, settings, network_levels(model))
            out = sample_star(model, lr, positive, negative, settings, start_noise=noise, brownian=3)
            rows.append(row(out, blend=blend, tile="x".join(str(b - a) for a, b in grid.spans((0, 0, 0))[1:]),
                            grid="x".join(map(str, grid.shape[1:])),
                            overlap="x".join(str(ax.spans[0][1] - ax.spans[1][0]) for ax in grid.axes[1:])))
    return rows


def forward_flops(latent_hw: tuple[int, int], tile: tuple[int, int] | None) -> dict:
    """GFLOP of one released-size forward of one frame (all tiles' forwards when tiled), counted on ``meta``."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = STARUNet()
    shape = (1, 4, 1, *latent_hw)
    grid = plan_evaluations(shape, SamplerSettings(tile=tile, tile_overlap=64 if tile else None),
                            network_levels(model)).part((3, 4))
    total = attention = 0.0
    for index in grid.indices():
        with torch.device("meta"):
            x = grid.slice(torch.zeros(shape), index).contiguous()
            context = torch.zeros(1, 77, 1024)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(x, torch.tensor([899], device="meta"), context, x)
        counts = counter.get_flop_counts()["Global"]
        total += sum(counts.values()) / 1e9
        attention += sum(v for op, v in counts.items() if "bmm" in str(op)) / 1e9  # q·kᵀ and attn·v
    tiles = [tuple(b - a for a, b in grid.spans(index)) for index in grid.indices()]
    return {"tiles": len(tiles), "tile": "x".join(map(str, tiles[0])), "tokens": sum(h * w for h, w in tiles),
            "gflop": total, "attention_gflop": attention}


def flops_table() -> None:
    print("STAR full size, one forward of 1 frame, t=899, hint: work counted on meta (torch FlopCounterMode)")
    print("| frame (px) | latent | tiles | tile (latent) | tokens, summed | GFLOP | attention GFLOP | tiled / untiled |")
    print("|---|---|---|---|---|---|---|---|")
    for label, latent, tile in FLOP_SIZES:
        untiled = forward_flops(latent, None)
        for r in (untiled, forward_flops(latent, tile)):
            print(f"| {label} | {latent[0]}x{latent[1]} | {r['tiles']} | {r['tile']} | {r['tokens']} | "
                  f"{r['gflop']:.0f} | {r['attention_gflop']:.0f} ({r['attention_gflop'] / r['gflop']:.0%}) | "
                  f"{r['gflop'] / untiled['gflop']:.2f} |", flush=True)


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def measure_forward(kind: str, repeats: int) -> dict:
    """One full-size forward of one frame (untiled), or the forwards of its 2x2 tiles, in this process."""
    from forward import random_model  # bench/forward.py: fills the 2 B weights in place

    model = random_model(torch.float32, torch.float32)
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    rss_loaded = _peak_rss_gib()
    shape = (1, 4, 1, *FORWARD_LATENT)
    g = torch.Generator().manual_seed(1)
    x, hint = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    context = torch.randn(1, 77, 1024, generator=g)
    t = torch.tensor([899])
    (tile, overlap) = FORWARD_TILE
    settings = SamplerSettings(tile=tile if kind == "tiled" else None, tile_overlap=overlap if kind == "tiled" else None)
    grid = plan_evaluations(shape, settings, network_levels(model)).part((3, 4))
    times = []
    with torch.inference_mode():
        small = torch.randn(1, 4, 1, 18, 24, generator=g)
        model(small, t, context, small)  # warm-up (allocator, kernels) on a small latent
        for _ in range(repeats):
            start = time.perf_counter()
            for index in grid.indices():
                out = model(grid.slice(x, index).contiguous(), t, context, grid.slice(hint, index).contiguous())
                del out
            times.append(time.perf_counter() - start)
    tiles = [tuple(b - a for a, b in grid.spans(index)) for index in grid.indices()]
    return {"kind": kind, "tiles": len(tiles), "tile": "x".join(map(str, tiles[0])),
            "tokens": sum(h * w for h, w in tiles), "seconds": statistics.median(times), "peak_rss_gib": _peak_rss_gib(),
            "rss_loaded_gib": rss_loaded, "weights_gib": weights_gib}


def forward_table(repeats: int, threads: int) -> None:
    h, w = FORWARD_LATENT
    print(f"STAR full size (fp32), one forward of 1 frame at a {h}x{w} latent "
          f"({h * 8}x{w * 8} px), t=899, hint; {threads} threads; median of {repeats}; fresh process each")
    print("| run | model calls | tile (latent) | tokens per frame, summed | seconds | peak RSS GiB | "
          "RSS above loaded model GiB |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("untiled", "tiled"):
        cmd = [sys.executable, __file__, "--measure", kind, "--json", "--repeats", str(repeats),
               "--threads", str(threads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(f"| {kind} | failed: {done.stderr.strip().splitlines()[-1:]} ||||||")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {kind} | {r['tiles']} | {r['tile']} | {r['tokens']} | {r['seconds']:.1f} | "
              f"{r['peak_rss_gib']:.2f} | {r['peak_rss_gib'] - r['rss_loaded_gib']:.2f} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", action="store_true", help="tiny model: tiled vs untiled sampling")
    parser.add_argument("--flops", action="store_true", help="released size: forward GFLOP, untiled vs 2x2 tiles")
    parser.add_argument("--forward", action="store_true", help="released size: untiled vs 2x2 tiled forward")
    parser.add_argument("--measure", choices=("untiled", "tiled"), help="one forward configuration, in-process")
    parser.add_argument("--json", action="store_true", help="print one JSON line (with --measure)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure:
        result = measure_forward(args.measure, args.repeats)
        print(json.dumps(result) if args.json else result)
        return 0
    if args.study or not (args.forward or args.flops):
        print(f"tiny random STAR, fast mode (14 evaluations, CFG 7.5, rescale 0.2), latent {list(STUDY_LATENT)}; "
              "tiled vs untiled sampled latent")
        print("| blend | tiles | tile (latent) | overlap (latent) | max abs Δ | rel. RMS Δ | max abs untiled |")
        print("|---|---|---|---|---|---|---|")
        for r in study():
            print(f"| {r['blend']} | {r['grid']} | {r['tile']} | {r['overlap']} | {r['max_abs']:.4f} | "
                  f"{r['rel_rms']:.4f} | {r['ref_max']:.3f} |", flush=True)
    if args.flops:
        flops_table()
    if args.forward:
        forward_table(args.repeats, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
