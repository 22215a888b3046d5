"""Memory model of a STAR run: estimated peaks for large outputs, automatic plans, and checks against real memory.

``python bench/memory.py`` prints the estimated peak device memory (GiB) of the official settings (untiled,
32-frame chunks, 3-frame decode, fp16 UNet, everything resident) and of the plans `choose_plan` picks for 8, 12
and 24 GiB budgets, for 720x1280, 1080x1920 and 2160x3840 outputs of 32 and 100 frames.

``python bench/memory.py validate`` runs the real modules in fresh processes (random full-size weights, CPU) and
sets the estimate beside the measured peak RSS: three UNet + ControlNet forwards, the SVD VAE encoder and decoder,
and the sampler state with the Brownian tree. Minutes to tens of minutes; run it on a quiet machine.

``python bench/memory.py speed [--latent F H W] [--grid R C]`` times one full-size forward untiled against the same
latent in R x C tiles (the sum of the tile forwards), each in a fresh process.

``python bench/memory.py cuda`` (where a GPU is lent) sets the estimate beside ``torch.cuda.max_memory_allocated``
for fp16 forwards up to a 4K latent and the official fp16-autocast VAE decode.

``python bench/memory.py calibrate [--quick]`` measures the modules under FakeTensorMode + MemTracker, fits the
activation models, prints the fit error per point and the new ``star_core/memory/coefficients.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's star_core before an installed one

from star_core.geometry import pad_to_fit  # noqa: E402
from star_core.memory import GIB, Components, NoPlanFits, PlanSizes, choose_plan, estimate_peak  # noqa: E402
from star_core.memory.plan import OPENCLIP_H_TEXT_PARAMS  # noqa: E402

OUTPUTS = ((720, 1280), (1080, 1920), (2160, 3840))
FRAME_COUNTS = (32, 100)
BUDGETS_GIB = (8, 12, 24)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --- estimates -------------------------------------------------------------------------------------------------

def official_plan(frames: int, height: int, width: int) -> PlanSizes:
    """The official settings for an output of `height`x`width` (official padding): untiled, chunk 32 with the
    official windows, fp16 UNet, fp32 VAE weights and encode, fp16 (autocast) decode in 3-frame windows."""
    left, right, top, bottom = pad_to_fit(height, width)
    return PlanSizes(frames, (height + top + bottom) // 8, (width + left + right) // 8, chunk_len=32,
                     fusion="official", unet_dtype=torch.float16, vae_dtype=torch.float32,
                     encode_dtype=torch.float32, decode_dtype=torch.float16, decode_window=3)


# The official code keeps the fp32 text encoder resident; an auto run frees it after encoding the prompts.
OFFICIAL_COMPONENTS = Components(text_params=OPENCLIP_H_TEXT_PARAMS, text_dtype=torch.float32)
AUTO_COMPONENTS = Components()


def estimates_table() -> None:
    print("Estimated peak device memory (GiB), fp16 UNet weights. official: untiled, chunk 32 (official windows), "
          "3-frame decode, whole-frame VAE, text encoder resident. auto: choose_plan at the budget (text encoder "
          "freed after the prompts, linear chunk fusion); the plans are listed below.\n")
    print("| output | frames | latent | official | " + " | ".join(f"auto {b} GiB" for b in BUDGETS_GIB) + " |")
    print("|---|---|---|---|" + "---|" * len(BUDGETS_GIB))
    plans = []
    for height, width in OUTPUTS:
        for frames in FRAME_COUNTS:
            official = official_plan(frames, height, width)
            cells = [f"{estimate_peak(official, OFFICIAL_COMPONENTS).peak / GIB:.2f}"]
            for budget in BUDGETS_GIB:
                try:
                    plan = choose_plan(budget * GIB, official.replace(fusion="linear"), AUTO_COMPONENTS)
                    cells.append(f"{estimate_peak(plan, AUTO_COMPONENTS).peak / GIB:.2f}")
                    plans.append((f"{height}x{width}", frames, budget, plan.describe()))
                except NoPlanFits as error:
                    cells.append("none fits")
                    plans.append((f"{height}x{width}", frames, budget, str(error)))
            print(f"| {height}x{width} | {frames} | {official.latent_h}x{official.latent_w} | " + " | ".join(cells)
                  + " |")
    print("\n| output | frames | budget GiB | auto plan |\n|---|---|---|---|")
    for output, frames, budget, text in plans:
        print(f"| {output} | {frames} | {budget} | {text} |")
    print()
    example = official_plan(100, 2160, 3840)
    print("Breakdown, official settings, 2160x3840, 100 frames:\n")
    print("```\n" + estimate_peak(example, OFFICIAL_COMPONENTS).describe() + "\n```")


# --- real-memory workers (one measurement per fresh process) ---------------------------------------------------

def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _unet_inputs(frames: int, h: int, w: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, frames, h, w, generator=gen).to(dtype)
    hint = torch.randn(1, 4, frames, h, w, generator=gen).to(dtype)
    context = torch.randn(1, 77, 1024, generator=gen).to(dtype)
    return x, torch.tensor([899]), context, hint


def worker_unet(frames: int, h: int, w: int, weights: str, compute: str, grid: tuple[int, int]) -> dict:
    """One forward (grid 1x1) or the sum of R x C tile forwards on a [1,4,F,h,w] latent: seconds, RSS figures."""
    from forward import random_model

    from star_core.memory import tile_edge
    from star_core.windows import plan_windows

    baseline = _rss()
    dtype = DTYPES[compute]
    model = random_model(DTYPES[weights], dtype)
    after_build = _rss()
    x, t, context, hint = _unet_inputs(frames, h, w, dtype)
    rows = plan_windows(h, tile_edge(h, grid[0], 8, 4, "h"), 8).spans
    cols = plan_windows(w, tile_edge(w, grid[1], 8, 4, "w"), 8).spans
    start = time.perf_counter()
    with torch.inference_mode():
        for y0, y1 in rows:
            for x0, x1 in cols:
                out = model(x[..., y0:y1, x0:x1], t, context, hint[..., y0:y1, x0:x1])
                del out
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "baseline": baseline, "after_build": after_build, "peak": _peak_rss(),
            "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
            "tile": [rows[0][1] - rows[0][0], cols[0][1] - cols[0][0]], "threads": torch.get_num_threads()}


def worker_vae(kind: str, frames: int, height: int, width: int) -> dict:
    """The full-width SVD VAE (random weights, fp32) encoding one frame or decoding `frames` frames."""
    from diffusers import AutoencoderKLTemporalDecoder

    from star_core.tiny_models import FULL_VAE

    baseline = _rss()
    torch.manual_seed(0)
    model = AutoencoderKLTemporalDecoder(down_block_types=("DownEncoderBlock2D",) * 4, **FULL_VAE).eval()
    after_build = _rss()
    with torch.inference_mode():
        if kind == "encode":
            x = torch.rand(1, 3, height, width) * 2 - 1
            start = time.perf_counter()
            model.quant_conv(model.encoder(x))
        else:
            z = torch.randn(frames, 4, height // 8, width // 8)
            start = time.perf_counter()
            model.decode(z, num_frames=frames)
    return {"seconds": time.perf_counter() - start, "baseline": baseline, "after_build": after_build,
            "peak": _peak_rss(), "weights": sum(p.numel() * 4 for p in model.parameters())}


def worker_sampler(frames: int, h: int, w: int) -> dict:
    """STAR's sampler with a model that costs nothing (x·0.5) and the torchsde Brownian tree, fp32 latents."""
    from star_core.diffusion.star_sampling import SamplerSettings, sample_star

    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, frames, h, w, generator=generator)
    start = torch.randn(latent.shape, generator=generator)
    positive, negative = torch.randn(2, 1, 77, 1024, generator=generator)
    sample_star(lambda x, t, c, hint: x * 0.5, latent[:, :, :1, :8, :8], positive, negative,
                SamplerSettings(chunk_len=32), start_noise=start[:, :, :1, :8, :8], brownian=1)  # warm-up
    baseline = _rss()
    began = time.perf_counter()
    sample_star(lambda x, t, c, hint: x * 0.5, latent, positive, negative, SamplerSettings(chunk_len=32),
                start_noise=start, brownian=12345)
    return {"seconds": time.perf_counter() - began, "baseline": baseline, "peak": _peak_rss()}


