"""``python -m star_core train`` (``star-vsr train``): fine-tune a STAR checkpoint on your own clips.

Loads the base checkpoint (``light``/``heavy`` or a path, converted ones included), the SVD VAE and the text
encoder; encodes every caption once and frees the text encoder; then trains (`star_core.train.trainer`) and
writes the fine-tune as a delta checkpoint that the Model Loader node and ``upscale --model`` read like any STAR
checkpoint (``--merge`` also writes a full one). Multi-GPU: launch with ``torchrun --nproc-per-node N -m star_core
train …`` (data parallel; each process takes every N-th sample).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .data import LQ_RESIZE_MODES, NULL_TEXT_RATIO, ClipDataset, DataSettings, find_pairs
from .degrade import DegradationSettings
from .network import DROPOUT_MODES, TRAINABLE_SETS
from .step import StepSettings
from .trainer import CLIP_MODES, PRECISIONS, Trainer, TrainingDiverged, TrainSettings, Validation, distributed

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EXIT_FAILED, EXIT_MODELS_MISSING = 1, 3
# --official: the released train_sr.py step where this command's defaults differ from it
OFFICIAL_PRESET = {"df_gradient": False, "clip": "official", "dropout": "official", "lq_resize": "bicubic"}


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--crop must look like HEIGHTxWIDTH (e.g. 336x512), got {text!r}") from None
    return height, width


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the ``train`` command to ``python -m star_core``'s subparsers."""
    from ..cli import add_model_options  # star_core.cli imports this module

    p = subparsers.add_parser(
        "train", help="fine-tune a STAR checkpoint on your own clips", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Fine-tune STAR (ControlNet + LIEM, the official trainable set) with the v-prediction loss and the "
                    "Dynamic Frequency loss. Defaults are the official train_sr.py settings except: the DF loss "
                    "trains through the VAE decoder (--no-df-gradient: as released, where it only logs), gradient "
                    "clipping covers every trained tensor (--clip official: only the ControlNet), dropout only in the "
                    "trained ControlNet (--dropout official: everywhere), bilinear LQ resize. --official restores all "
                    "four.")
    data = p.add_argument_group("data")
    data.add_argument("--hq", type=Path, help="folder of HQ clips (videos or frame folders; NAME.txt = caption)")
    data.add_argument("--lq", type=Path, help="folder of LQ clips with the HQ names (omit: degrade HQ on the fly)")
    data.add_argument("--frames", type=int, default=32, help="frames per sample (official 32)")
    data.add_argument("--crop", type=_size, default=(336, 512), metavar="HxW",
                      help="HQ crop in pixels (official: whole 720x1280 frames)")
    data.add_argument("--frame-stride", type=int, default=1, help="take every n-th frame")
    data.add_argument("--null-text-ratio", type=float, default=NULL_TEXT_RATIO,
                      help="probability of the empty prompt (official 0.5)")
    data.add_argument("--default-caption", default="a good video", help="caption of clips without NAME.txt")
    data.add_argument("--lq-resize", choices=LQ_RESIZE_MODES, default="bilinear",
                      help="resize of smaller LQ clips to the HQ crop (inference upscales bilinearly; official "
                           "training data: bicubic)")
    data.add_argument("--degrade-scale", type=int, default=4, help="HQ-only: the degraded LQ is this much smaller")
    data.add_argument("--workers", type=int, default=0, help="data-loader processes")

    add_model_options(p, "base checkpoint: 'light', 'heavy' or a path")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("-o", "--output", type=Path, help="output folder (checkpoints, log, validation, result)")
    opt.add_argument("--name", default="finetune", help="file name of the result (OUT/NAME.safetensors)")
    opt.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    opt.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (official 5e-5)")
    opt.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay (official 1e-2)")
    opt.add_argument("--warmup", type=int, default=0, help="linear learning-rate warm-up steps")
    opt.add_argument("--batch", type=int, default=1, help="clips per micro-batch and GPU (official 1)")
    opt.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    opt.add_argument("--precision", choices=("auto", *PRECISIONS), default="auto",
                     help="autocast dtype; auto = bf16 on CUDA, fp32 on CPU (official: fp16)")
    opt.add_argument("--frozen-dtype", choices=("auto", *DTYPES), default="auto",
                     help="storage dtype of the frozen UNet (auto: the autocast dtype, fp32 without autocast); the "
                          "trained tensors are always fp32 masters")
    opt.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                     help="activation checkpointing (recompute in backward: ~1/3 more time, far less memory)")
    opt.add_argument("--trainable", choices=sorted(TRAINABLE_SETS), default="official",
                     help="; ".join(f"{k}: {v}" for k, v in TRAINABLE_SETS.items()))
    opt.add_argument("--clip", choices=sorted(CLIP_MODES), default="all",
                     help="; ".join(f"{k}: {v}" for k, v in CLIP_MODES.items()))
    opt.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping threshold (official 1.0)")
    opt.add_argument("--dropout", choices=sorted(DROPOUT_MODES), default="trainable",
                     help="; ".join(f"{k}: {v}" for k, v in DROPOUT_MODES.items()))
    opt.add_argument("--seed", type=int, default=0, help="seed of every random draw (data, t, noise, dropout)")
    opt.add_argument("--official", action="store_true",
                     help="the released script's step: --no-df-gradient --clip official --dropout official "
                          "--lq-resize bicubic")

    df = p.add_argument_group("Dynamic Frequency loss")
    df.add_argument("--df-gradient", action=argparse.BooleanOptionalAction, default=True,
                    help="the DF term trains through the VAE decoder (the paper); --no-df-gradient = released script")
    df.add_argument("--df-weight", type=float, default=1.0, help="weight of the DF term (official 1; 0 = v-loss only)")
    df.add_argument("--df-exact", action="store_true",
                    help="exact 80th percentile instead of the official 10 000-sample estimate")

    run = p.add_argument_group("checkpoints and validation")
    run.add_argument("--save-every", type=int, default=500, help="checkpoint interval in steps")
    run.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    run.add_argument("--resume", nargs="?", type=Path, const=True, default=None,
                     help="continue from the newest checkpoint in OUT (or the given checkpoint folder)")
    run.add_argument("--validate-every", type=int, default=0, help="validation interval in steps (0: never)")
    run.add_argument("--val-clips", type=int, default=1, help="clips of the data set used for validation")
    run.add_argument("--val-videos", action=argparse.BooleanOptionalAction, default=True,
                     help="write LQ | restored | HQ videos at each validation (runs the sampler)")
    run.add_argument("--save-dtype", choices=("base", *DTYPES), default="base",
                     help="dtype of the saved fine-tune (base: the base checkpoint's)")
    run.add_argument("--merge", action="store_true", help="also write OUT/NAME_merged.safetensors, a full checkpoint")
    run.add_argument("--merge-only", type=Path, metavar="DELTA",
                     help="only write DELTA merged with its base as a full checkpoint to -o FILE, then exit")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    run.add_argument("--threads", type=int, help="CPU threads for torch")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def stored_dtype(path: Path) -> torch.dtype:
    """The floating dtype a checkpoint file stores its tensors in, read without loading the tensors."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
        with safe_open(str(path), "pt") as handle:
            kinds = [handle.get_slice(k).get_dtype() for k in handle.keys()]
        return next((names[k] for k in kinds if k in names), torch.float32)
    from ..checkpoint import load_state_dict_file  # .pt files are memory-mapped: nothing is read here

    return next((v.dtype for v in load_state_dict_file(path).values() if v.is_floating_point()), torch.float32)


def _merge(delta: Path, output: Path) -> Path:
    from ..convert import convert_checkpoint

    convert_checkpoint(delta, output, stored_dtype(delta))
    return output


def settings_from_args(args: argparse.Namespace, device: torch.device) -> tuple[TrainSettings, DataSettings]:
    """The run's settings, validated before any model is loaded."""
    if args.official:
        for key, value in OFFICIAL_PRESET.items():
            setattr(args, key, value)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    step = StepSettings(df_gradient=args.df_gradient, df_weight=args.df_weight, df_exact=args.df_exact,
                        checkpoint_decode=args.checkpointing)
    train = TrainSettings(steps=args.steps, lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup,
                          batch=args.batch, grad_accum=args.grad_accum, precision=precision,
                          max_grad_norm=args.max_grad_norm, clip=args.clip, trainable=args.trainable,
                          dropout=args.dropout, checkpointing=args.checkpointing, seed=args.seed,
                          save_every=args.save_every, validate_every=args.validate_every, keep=args.keep,
                          workers=args.workers, step=step)
    data = DataSettings(frames=args.frames, crop=tuple(args.crop), frame_stride=args.frame_stride,
                        null_text_ratio=args.null_text_ratio, default_caption=args.default_caption,
                        lq_resize=args.lq_resize, degradation=DegradationSettings(scale=args.degrade_scale))
    return train, data


