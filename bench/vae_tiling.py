"""Exact vs fast spatial tiling of the SVD VAE against the untiled network: max |Δ|, time, peak memory.

A full-width random SVD VAE (``block_out_channels 128,256,512,512``, 2 layers per block: the released
architecture, weights from `star_core.tiny_models.svd_vae_weights`) encodes one frame (STAR encodes frame by frame)
and decodes one official 3-frame window, untiled, with fast tiles (independent, feathered) and with exact tiles.
Every measurement runs in a fresh subprocess, so peak RSS is its own; outputs are kept in ``--work`` and compared
with the untiled one there (an untiled output already in ``--work`` is reused, so parts can run separately).
Usage::

    flock /tmp/star_heavy.lock .venv/bin/python bench/vae_tiling.py [--size 512] [--tile 256] [--parts encode decode]

The exact and fast runs use the same number of tiles: fast tiles are ``tile + overlap`` wide. A last table gives,
from the geometry alone, what exact tiling parks and moves at larger frames (``--cost-only`` prints just that).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's star_core, not an installed one

WIDTHS = (128, 256, 512, 512)
LAYERS = 2


def _rss_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, MiB."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _reset_peak() -> None:
    """Linux: return freed heap to the system (else the measured call reuses it unseen), then restart the peak-RSS
    counter, so the peak is the measured call's (not the model set-up's)."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def _inputs(part: str, size: int, frames: int):
    import torch

    g = torch.Generator().manual_seed(0)
    if part == "encode":  # a smooth scene plus texture, in [-1, 1]
        ramp = torch.linspace(-0.8, 0.8, size)
        scene = ramp[None, None, :, None] * ramp[None, None, None, :] + 0.3 * torch.sin(ramp * 9)[None, None, None, :]
        return (scene.expand(1, 3, size, size) + 0.2 * torch.rand(1, 3, size, size, generator=g)).clamp(-1, 1)
    return torch.randn(1, 4, frames, size // 8, size // 8, generator=g)  # a scaled latent (unit variance)


def worker(part: str, mode: str, size: int, frames: int, tile: int, overlap: int, park: str, threads: int,
           out: str) -> dict:
    """Builds the VAE, runs one encode or decode, saves the output; reports seconds, steps and peak RSS."""
    import torch
    from safetensors.torch import save_file

    from star_core.tiny_models import svd_vae_weights
    from star_core.vae import SpatialTiling, SVDVideoVAE, build_vae

    torch.set_num_threads(threads)
    vae = SVDVideoVAE(build_vae(svd_vae_weights(WIDTHS, LAYERS, seed=0)))
    tiling = None
    if mode == "fast":
        tiling = SpatialTiling(tile + overlap, overlap, "fast")
    elif mode == "exact":
        tiling = SpatialTiling(tile, 0, "exact", park)
    x = _inputs(part, size, frames)
    run = ((lambda t, cb: vae.posterior(x[0:1], tiling=t, callback=cb)[0]) if part == "encode"
           else (lambda t, cb: vae.decode(x, tiling=t, callback=cb)))
    # warm-up on a small input (one-time allocator/kernel set-up is not the measured call's cost)
    small = SpatialTiling(16, 0, mode, park) if mode == "exact" else tiling and SpatialTiling(24, 8, "fast")
    if part == "encode":
        vae.posterior(x[:, :, :32, :32], tiling=small)
    else:
        vae.decode(x[:, :, :, :4, :4], tiling=small)
    steps = []
    _reset_peak()
    baseline = _rss_mib("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    result = run(tiling, lambda done, total: steps.append(total))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = _rss_mib("VmHWM")
    save_file({"out": result.contiguous()}, out)
    return {"seconds": seconds, "cpu": cpu, "steps": steps[-1] if steps else 0, "baseline_mib": baseline,
            "peak_mib": peak}


def cost_table(sizes: list[str], tile: int, frames: int) -> None:
    """Geometry only (the model is built on the meta device): what exact tiling parks and moves per call."""
    import torch
    from diffusers import AutoencoderKLTemporalDecoder

    from star_core.vae.exact import TileGrid, decoder_program, encoder_program, parking_cost

    with torch.device("meta"):
        model = AutoencoderKLTemporalDecoder(down_block_types=("DownEncoderBlock2D",) * len(WIDTHS),
                                             block_out_channels=WIDTHS, layers_per_block=LAYERS)
    programs = {"encode": (encoder_program(model), 1), "decode": (decoder_program(model), frames)}
    print(f"\nExact tiling, what parking costs (geometry of the released architecture, tile {tile} px, encode 1 "
          f"frame, decode {frames} frames; fp32 / fp16-autocast bytes; transfer at 25 GB/s ≈ PCIe 4.0 x16 pinned, "
          "pageable memory is slower):")
    print("| part | frame | tiles | parked peak (GiB) | host↔device traffic with park=host (GiB) | transfer time "
          "(s) | largest tile step (MiB) | attention keys+values (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for size in sizes:
        height, width = (int(v) for v in size.split("x"))
        grid = TileGrid.plan(-(-height // 8), -(-width // 8), tile // 8)
        for part, (program, count) in programs.items():
            full, half = parking_cost(program, grid, count, 4), parking_cost(program, grid, count, 2)
            print(f"| {part} | {height}×{width} | {len(grid)} | {full.parked_peak / 2**30:.2f} / "
                  f"{half.parked_peak / 2**30:.2f} | {full.traffic / 2**30:.1f} / {half.traffic / 2**30:.1f} | "
                  f"{full.traffic / 25e9:.1f} / {half.traffic / 25e9:.1f} | {full.tile_peak / 2**20:.0f} | "
                  f"{full.keys_values / 2**20:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="frame edge in pixels (encode input, decode output)")
    parser.add_argument("--frames", type=int, default=3, help="decode window frames (3 = the official window)")
    parser.add_argument("--tile", type=int, default=256, help="exact tile edge in pixels (fast: tile + overlap)")
    parser.add_argument("--overlap", type=int, default=32, help="fast tiles' overlap in pixels")
    parser.add_argument("--park", default="auto", choices=("auto", "device", "host"), help="exact mode parking")
    parser.add_argument("--parts", nargs="+", default=["encode", "decode"], choices=("encode", "decode"))
    parser.add_argument("--modes", nargs="+", default=["untiled", "fast", "exact"],
                        choices=("untiled", "fast", "exact"))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--work", default=None, help="folder for the outputs (default: a temporary folder)")
    parser.add_argument("--cost-sizes", nargs="*", default=["512x512", "1088x1920", "2160x3840"],
                        help="frames (HxW) for the parking-cost table (geometry only; none to skip)")
    parser.add_argument("--cost-tile", type=int, default=512, help="tile edge for the parking-cost table")
    parser.add_argument("--cost-only", action="store_true", help="print the parking-cost table only")
    parser.add_argument("--worker", nargs=3, metavar=("PART", "MODE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        part, mode, out = args.worker
        print(json.dumps(worker(part, mode, args.size, args.frames, args.tile, args.overlap, args.park,
                                args.threads, out)))
        return

    if args.cost_only:
        cost_table(args.cost_sizes, args.cost_tile, args.frames)
        return
    from safetensors.torch import load_file

    from star_core.vae import SpatialTiling
    from star_core.vae.exact import TileGrid
    from star_core.vae.tiled import spatial_grid

    work = Path(args.work or tempfile.mkdtemp(prefix="vae_tiling_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"SVD VAE, random full width {list(WIDTHS)} x {LAYERS} layers, fp32, CPU, {args.threads} threads; "
          f"{args.size}² px; decode = one window of {args.frames} frames; tiles: exact {args.tile} px "
          f"(park {args.park}), fast {args.tile + args.overlap} px / overlap {args.overlap} px")
    print("| part | tiling | tiles | progress steps | wall (s) | CPU (s) | peak RSS (MiB) | RSS growth (MiB) | "
          "max abs Δ vs untiled | mean abs Δ | max Δ / output std |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    latent = args.size // 8
    for part in args.parts:
        key = f"{part}_{args.size}_{args.frames}"
        reference_file = work / f"{key}_untiled.safetensors"
        for mode in args.modes:
            out = work / f"{key}_{mode}.safetensors"
            report = out.with_suffix(".json")
            if not (mode == "untiled" and out.exists() and report.exists()):  # an untiled run is reused
                command = [sys.executable, __file__, "--worker", part, mode, str(out), "--size", str(args.size),
                           "--frames", str(args.frames), "--tile", str(args.tile), "--overlap", str(args.overlap),
                           "--park", args.park, "--threads", str(args.threads)]
                report.write_text(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            result = json.loads(report.read_text())
            delta = "— | — | —"
            if mode != "untiled" and reference_file.exists():
                output, reference = load_file(str(out))["out"], load_file(str(reference_file))["out"]
                error = (output - reference).abs()
                delta = f"{error.max():.2e} | {error.mean():.2e} | {error.max() / reference.std():.1e}"
            if mode == "untiled":
                label, tiles = "none", 1
            elif mode == "fast":
                tile = args.tile + args.overlap
                grid = spatial_grid(latent, latent, SpatialTiling(tile, args.overlap, "fast"), 8, (2, 3))
                label, tiles = f"fast {tile}/{args.overlap}", len(grid)
            else:
                grid = TileGrid.plan(latent, latent, args.tile // 8)
                label, tiles = f"exact {args.tile}, park {args.park}", len(grid)
            print(f"| {part} | {label} | {tiles} | {result['steps']} | {result['seconds']:.1f} | {result['cpu']:.1f} | "
                  f"{result['peak_mib']:.0f} | {result['peak_mib'] - result['baseline_mib']:.0f} | {delta} |",
                  flush=True)
    print(f"(outputs in {work})")
    if args.cost_sizes:
        cost_table(args.cost_sizes, args.cost_tile, args.frames)


if __name__ == "__main__":
    main()