# glibc's malloc raises its mmap threshold (up to 32 MiB) after freeing a large block, so later tensors of a few
# MiB come from the heap and their freed pages stay resident: RSS then overstates the live tensors by up to a few
# hundred MiB. A fixed 64 KiB threshold returns every freed tensor to the system, so RSS follows the live memory.
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _spawn(*args: str, threads: int | None = None, cache: Path | None = None, fixed_malloc: bool = False) -> dict:
    """Runs one worker in a fresh process (with `fixed_malloc`, under `FIXED_MALLOC`); with `cache`, a JSON-lines
    file of earlier results, reuses a result for the same arguments (the tables can be recomputed without rerunning
    minutes of forwards)."""
    key = ("mmap-64k " if fixed_malloc else "") + " ".join(args)
    if cache is not None and cache.is_file():
        for line in cache.read_text().splitlines():
            entry = json.loads(line)
            if entry["key"] == key:
                return entry["result"]
    cmd = [sys.executable, __file__, "--worker", *args]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, **FIXED_MALLOC} if fixed_malloc else None
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"worker {args} failed: {proc.stderr.strip().splitlines()[-3:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if cache is not None:
        with cache.open("a") as out:
            out.write(json.dumps({"key": key, "result": result}) + "\n")
    return result


# --- validation ------------------------------------------------------------------------------------------------

