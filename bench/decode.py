"""Peak memory and time of the SVD VAE decode, whole frames vs spatial tiles.

Each measurement runs in a fresh subprocess (so peak RSS is its own) with a tiny-width random SVD VAE
(``block_out_channels 32,32,64,64``, spatial factor 8) decoding one official 3-frame window. Usage::

    flock /tmp/star_heavy.lock .venv/bin/python bench/decode.py [--sizes 256 512 1024] [--tile 256 --overlap 32]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CONFIG = {"block_out_channels": [32, 32, 64, 64], "down_block_types": ["DownEncoderBlock2D"] * 4,
          "layers_per_block": 1, "latent_channels": 4}


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def worker(size: int, frames: int, tile: int, overlap: int, threads: int) -> dict:
    """Builds the VAE, decodes once, reports RSS before, peak RSS and seconds (tile 0 = untiled)."""
    import torch
    from diffusers import AutoencoderKLTemporalDecoder

    from star_core.vae import SpatialTiling, SVDVideoVAE

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    vae = SVDVideoVAE(AutoencoderKLTemporalDecoder(**CONFIG))
    latent = 0.2 * torch.randn(1, 4, frames, size // 8, size // 8)
    tiles = []
    vae.decode(torch.zeros(1, 4, 1, 8, 8))  # warm-up: one-time allocator/kernel set-up is not the decode's cost
    baseline = _rss_mib()
    start = time.perf_counter()
    out = vae.decode(latent, tiling=SpatialTiling(tile, overlap) if tile else None,
                     callback=lambda done, total: tiles.append(total))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    assert out.shape == (frames, 3, size, size)
    return {"size": size, "tile": tile, "overlap": overlap, "calls": tiles[-1], "baseline_mib": baseline,
            "peak_mib": peak, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024], help="output edge in pixels")
    parser.add_argument("--frames", type=int, default=3, help="frames to decode (3 = one official window)")
    parser.add_argument("--tile", type=int, default=256, help="tile edge in pixels for the tiled runs")
    parser.add_argument("--overlap", type=int, default=32, help="tile overlap in pixels")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--worker", type=int, nargs=2, metavar=("SIZE", "TILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.frames, args.worker[1], args.overlap, args.threads)))
        return
    print(f"SVD VAE decode, tiny width {CONFIG['block_out_channels']}, {args.frames} frames, CPU, "
          f"{args.threads} threads")
    print("| output | tiling | decoder calls | peak RSS (MiB) | decode RSS growth (MiB) | time (s) |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        for tile in (0, args.tile):
            command = [sys.executable, __file__, "--worker", str(size), str(tile), "--frames", str(args.frames),
                       "--overlap", str(args.overlap), "--threads", str(args.threads)]
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            label = f"{tile} px / {args.overlap} px" if tile else "none"
            print(f"| {size}² | {label} | {result['calls']} | {result['peak_mib']:.0f} | "
                  f"{result['peak_mib'] - result['baseline_mib']:.0f} | {result['seconds']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
