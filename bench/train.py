"""Training-step benchmark (CPU): seconds per step and peak RSS of the tiny and the full-size model, and a loss curve.

``python bench/train.py`` runs every configuration in a fresh subprocess and prints two tables:

* tiny model (the fixtures' config, random weights, tiny SVD VAE): a whole optimizer step (encode, loss, DF decode,
  backward, AdamW), with the DF gradient on/off and activation checkpointing on/off;
* full-size model (2.04 B parameters, random weights built on ``meta``, frozen part stored bf16 and computed in fp32
  (``cast_ops``), the 630 M trainable tensors fp32; full-width SVD VAE, fp32): forward + backward of one step at
  small clips, checkpointing on/off. The AdamW state (2 × 4 bytes per trainable parameter) is added analytically,
  not allocated, to keep the run inside a shared 24 GB machine.

``python bench/train.py --curve docs/train_loss_tiny.png --steps 120`` fine-tunes the tiny model on a synthetic
pair and draws the training loss and a fixed-t validation loss (PNG drawn with PIL).
Run the full-size rows under ``flock /tmp/star_heavy.lock`` on a shared machine (about 8 GB each).
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from star_core.model import STARConfig, STARUNet, cast_ops  # noqa: E402
from star_core.tiny_models import FULL_VAE, TINY_STAR, TINY_VAE  # noqa: E402
from star_core.train import StepSettings, encode_clips, prepare_for_training, step_loss  # noqa: E402

TINY_CONFIGS = [(True, False), (True, True), (False, False)]  # (df_gradient, checkpointing)
FULL_CONFIGS = [(2, (144, 192), True), (4, (144, 192), True), (4, (144, 192), False)]  # (frames, HxW px, ckpt)
GiB = 2**30


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _fill(module: nn.Module, seed: int) -> None:
    """The fixture recipe in place: norm weights 1 + 0.1·randn, other 1-D 0.05·randn, else randn / sqrt(fan_in)."""
    norms = {id(m.weight) for m in module.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if id(p) in norms:
                p.normal_(1.0, 0.1, generator=gen)
            elif p.ndim == 1:
                p.normal_(0.0, 0.05, generator=gen)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)


def build(size: str) -> tuple[STARUNet, object]:
    """A random STAR network and SVD VAE: ``tiny`` (fp32) or ``full`` (frozen bf16, computed in fp32)."""
    from diffusers import AutoencoderKLTemporalDecoder

    from star_core.vae import SVDVideoVAE

    if size == "tiny":
        model = STARUNet(STARConfig(**TINY_STAR), device="meta").to_empty(device="cpu")
        vae_config = TINY_VAE
    else:
        model = STARUNet(operations=cast_ops, device="meta", dtype=torch.bfloat16,
                         compute_dtype=torch.float32).to_empty(device="cpu")
        vae_config = FULL_VAE
    _fill(model, 0)
    levels = len(vae_config["block_out_channels"])
    with torch.device("meta"):
        vae = AutoencoderKLTemporalDecoder(down_block_types=("DownEncoderBlock2D",) * levels, latent_channels=4,
                                           **vae_config)
    vae = vae.to_empty(device="cpu")
    _fill(vae, 1)
    return model, SVDVideoVAE(vae)


def measure(size: str, frames: int, hw: tuple[int, int], df_gradient: bool, checkpointing: bool,
            repeats: int) -> dict:
    """One configuration in this process: a warm-up step, then the median of ``repeats`` timed steps."""
    model, vae = build(size)
    params = prepare_for_training(model, checkpointing=checkpointing, dropout="off")
    optimizer = torch.optim.AdamW([p for _, p in params], lr=5e-5, weight_decay=1e-2) if size == "tiny" else None
    rss_loaded = _peak_rss_gib()
    g = torch.Generator().manual_seed(0)
    hq = torch.rand(1, frames, 3, *hw, generator=g) * 2 - 1
    lq = (hq + 0.1 * torch.randn(hq.shape, generator=g)).clamp(-1, 1)
    context = torch.randn(1, 77, 1024, generator=g)
    settings = StepSettings(df_gradient=df_gradient, checkpoint_decode=checkpointing)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        with torch.no_grad():
            z_hq, z_lq = encode_clips(vae, hq, g), encode_clips(vae, lq, g)
        result = step_loss(model, vae, z_hq, z_lq, context, hq, settings, t=torch.tensor([500]), generator=g)
        result.loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    trainable = sum(p.numel() for _, p in params)
    return {"size": size, "frames": frames, "hw": list(hw), "df_gradient": df_gradient, "checkpointing": checkpointing,
            "seconds": statistics.median(times), "peak_rss_gib": _peak_rss_gib(), "rss_loaded_gib": rss_loaded,
            "trainable": trainable, "adam_state_gib": 8 * trainable / GiB if optimizer is None else 0.0}


def _run(args: list[str]) -> dict | str:
    proc = subprocess.run([sys.executable, __file__, *args, "--json"], capture_output=True, text=True)
    if proc.returncode:
        return (proc.stderr.strip().splitlines() or ["failed"])[-1]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tables(threads: int) -> None:
    print(f"tiny STAR + tiny SVD VAE, one optimizer step (AdamW), 4 frames 80x96, t=500, {threads} threads")
    print("| DF gradient | checkpointing | s/step | peak RSS GiB |")
    print("|---|---|---|---|")
    for df, ckpt in TINY_CONFIGS:
        r = _run(["--one", "tiny", "--frames", "4", "--size", "80x96", "--df-gradient", str(int(df)),
                  "--checkpointing", str(int(ckpt)), "--threads", str(threads)])
        print(f"| {df} | {ckpt} | " + (f"{r['seconds']:.2f} | {r['peak_rss_gib']:.2f} |" if isinstance(r, dict)
                                      else f"failed: {r} ||"), flush=True)
    print(f"\nfull-size STAR (2.04 B; frozen bf16 storage, fp32 compute) + full SVD VAE (fp32), forward + backward, "
          f"DF gradient on, t=500, {threads} threads; AdamW state added analytically")
    print("| frames | HxW px | latent | checkpointing | s/step | peak RSS GiB | RSS after load GiB "
          "| + AdamW state GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for frames, hw, ckpt in FULL_CONFIGS:
        r = _run(["--one", "full", "--frames", str(frames), "--size", f"{hw[0]}x{hw[1]}", "--df-gradient", "1",
                  "--checkpointing", str(int(ckpt)), "--threads", str(threads), "--repeats", "1"])
        latent = f"{frames}x{hw[0] // 8}x{hw[1] // 8}"
        if isinstance(r, dict):
            print(f"| {frames} | {hw[0]}x{hw[1]} | {latent} | {ckpt} | {r['seconds']:.1f} | {r['peak_rss_gib']:.2f} "
                  f"| {r['rss_loaded_gib']:.2f} | {r['adam_state_gib']:.2f} |", flush=True)
        else:
            print(f"| {frames} | {hw[0]}x{hw[1]} | {latent} | {ckpt} | failed: {r} ||||", flush=True)


def loss_curve(path: Path, steps: int, lr: float) -> None:
    """Fine-tunes the tiny model on a synthetic pair and draws the per-step loss and a fixed-t validation loss."""
    from star_core.tiny_models import write_tree
    from star_core.checkpoint import load_star_model
    from star_core.train.data import ClipDataset, DataSettings, find_pairs
    from star_core.train.trainer import Trainer, TrainSettings, Validation
    from star_core.vae import load_svd_vae
    from star_core.video_io import write_synthetic_clip

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = write_tree(root / "models", ["star", "vae_tiny"])
        (root / "HQ").mkdir()
        for i in range(2):
            write_synthetic_clip(root / "HQ" / f"clip{i}.mp4", frames=8, width=96 + 32 * i, height=80, audio=False)
        data = ClipDataset(find_pairs(root / "HQ"), DataSettings(frames=3, crop=(48, 64)))
        g = torch.Generator().manual_seed(0)
        contexts = {c: torch.randn(77, 1024, generator=g) for c in data.captions()}
        settings = TrainSettings(steps=steps, lr=lr, save_every=0, validate_every=10, seed=1)
        validation = Validation([data[(0, 99)], data[(1, 98)]], t_values=(200, 500, 800), videos=False)
        trainer = Trainer(load_star_model(files["star"]), load_svd_vae(files["vae_tiny"]), data, contexts, settings,
                          root / "out", files["star"], validation=validation)
        start = trainer.validate()["val_loss"]
        history = trainer.train(progress=True)
    train = [(r["step"], r["loss"]) for r in history]
    val = [(0, start)] + [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    draw_plot(path, train, val, f"tiny STAR fine-tune (random weights, synthetic clips, HQ-only degradation), "
                                f"lr {lr:g}, DF gradient on")
    print(f"wrote {path}: validation loss (fixed t, noise) {val[0][1]:.4f} -> {val[-1][1]:.4f}")
    print("| step | " + " | ".join(str(s) for s, _ in val) + " |")
    print("|---|" + "---|" * len(val))
    print("| validation loss | " + " | ".join(f"{v:.4f}" for _, v in val) + " |")


def draw_plot(path: Path, train: list[tuple[int, float]], val: list[tuple[int, float]], title: str) -> None:
    """A line plot with PIL: grey per-step training loss, blue validation loss (log y axis)."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 900, 480, 70, 20, 40, 50
    image = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(image)
    values = [v for _, v in train + val]
    lo, hi = math.log10(min(values)), math.log10(max(values))
    hi, lo = hi + 0.05 * (hi - lo + 1e-6), lo - 0.05 * (hi - lo + 1e-6)
    steps = max(s for s, _ in train + val)

    def xy(step: float, value: float) -> tuple[float, float]:
        return (left + (width - left - right) * step / steps,
                top + (height - top - bottom) * (hi - math.log10(value)) / (hi - lo))

    d.rectangle([left, top, width - right, height - bottom], outline="black")
    for k in range(math.floor(lo), math.ceil(hi) + 1):
        for m in (1, 2, 5):
            value = m * 10**k
            if lo <= math.log10(value) <= hi:
                y = xy(0, value)[1]
                d.line([left, y, width - right, y], fill=(225, 225, 225))
                d.text((5, y - 6), f"{value:g}", fill="black")
    for i in range(6):
        step = round(steps * i / 5)
        x = xy(step, 10**lo)[0]
        d.text((x - 8, height - bottom + 6), str(step), fill="black")
    d.line([xy(s, v) for s, v in train], fill=(190, 190, 190), width=1)
    window = 10
    smooth = [(train[i][0], statistics.mean(v for _, v in train[max(0, i - window + 1):i + 1]))
              for i in range(len(train))]
    d.line([xy(s, v) for s, v in smooth[window - 1:]], fill=(40, 40, 40), width=2)
    d.line([xy(s, v) for s, v in val], fill=(20, 80, 200), width=3)
    for s, v in val:
        x, y = xy(s, v)
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(20, 80, 200))
    d.text((left, 12), title, fill="black")
    d.text((width // 2 - 20, height - 22), "step", fill="black")
    d.text((width - 330, top + 8), "grey: training loss per step (random t)", fill=(150, 150, 150))
    d.text((width - 330, top + 22), "black: its 10-step moving average", fill=(40, 40, 40))
    d.text((width - 330, top + 36), "blue: validation loss (fixed t and noise)", fill=(20, 80, 200))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", choices=("tiny", "full"), help="measure one configuration in this process")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", default="80x96", help="HxW pixels")
    parser.add_argument("--df-gradient", type=int, default=1)
    parser.add_argument("--checkpointing", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--curve", type=Path, help="write the tiny fine-tune loss curve PNG here")
    parser.add_argument("--steps", type=int, default=120, help="steps of the loss-curve run")
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate of the loss-curve run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.curve:
        loss_curve(args.curve, args.steps, args.lr)
        return 0
    if args.one:
        hw = tuple(int(v) for v in args.size.split("x"))
        result = measure(args.one, args.frames, hw, bool(args.df_gradient), bool(args.checkpointing), args.repeats)
        print(json.dumps(result) if args.json else result)
        return 0
    tables(args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