# The smallest is dominated by the runtime's first-call allocations; the larger three are the validation proper
# (1x138x240 is the speed benchmark's untiled forward).
UNET_SIZES = ((4, 18, 24), (1, 66, 120), (1, 90, 160), (1, 138, 240))
VAE_SIZES = (("encode", 1, 448, 512), ("decode", 3, 192, 256), ("decode", 1, 384, 512))
SAMPLER_SIZE = (32, 90, 160)


def unet_working_set(plan: PlanSizes) -> int:
    """The estimate's working memory of one evaluation on the CPU: activations or the largest layer's copies."""
    from star_core.memory import stage_peak

    parts = dict(stage_peak(plan, "sample").parts)
    return parts.get("UNet activations") or parts["UNet weight copies"]


def validate(threads: int | None, cache: Path | None) -> None:
    from star_core.memory.activations import vae_decode_elements, vae_encode_elements
    from star_core.memory.estimate import fitted, vae_coefficients

    print("Estimate vs measured peak RSS, fresh process each, CPU, random full-size weights. The "
          "working set (activations, or the largest layer's transient weight copies, plus inputs) is compared with "
          "the peak RSS above the loaded weights, measured twice: with glibc's malloc at a fixed 64 KiB mmap "
          "threshold (freed tensors leave RSS) and with its default (freed mid-size tensors stay resident). "
          "'total' = the process's RSS before the model (Python + torch) + weights + working set, vs the first.\n")
    print("| what | shape | weights GiB | est. working set GiB | meas. GiB (64 KiB mmap) | error "
          "| meas. GiB (glibc default) | error | est. total GiB | meas. peak RSS GiB | error | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")

    def row(what: str, shape: str, args: tuple[str, ...], working: float, weights: int | None) -> None:
        runs = [_spawn(*args, threads=threads, cache=cache, fixed_malloc=fixed) for fixed in (True, False)]
        weights = runs[0].get("weights", 0) if weights is None else weights
        measured = [r["peak"] - r.get("after_build", r["baseline"]) for r in runs]
        total, peak = runs[0]["baseline"] + weights + working, runs[0]["peak"]
        print(f"| {what} | {shape} | {weights / GIB:.2f} | {working / GIB:.3f} "
              + " ".join(f"| {m / GIB:.3f} | {(working - m) / m:+.1%}" for m in measured)
              + f" | {total / GIB:.2f} | {peak / GIB:.2f} | {(total - peak) / peak:+.1%} | {runs[0]['seconds']:.0f} |",
              flush=True)

    for frames, h, w in UNET_SIZES:
        plan = PlanSizes(frames, h, w, chunk_len=frames, unet_dtype=torch.bfloat16, compute_dtype=torch.float32)
        inputs = 2 * 4 * frames * h * w * 4
        row("UNet+ControlNet forward, bf16 weights, fp32 compute", f"[1,4,{frames},{h},{w}]",
            ("unet", str(frames), str(h), str(w), "bf16", "fp32", "1", "1"), unet_working_set(plan) + inputs, None)
    vae = vae_coefficients((128, 256, 512, 512))
    for kind, frames, height, width in VAE_SIZES:
        if kind == "encode":
            working = vae_encode_elements(vae, height, width) * 4 + 3 * height * width * 4
        else:
            working = vae_decode_elements(vae, frames, height, width) * 4 + 4 * frames * height * width // 16
        row(f"SVD VAE {kind}, fp32", f"{frames}x{height}x{width}", ("vae", kind, str(frames), str(height), str(width)),
            working, None)
    frames, h, w = SAMPLER_SIZE
    video = fitted.SAMPLER.video_copies + fitted.SAMPLER.brownian_copies - 2  # inputs exist before the baseline
    working = (video + fitted.SAMPLER.chunk_copies * min(32, frames) / frames) * 4 * frames * h * w * 4
    row("sampler state (Brownian tree), fp32", f"[1,4,{frames},{h},{w}]", ("sampler", str(frames), str(h), str(w)),
        working, 0)