def _check_crop(model, crop: tuple[int, int]) -> None:
    from ..model import check_latent_size

    try:
        check_latent_size(crop[0] // 8, crop[1] // 8, len(model.config.dim_mult))
    except ValueError as exc:
        raise ValueError(f"--crop {crop[0]}x{crop[1]}: {exc} (in pixels: ×8)") from None


def _encode_captions(models, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Every caption's context, computed once; the text encoder is freed afterwards."""
    from ..cli import load_text_encoder

    encoder = load_text_encoder(models, device)
    with torch.no_grad():
        out = {c: encoder.encode([c])[0].float().cpu() for c in captions}
    del encoder
    return out


def run_train(args: argparse.Namespace) -> int:
    """Runs the ``train`` command; returns the process exit code."""
    from ..checkpoint import load_star_model
    from ..cli import load_vae, pick_device
    from ..download import ModelsMissingError, resolve_models
    from ..text import NEGATIVE_PROMPT, build_caption

    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.merge_only is not None:
            if args.output is None or args.output.suffix != ".safetensors":
                raise ValueError("--merge-only DELTA needs -o FILE.safetensors (the full checkpoint to write)")
            print(f"wrote {_merge(args.merge_only, args.output)}", file=sys.stderr)
            return 0
        if args.hq is None or args.output is None:
            raise ValueError("train needs --hq FOLDER (and --lq FOLDER for paired clips) and -o OUTPUT_FOLDER")
        rank, world = distributed()
        device = pick_device(args.device)
        if device.type == "cuda" and world > 1:
            device = torch.device("cuda", int(__import__("os").environ.get("LOCAL_RANK", rank)))
            torch.cuda.set_device(device)
        settings, data_settings = settings_from_args(args, device)
        dataset = ClipDataset(find_pairs(args.hq, args.lq), data_settings)
        models = resolve_models(args.model, vae=args.vae, text_encoder=args.text_encoder, tokenizer=args.tokenizer,
                                comfy_models=args.comfy_models, cache_dir=args.cache_dir, offline=args.offline)
        autocast = PRECISIONS[settings.precision]
        frozen = DTYPES[args.frozen_dtype] if args.frozen_dtype != "auto" else (autocast or torch.float32)
        model = load_star_model(models.star, dtype=frozen, compute_dtype=autocast or torch.float32, device=device)
        _check_crop(model, data_settings.crop)
        save_dtype = stored_dtype(models.star) if args.save_dtype == "base" else DTYPES[args.save_dtype]
        vae = load_vae(models, device)
        positive = build_caption(data_settings.default_caption)
        contexts = _encode_captions(models, sorted(set(dataset.captions()) | {positive, NEGATIVE_PROMPT}), device)
        validation = None
        if settings.validate_every:
            items = [dataset[(i % len(dataset), 10_000 + i)] for i in range(args.val_clips)]
            validation = Validation(items, videos=args.val_videos, positive=contexts[positive][None],
                                    negative=contexts[NEGATIVE_PROMPT][None])
        trainer = Trainer(model, vae, dataset, contexts, settings, args.output, models.star, device=device,
                          validation=validation, save_dtype=save_dtype)
        if args.resume is not None:
            step = trainer.resume(args.output if args.resume is True else args.resume)
            print(f"resuming at step {step}", file=sys.stderr)
        trainer.train(progress=not args.quiet, log=lambda m: print(m, file=sys.stderr) if args.quiet else None)
        result = trainer.write_final(args.name)
        if rank == 0:
            print(f"wrote {result} (a delta of {models.star.name}; keep the base next to it, or use --merge)",
                  file=sys.stderr)
            if args.merge:
                merged = _merge(result, args.output / f"{args.name}_merged.safetensors")
                print(f"wrote {merged}", file=sys.stderr)
        return 0
    except ModelsMissingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_MODELS_MISSING
    except (TrainingDiverged, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
