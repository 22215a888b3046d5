"""Training-step benchmark (CPU): seconds per step and peak RSS of the tiny and the full-size model, and a loss curve.

``python bench/train.py`` runs every configuration in a fresh subprocess and prints two tables:

* tiny model (the fixtures' config, random weights, tiny SVD VAE): a whole optimizer step (encode, loss, DF decode,
  backward, AdamW), with the DF gradient on/off and activation checkpointing on/off;
* full-size model (2.04 B parameters; the ``train`` command's GPU set-up: frozen part bf16, the 630 M trainable
  tensors fp32 masters, bf16 autocast, full-width SVD VAE fp32), as a *memory model*: one whole step (encode, loss,
  DF decode with gradient, backward) runs on fake tensors (``FakeTensorMode``: shapes and dtypes, no data, no
  compute) while a dispatch mode adds up the bytes of every live tensor storage; the peak, plus the weights and the
  AdamW state, is the tensor memory a GPU needs (the CUDA context and allocator slack come on top). The same run
  counts the floating-point work (``FlopCounterMode``; recomputation included), from which a time per step follows
  for an assumed achieved rate. (A measured full-size step does not fit the shared CPU machine's time budget.)

``python bench/train.py --curve docs/train_loss_tiny.png --steps 120`` fine-tunes the tiny model on a synthetic
pair and draws the training loss and a fixed-t validation loss (PNG drawn with PIL).
The memory-model rows take about a minute each and little memory (no tensor holds data).
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
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from star_core.model import STARUNet  # noqa: E402
from star_core.tiny_models import FULL_VAE, TINY_VAE  # noqa: E402
from star_core.train import StepSettings, encode_clips, prepare_for_training, step_loss  # noqa: E402

TINY_CONFIGS = [(True, False), (True, True), (False, False)]  # (df_gradient, checkpointing)
# (frames, HxW px, checkpointing, DF gradient) of the full-size memory model
FULL_CONFIGS = [(8, (336, 512), True, True), (16, (336, 512), True, True), (32, (336, 512), True, True),
                (16, (336, 512), True, False), (8, (336, 512), False, True), (32, (720, 1280), True, True)]
ASSUMED_TFLOPS = 30  # achieved bf16 rate assumed for the time column (~40 % of an RTX 4090's dense bf16 peak)
GiB = 2**30


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def build_tiny() -> tuple[STARUNet, object]:
    """The tiny random STAR network and SVD VAE of `star_core.tiny_models`, fp32."""
    from star_core.checkpoint import load_star_model
    from star_core.tiny_models import star_weights, svd_vae_weights
    from star_core.vae import SVDVideoVAE
    from star_core.vae.svd import build_vae

    return load_star_model(star_weights(0)), SVDVideoVAE(build_vae(svd_vae_weights(seed=1, **TINY_VAE)))


def measure(frames: int, hw: tuple[int, int], df_gradient: bool, checkpointing: bool, repeats: int) -> dict:
    """The tiny model in this process: a warm-up optimizer step, then the median of ``repeats`` timed steps."""
    model, vae = build_tiny()
    params = prepare_for_training(model, checkpointing=checkpointing, dropout="off")
    optimizer = torch.optim.AdamW([p for _, p in params], lr=5e-5, weight_decay=1e-2)
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
        optimizer.step()
        model.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    return {"frames": frames, "hw": list(hw), "df_gradient": df_gradient, "checkpointing": checkpointing,
            "seconds": statistics.median(times), "peak_rss_gib": _peak_rss_gib(), "rss_loaded_gib": rss_loaded}


class LiveBytes(TorchDispatchMode):
    """Adds up the bytes of the tensor storages created while active, each until it is freed; keeps the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.current = self.peak = 0
        self.sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.current -= self.sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if id(storage) not in self.sizes:
                    self.sizes[id(storage)] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, id(storage))
        return out