# --- speed -----------------------------------------------------------------------------------------------------

def speed(frames: int, h: int, w: int, grid: tuple[int, int], threads: int | None, weights: str,
          compute: str, cache: Path | None) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from star_core.model import STARUNet

    def gflop(fh: int, fw: int) -> float:
        with torch.device("meta"):
            model = STARUNet()
            x = torch.zeros(1, 4, frames, fh, fw)
            context = torch.zeros(1, 77, 1024)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x, torch.tensor([899], device="meta"), context, x)
        return counter.get_total_flops() / 1e9

    print(f"One full-size forward on [1,4,{frames},{h},{w}], {weights} weights, {compute} compute, untiled vs "
          f"{grid[0]}x{grid[1]} tiles (8-cell overlap; the sum of the tile forwards), fresh process each.\n")
    print("| run | tile (latent) | GFLOP | seconds | peak RSS GiB | RSS above weights GiB | est. working set GiB |")
    print("|---|---|---|---|---|---|---|")
    for label, g in (("untiled", (1, 1)), (f"{grid[0]}x{grid[1]} tiles", grid)):
        r = _spawn("unet", str(frames), str(h), str(w), weights, compute, str(g[0]), str(g[1]), threads=threads,
                   cache=cache)
        th, tw = r["tile"]
        flops = gflop(th, tw) * g[0] * g[1]
        plan = PlanSizes(frames, h, w, chunk_len=frames, tile=(th, tw), unet_dtype=DTYPES[weights],
                         compute_dtype=DTYPES[compute])
        print(f"| {label} | {th}x{tw} | {flops:.0f} | {r['seconds']:.1f} | {r['peak'] / GIB:.2f} "
              f"| {(r['peak'] - r['after_build']) / GIB:.2f} | {unet_working_set(plan) / GIB:.2f} |", flush=True)


# --- CUDA check (where a GPU is lent) ------------------------------------------------------------------------

CUDA_UNET_SIZES = ((8, 90, 160), (32, 90, 160), (4, 138, 248), (1, 274, 488))
CUDA_VAE_SIZES = ((3, 720, 1280), (3, 1104, 1984))


def cuda_check() -> int:
    """Estimate vs ``torch.cuda.max_memory_allocated`` above the weights and inputs: one fp16 forward
    per size, and the fp32 SVD VAE decoding 3-frame windows under fp16 autocast (the official decode)."""
    if not torch.cuda.is_available():
        print("cuda: no CUDA device here; run this where a GPU is lent")
        return 1
    from diffusers import AutoencoderKLTemporalDecoder
    from forward import random_model

    from star_core.memory import stage_peak
    from star_core.memory.activations import vae_decode_elements
    from star_core.memory.estimate import vae_coefficients
    from star_core.tiny_models import FULL_VAE

    def peak_above(fn) -> int:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.inference_mode():
            out = fn()
        del out
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    print(f"Estimate vs torch.cuda.max_memory_allocated above weights and inputs, {torch.cuda.get_device_name()}\n")
    print("| what | shape | estimated GiB | measured GiB | error |\n|---|---|---|---|---|")
    def unet_rows() -> None:  # the model is freed on return, before the VAE is built
        unet = random_model(torch.float16, torch.float16).to("cuda")
        for frames, h, w in CUDA_UNET_SIZES:
            inputs = [v.to("cuda") for v in _unet_inputs(frames, h, w, torch.float16)]
            measured = peak_above(lambda: unet(*inputs))
            plan = PlanSizes(frames, h, w, chunk_len=frames)
            parts = dict(stage_peak(plan, "sample").parts)
            estimated = parts.get("UNet activations") or parts["UNet weight copies"]
            print(f"| UNet+ControlNet forward, fp16 | [1,4,{frames},{h},{w}] | {estimated / GIB:.2f} "
                  f"| {measured / GIB:.2f} | {(estimated - measured) / measured:+.1%} |", flush=True)

    unet_rows()
    vae = AutoencoderKLTemporalDecoder(down_block_types=("DownEncoderBlock2D",) * 4, **FULL_VAE).to("cuda").eval()
    for frames, height, width in CUDA_VAE_SIZES:
        z = torch.randn(frames, 4, height // 8, width // 8, device="cuda")

        def decode() -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.float16):
                return vae.decode(z, num_frames=frames).sample

        measured = peak_above(decode)
        estimated = vae_decode_elements(vae_coefficients((128, 256, 512, 512)), frames, height, width) * 2
        print(f"| SVD VAE decode, fp16 autocast | {frames}x{height}x{width} | {estimated / GIB:.2f} "
              f"| {measured / GIB:.2f} | {(estimated - measured) / measured:+.1%} |", flush=True)
    return 0


# --- calibration -----------------------------------------------------------------------------------------------

UNET_GRID = tuple((b, f, h, w) for h, w in ((34, 64), (66, 120), (90, 160), (138, 240))
                  for b, f in ((1, 1), (1, 2), (1, 4), (2, 4), (1, 8), (1, 16)))
UNET_GRID_EXTRA = ((1, 32, 34, 64), (1, 32, 66, 120), (1, 1, 274, 488), (1, 2, 274, 488), (1, 4, 274, 488),
                   (1, 8, 274, 488), (2, 4, 210, 368), (1, 32, 274, 488))
VAE_GRID = ((256, 256), (512, 512), (720, 1280))


def calibrate(quick: bool) -> None:
    from star_core.memory.calibrate import fit_sampler, fit_unet, fit_vae
    from star_core.model import STARConfig
    from star_core.tiny_models import FULL_VAE, TINY_STAR, TINY_VAE

    def report(title: str, fit, unit: str = "MiB", scale: float = 2**20) -> None:
        print(f"\n{title}: {fit.coefficients}; max relative error {fit.max_relative_error:.1%}\n")
        print(f"| shape | measured {unit} | fitted {unit} | error |\n|---|---|---|---|")
        for shape, measured, predicted in fit.rows:
            print(f"| {shape} | {measured / scale:.2f} | {predicted / scale:.2f} "
                  f"| {(predicted - measured) / measured:+.1%} |", flush=True)

    tiny = STARConfig(**TINY_STAR)
    tiny_grid = tuple((b, f, h, w) for h, w in ((10, 16), (18, 32), (34, 64)) for b, f in ((1, 1), (1, 4), (2, 8)))
    fits = {"tiny": fit_unet(tiny, tiny_grid)}
    report("UNet (tiny fixture config)", fits["tiny"])
    grid = UNET_GRID[:6] + UNET_GRID[-6:] if quick else UNET_GRID + UNET_GRID_EXTRA
    fits["released"] = fit_unet(STARConfig(), grid)
    report("UNet (released config)", fits["released"])
    fits["vae"] = fit_vae(tuple(FULL_VAE["block_out_channels"]), FULL_VAE["layers_per_block"], VAE_GRID)
    report("SVD VAE", fits["vae"])
    fits["vae_tiny"] = fit_vae(tuple(TINY_VAE["block_out_channels"]), TINY_VAE["layers_per_block"], VAE_GRID[:2])
    report("tiny VAE", fits["vae_tiny"])
    fits["sampler"] = fit_sampler()
    report("sampler", fits["sampler"], "latent copies", 1)
    print("\n# star_core/memory/coefficients.py\n")
    print(render_coefficients(fits, tiny))