def memory_model(frames: int, hw: tuple[int, int], checkpointing: bool, df_gradient: bool) -> dict:
    """The full-size training step on fake tensors: peak live tensor bytes and floating-point work."""
    from diffusers import AutoencoderKLTemporalDecoder
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
    from torch.utils.flop_counter import FlopCounterMode

    import star_core.vae.tiled as tiled
    from star_core.vae import SVDVideoVAE

    plan = tiled.feather_weights
    tiled.feather_weights = lambda *a, **k: _real(unset_fake_temporarily, plan, *a, **k)  # data-dependent checks
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = STARUNet(dtype=torch.bfloat16)
        vae_net = AutoencoderKLTemporalDecoder(down_block_types=("DownEncoderBlock2D",) * 4, latent_channels=4,
                                               **FULL_VAE)
        vae = SVDVideoVAE(vae_net)
        params = prepare_for_training(model, checkpointing=checkpointing, dropout="trainable")
        weights = sum(p.numel() * p.element_size() for p in [*model.parameters(), *vae_net.parameters()])
        trainable = sum(p.numel() for _, p in params)
        hq = torch.zeros(1, frames, 3, *hw)
        context = torch.zeros(1, 77, 1024)
        indices = torch.zeros(10_000, dtype=torch.long)
        settings = StepSettings(df_gradient=df_gradient, checkpoint_decode=checkpointing)

        def step() -> None:
            with torch.no_grad():
                z_hq, z_lq = encode_clips(vae, hq), encode_clips(vae, hq)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                result = step_loss(model, vae, z_hq, z_lq, context, hq, settings, t=torch.tensor([500]),
                                   noise=torch.zeros_like(z_hq), df_indices=[(indices, indices)])
            result.loss.backward()
            model.zero_grad(set_to_none=True)

        live, flops = LiveBytes(), FlopCounterMode(display=False)
        with live:  # separate passes: the flop counter's module hooks keep activations alive
            step()
        with flops:
            step()
    tiled.feather_weights = plan
    return {"frames": frames, "hw": list(hw), "checkpointing": checkpointing, "df_gradient": df_gradient,
            "weights_gib": weights / GiB, "step_peak_gib": live.peak / GiB, "adam_gib": 8 * trainable / GiB,
            "tflop": flops.get_total_flops() / 1e12}


def _real(unset, fn, *args, **kwargs):
    with unset():
        return fn(*args, **kwargs)


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
        r = _run(["--tiny", "--frames", "4", "--size", "80x96", "--df-gradient", str(int(df)),
                  "--checkpointing", str(int(ckpt)), "--threads", str(threads)])
        print(f"| {df} | {ckpt} | " + (f"{r['seconds']:.2f} | {r['peak_rss_gib']:.2f} |" if isinstance(r, dict)
                                      else f"failed: {r} ||"), flush=True)
    print(f"\nfull-size STAR (2.04 B) + SVD VAE, the train command's GPU set-up (frozen bf16, 630 M fp32 masters, "
          f"bf16 autocast), memory model on fake tensors; time at an assumed {ASSUMED_TFLOPS} TFLOP/s achieved")
    print("| frames | HxW px | checkpointing | DF gradient | weights GiB | step peak GiB (activations + grads) "
          "| AdamW state GiB | total tensor GiB | TFLOP/step | s/step at the assumed rate |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for frames, hw, ckpt, df in FULL_CONFIGS:
        r = _run(["--memory-model", "--frames", str(frames), "--size", f"{hw[0]}x{hw[1]}",
                  "--checkpointing", str(int(ckpt)), "--df-gradient", str(int(df))])
        head = f"| {frames} | {hw[0]}x{hw[1]} | {ckpt} | {df} |"
        if isinstance(r, dict):
            total = r["weights_gib"] + r["step_peak_gib"] + r["adam_gib"]
            print(f"{head} {r['weights_gib']:.2f} | {r['step_peak_gib']:.2f} | {r['adam_gib']:.2f} | {total:.2f} "
                  f"| {r['tflop']:.1f} | {r['tflop'] / ASSUMED_TFLOPS:.1f} |", flush=True)
        else:
            print(f"{head} failed: {r} ||||||", flush=True)


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
    parser.add_argument("--tiny", action="store_true", help="measure one tiny-model configuration in this process")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", default="80x96", help="HxW pixels")
    parser.add_argument("--df-gradient", type=int, default=1)
    parser.add_argument("--checkpointing", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--memory-model", action="store_true", help="the full-size memory model of one configuration")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--curve", type=Path, help="write the tiny fine-tune loss curve PNG here")
    parser.add_argument("--steps", type=int, default=120, help="steps of the loss-curve run")
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate of the loss-curve run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.curve:
        loss_curve(args.curve, args.steps, args.lr)
        return 0
    if args.memory_model:
        hw = tuple(int(v) for v in args.size.split("x"))
        result = memory_model(args.frames, hw, bool(args.checkpointing), bool(args.df_gradient))
        print(json.dumps(result) if args.json else result)
        return 0
    if args.tiny:
        hw = tuple(int(v) for v in args.size.split("x"))
        result = measure(args.frames, hw, bool(args.df_gradient), bool(args.checkpointing), args.repeats)
        print(json.dumps(result) if args.json else result)
        return 0
    tables(args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