def _num(value: float) -> str:
    return f"{value:.6g}"


def render_coefficients(fits: dict, tiny) -> str:
    def unet(c) -> str:
        return (f"UNetCoefficients(per_cell={_num(c.per_cell)}, per_slice={_num(c.per_slice)},\n"
                f"                     whole_per_cell={_num(c.whole_per_cell)}, constant={_num(c.constant)})")

    def vae(c) -> str:
        return (f"VAECoefficients(encode_per_pixel={_num(c.encode_per_pixel)}, "
                f"decode_per_pixel={_num(c.decode_per_pixel)},\n                         "
                f"parked_per_pixel={_num(c.parked_per_pixel)}, constant={_num(c.constant)})")

    s = fits["sampler"].coefficients
    tiny_args = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(tiny).items()) if getattr(tiny, k) !=
                          getattr(type(tiny)(), k))
    return f'''"""Fitted activation coefficients, generated by ``python bench/memory.py calibrate`` (do not edit).

Measured with FakeTensorMode + MemTracker on the real modules (float32; elements scale to any dtype).
"""
from ..model.config import STARConfig
from .activations import SamplerCoefficients, UNetCoefficients, VAECoefficients

# (architecture, fit); the first entry is the released network, the second the fixtures' tiny one (a canary the
# tests re-measure, so a change to the network's memory behaviour shows up as a stale fit).
UNET = (
    (STARConfig(), {unet(fits["released"].coefficients)}),
    (STARConfig({tiny_args}),
     {unet(fits["tiny"].coefficients)}),
)
# (VAE block_out_channels, fit); the first entry is the SVD VAE.
VAE = (
    ((128, 256, 512, 512), {vae(fits["vae"].coefficients)}),
    ((32, 32, 64, 64), {vae(fits["vae_tiny"].coefficients)}),
)
SAMPLER = SamplerCoefficients(video_copies={_num(s.video_copies)}, chunk_copies={_num(s.chunk_copies)},
                              brownian_copies={_num(s.brownian_copies)})
'''


# --- entry point -----------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="estimates",
                        choices=("estimates", "validate", "speed", "calibrate", "cuda"))
    parser.add_argument("--quick", action="store_true", help="calibrate: a smaller grid")
    parser.add_argument("--latent", type=int, nargs=3, default=(1, 138, 240), metavar=("F", "H", "W"),
                        help="speed: latent frames, height, width (default 1 138 240: a 1080p-sized latent)")
    parser.add_argument("--grid", type=int, nargs=2, default=(2, 2), metavar=("ROWS", "COLS"))
    parser.add_argument("--weights", choices=sorted(DTYPES), default="bf16", help="speed: weight dtype")
    parser.add_argument("--compute", choices=sorted(DTYPES), default="fp32", help="speed: compute dtype")
    parser.add_argument("--threads", type=int, help="torch threads in the workers")
    parser.add_argument("--cache", type=Path, help="validate/speed: JSON-lines file of worker results to reuse "
                        "(and to append new ones to)")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.threads:
            torch.set_num_threads(args.threads)
        kind, *rest = args.worker
        if kind == "unet":
            frames, h, w, weights, compute, rows, cols = rest
            result = worker_unet(int(frames), int(h), int(w), weights, compute, (int(rows), int(cols)))
        elif kind == "vae":
            result = worker_vae(rest[0], *map(int, rest[1:]))
        else:
            result = worker_sampler(*map(int, rest))
        print(json.dumps(result))
        return 0
    if args.command == "estimates":
        estimates_table()
    elif args.command == "validate":
        validate(args.threads, args.cache)
    elif args.command == "speed":
        speed(*args.latent, tuple(args.grid), args.threads, args.weights, args.compute, args.cache)
    elif args.command == "cuda":
        return cuda_check()
    else:
        calibrate(args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
