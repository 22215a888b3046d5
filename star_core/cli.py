"""Headless STAR: ``python -m star_core upscale INPUT -o OUTPUT [options]`` (also the ``star-vsr`` command).

This module only parses arguments, plans inputs and outputs, loads the models once per batch and shows progress;
each video is one :func:`star_core.pipeline.run` from a :class:`~star_core.video_io.FileSource` to a
:class:`~star_core.video_io.VideoFileSink` (two streaming passes over the file, so memory does not grow with its
length). Every option's default, help and range come from :mod:`star_core.spec`.

Under ``torchrun`` (``torchrun --nproc-per-node N -m star_core upscale ...``) every rank runs this module: rank 0
decides which videos to process, whole videos go to single ranks while there are at least as many as ranks, the
rest are processed by all ranks together (:mod:`star_core.distributed`); only rank 0 shows progress bars.
"""
from __future__ import annotations

import argparse
import gc
import glob
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from . import autosize, pipeline
from .checkpoint import check_star_checkpoint
from .distributed import DEFAULT_TIMEOUT_S, Distributed, DistributedError, plan_batch
from .identify import check_context_width
from .download import ModelsMissingError, ResolvedModels, resolve_models
from .host import HostContext, ProgressEvent
from .memory import NoPlanFits, free_cached_memory, is_out_of_memory
from .options import AUTO, SpecError
from .spec import DEFAULTS, RunSpec, default, option_info
from .train.cli import add_train_parser, run_train
from .video_io import CODECS, VIDEO_EXTENSIONS, FileSource, VideoFileSink, check_output, write_synthetic_clip

EXIT_FAILED, EXIT_MODELS_MISSING, EXIT_INTERRUPTED = 1, 3, 130
# What lowers the memory a run needs, for the out-of-memory message (largest effect first).
OOM_ADVICE = ("lower the memory a step needs: --diffusion-tile 512 (sampling), --decode-tile 512 --encode-tile 512, "
              "a shorter --chunk-len (e.g. 16), --dtype fp16, or a smaller output (--scale / --target-size)")
DEMO_FRAMES = 8  # 8 frames of 48x32, x2: small enough for a CPU, long enough to exercise windows and chunks
DEMO_NOTE = ("--demo-tiny: tiny RANDOM-weight models on a generated clip. The output is noise: this checks that the "
             "install runs end to end, not the quality.")


class InputError(ValueError):
    """A problem with the command line's inputs or outputs, reported as one line."""


def _target_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--target-size must look like HEIGHTxWIDTH (e.g. 1080x1920), got {text!r}")
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"--target-size must be positive, got {text!r}")
    return height, width


def _pixel_pair(text: str) -> tuple[int, int] | None:
    """``N`` (square), ``HxW`` or ``off`` for a (height, width) option in pixels, e.g. ``--diffusion-tile``."""
    if text.lower() in ("off", "none"):
        return None
    try:
        values = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        values = ()
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"must be pixels as N, HEIGHTxWIDTH (e.g. 512x768) or off, got {text!r}")
    return (values[0], values[-1])


# Options read from the run spec: (flags, dotted spec name) per help group. Their default, help, type, range and
# choices are the spec's; `spec_from_args` validates them all at once.
SPEC_OPTIONS: dict[str, list[tuple[str, str]]] = {
    "output size": [("--scale", "output.scale"), ("--padding", "output.padding")],
    "prompt": [("--prompt", "prompt.prompt"), ("--suffix", "prompt.suffix"),
               ("--negative-prompt", "prompt.negative_prompt")],
    "sampler": [("--solver-mode", "sampler.mode"), ("--steps", "sampler.steps"), ("--cfg", "sampler.cfg"),
                ("--rescale", "sampler.rescale"), ("--seed", "seed"), ("--chunk-len", "sampler.chunk_len"),
                ("--chunk-overlap", "sampler.overlap"), ("--chunk-fusion", "sampler.fusion"),
                ("--batch-cfg", "sampler.batch_cfg"), ("--diffusion-tile", "sampler.tile"),
                ("--diffusion-tile-overlap", "sampler.tile_overlap"), ("--diffusion-tile-blend", "sampler.tile_blend")],
    "VAE and colour": [("--posterior", "encode.posterior"), ("--encode-tile", "encode.tile"),
                       ("--encode-tile-overlap", "encode.tile_overlap"), ("--encode-tile-mode", "encode.tile_mode"),
                       ("--decode-tile", "decode.tile"), ("--decode-tile-overlap", "decode.tile_overlap"),
                       ("--decode-tile-mode", "decode.tile_mode"), ("--decode-window", "decode.window"),
                       ("--decode-window-overlap", "decode.window_overlap"), ("--colour-fix", "colour.method"),
                       ("--colour-strength", "colour.strength")],
}
FLAG_OF = {path: flag for options in SPEC_OPTIONS.values() for flag, path in options}


def _add_spec_option(group, flag: str, path: str) -> None:
    info = option_info(path)
    dest = flag.lstrip("-").replace("-", "_")
    if info.kind is bool:
        group.add_argument(flag, dest=dest, action="store_true", default=default(path), help=info.help)
        return
    kind = {"int": int, "float": float, "tuple": _pixel_pair}.get(getattr(info.kind, "__name__", ""), str)
    metavar = {int: "N", float: "X", _pixel_pair: "HxW"}.get(kind)
    if info.auto:
        kind, metavar = _or_auto(kind), f"{metavar}|auto"
    group.add_argument(flag, dest=dest, type=kind, default=default(path), help=info.help,
                       choices=info.choices, metavar=None if info.choices else metavar)


def _or_auto(kind):
    """An argparse type that also takes ``auto`` (the run sizes the option for its memory budget)."""
    def parse(text: str):
        return AUTO if text.lower() == AUTO else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def add_model_options(parser: argparse.ArgumentParser, model_help: str) -> None:
    """The "models" option group shared by the commands that load STAR's models (upscale, train)."""
    models = parser.add_argument_group("models")
    models.add_argument("--model", default="light", help=model_help)
    models.add_argument("--vae", help="SVD VAE: diffusers folder or .safetensors (default: found/downloaded)")
    models.add_argument("--text-encoder", help="OpenCLIP ViT-H-14 / SD2 CLIP-H text encoder file or folder")
    models.add_argument("--tokenizer", help="CLIP tokenizer: folder with vocab.json + merges.txt, or open_clip's vocab")
    models.add_argument("--comfy-models", type=Path, help="a ComfyUI models folder to take the files from")
    models.add_argument("--cache-dir", type=Path, help="download cache (default $STAR_VSR_CACHE or ~/.cache/star_vsr)")
    models.add_argument("--offline", action="store_true", help="never download; list what is missing instead")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m star_core`` / ``star-vsr``."""
    parser = argparse.ArgumentParser(prog="star-vsr", description="STAR video super-resolution (I2VGen-XL based).")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser(
        "upscale", help="upscale video files", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Upscale videos with STAR. Defaults follow the official inference_sr.py except where noted "
                    "(chunk fusion 'linear' cross-fades instead of hard cuts: smoother seams between 32-frame chunks; "
                    "the official code hard-codes CUDA and fp16, here --device/--dtype pick them).")
    up.add_argument("inputs", nargs="*", help="video files, folders (every video inside) or glob patterns")
    up.add_argument("-o", "--output", required=True, type=Path,
                    help="output file (one input) or folder (created; outputs keep the input names)")
    up.add_argument("--demo-tiny", action="store_true",
                    help="install self-check: tiny random models (the output is noise); without inputs it runs a "
                         "generated 8-frame clip at x2 with minimal padding and 4-frame chunks")
    up.add_argument("--target-size", type=_target_size, metavar="HxW",
                    help="explicit output size instead of --scale")
    for title, options in SPEC_OPTIONS.items():
        group = up.add_argument_group(title)
        for flag, path in options:
            _add_spec_option(group, flag, path)

    add_model_options(up, "'light' (lightly degraded, e.g. web video), 'heavy' (heavily degraded) or a checkpoint "
                          "path")

    run = up.add_argument_group("run")
    run.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...")
    run.add_argument("--dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto",
                     help="UNet weight dtype; auto = fp16 on GPU (official), fp32 on CPU. VAE and text stay fp32")
    run.add_argument("--memory-budget", type=float, default=None, metavar="GiB",
                     help="device memory the run may use, weights included, for the 'auto' sizes (chunk length, "
                          "diffusion and VAE tiles, decode window); default: the device's free memory plus what "
                          "the models occupy (the available RAM on CPU)")
    run.add_argument("--threads", type=int, default=None,
                     help="CPU threads for torch (None: torch's choice; 1 helps on an overloaded machine)")
    run.add_argument("--codec", choices=tuple(CODECS), default="h264",
                     help="h264 (CRF 16), h264-lossless (exact RGB), h265, ffv1 (lossless, .mkv)")
    run.add_argument("--crf", type=int, default=None, help="quality of h264/h265 (lower = better)")
    run.add_argument("--no-audio", action="store_true", help="do not copy the input's audio")
    run.add_argument("--skip-existing", action="store_true", help="skip inputs whose output already exists")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                     help="under torchrun: how long a rank may wait for the others (e.g. for a slow model load or an "
                          "uneven share) before the run is ended as hung; a rank that fails or dies ends the run "
                          "within seconds")
    fetch = commands.add_parser("download", help="fetch (or locate) the model files without processing anything",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    fetch.add_argument("--model", default="light", help="'light', 'heavy' or a checkpoint path")
    fetch.add_argument("--comfy-models", type=Path, help="a ComfyUI models folder to take the files from")
    fetch.add_argument("--cache-dir", type=Path, help="download cache (default $STAR_VSR_CACHE or ~/.cache/star_vsr)")
    fetch.add_argument("--offline", action="store_true", help="only check what is present")
    add_train_parser(commands)
    return parser


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    """The run spec of the command line, validated before any model is loaded (errors name the flag)."""
    values = {path: getattr(args, flag.lstrip("-").replace("-", "_")) for path, flag in FLAG_OF.items()}
    if args.target_size is not None:
        values["output.target"] = args.target_size
    try:
        return DEFAULTS.with_options({path: value for path, value in values.items() if value != default(path)})
    except SpecError as exc:
        flag = FLAG_OF.get(exc.path, "--target-size" if exc.path == "output.target" else exc.path)
        raise InputError(f"{flag} {exc.problem}") from None


def run_download(args: argparse.Namespace) -> int:
    """Runs the ``download`` command: resolve every model file (downloading what is missing) and list them."""
    models = resolve_models(args.model, comfy_models=args.comfy_models, cache_dir=args.cache_dir,
                            offline=args.offline)
    for name, path in vars(models).items():
        print(f"{name}: {path}")
    return 0


# ----------------------------------------------------------------------------------------------- inputs/outputs

def expand_inputs(items: list[str], log: Callable[[str], None] | None = None) -> list[tuple[Path, bool]]:
    """Input videos from files, folders and globs, as ``(path, came_from_a_collection)`` in a stable order; files
    of a folder without a video extension are left out (and listed through ``log``)."""
    found: list[tuple[Path, bool]] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file())
            videos = [p for p in files if p.suffix.lower() in VIDEO_EXTENSIONS]
            if not videos:
                raise InputError(f"input folder {path} holds no video files ({', '.join(VIDEO_EXTENSIONS)})")
            others = [p.name for p in files if p not in videos and not p.name.startswith(".")]
            if others and log is not None:
                log(f"{path}: ignoring {len(others)} file(s) without a video extension: {', '.join(others)}")
            found.extend((p, True) for p in videos)
        elif path.is_file():
            found.append((path, False))
        elif glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item) if Path(p).is_file())
            if not matches:
                raise InputError(f"input pattern {item!r} matches no file")
            found.extend((p, True) for p in matches)
        else:
            raise InputError(f"input {item} does not exist: give a video file, a folder or a glob pattern")
    return found


def plan_outputs(inputs: list[tuple[Path, bool]], output: Path, codec: str) -> list[tuple[Path, Path]]:
    """Pairs each input with its output: ``output`` itself for one file and a video extension, else a folder."""
    extension = ".mkv" if codec == "ffv1" else ".mp4"
    single_file = len(inputs) == 1 and not inputs[0][1] and output.suffix.lower() in VIDEO_EXTENSIONS \
        and not output.is_dir()
    if single_file:
        pairs = [(inputs[0][0], output)]
    else:
        if output.exists() and not output.is_dir():
            raise InputError(f"-o {output} is a file but there are {len(inputs)} inputs: give a folder")
        pairs = [(src, output / f"{src.stem}{extension}") for src, _ in inputs]
        names = [dst for _, dst in pairs]
        if len(set(names)) != len(names):
            raise InputError("two inputs have the same name and would write the same output: process them separately")
    sources = [src for src, _ in inputs]
    for own, dst in pairs:
        for src in sources:
            if dst.resolve() == src.resolve() or (dst.exists() and os.path.samefile(dst, src)):
                which = "its input" if src == own else f"another input, {src}"
                raise InputError(f"output {dst} would overwrite {which}: choose another output")
        for parent in dst.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise InputError(f"output {dst} cannot be written: {parent} is a file, not a folder")
                break
    return pairs


# ------------------------------------------------------------------------------------------------------ models

def pick_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else is validated by torch. Under torchrun a CUDA device
    must not name an index: each rank uses ``cuda:LOCAL_RANK``."""
    if Distributed.launched() and name.startswith("cuda:"):
        raise InputError(f"--device {name}: under torchrun each rank uses the GPU of its LOCAL_RANK; give --device "
                         "cuda (or auto) and pick the GPUs with CUDA_VISIBLE_DEVICES")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"--device {name!r} is not a device ({exc}): use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but this torch has no CUDA device: use --device cpu")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` → fp16 on GPU (the official ``.half()``), fp32 on CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def load_text_encoder(models: ResolvedModels, device: torch.device):
    """The CLIP-H text encoder (fp32, like the official code), with its tokenizer."""
    from .text import load_text_encoder as load

    return load(models.text_encoder, tokenizer=models.tokenizer, device=device)


def load_vae(models: ResolvedModels, device: torch.device):
    """The SVD VAE in fp32 (the official code keeps it fp32); folders with only fp16 weights load that variant."""
    from .vae import load_svd_vae

    path = models.vae
    variant = None
    if path.is_dir() and not (path / "diffusion_pytorch_model.safetensors").is_file() \
            and (path / "diffusion_pytorch_model.fp16.safetensors").is_file():
        variant = "fp16"
    return load_svd_vae(path, variant=variant, device=device, dtype=torch.float32)


def load_unet(models: ResolvedModels, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The STAR UNet + ControlNet in ``dtype`` on ``device``."""
    from .checkpoint import load_star_model

    return load_star_model(models.star, dtype=dtype, device=device)


# -------------------------------------------------------------------------------------------------- progress

class Progress:
    """tqdm bars for a video's progress events: encode (VAE tiles), sampler steps and model calls, decode."""

    LABELS = {"encode": ("encode", "tile"), "sample": ("model calls", "call"), "steps": ("steps", "step"),
              "decode": ("decode", "tile")}

    def __init__(self, name: str, enabled: bool) -> None:
        self.name, self.enabled = name, enabled
        self.bars: dict[str, tqdm] = {}

    def _set(self, key: str, done: int, total: int) -> None:
        if key not in self.bars:
            desc, unit = self.LABELS.get(key, (key, "it"))
            self.bars[key] = tqdm(total=total, desc=f"{self.name}: {desc}", unit=unit, disable=not self.enabled,
                                  leave=False, dynamic_ncols=True)
        bar = self.bars[key]
        bar.total = total
        bar.update(done - bar.n)

    def __call__(self, event: ProgressEvent) -> None:
        if event.stage == "sample" and event.step is not None:
            self._set("steps", event.step, event.steps)
        self._set(event.stage, event.done, event.total)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


# ---------------------------------------------------------------------------------------------------- driver

def write_demo_text_encoder(path: Path, seed: int = 3) -> Path:
    """A 2-layer random text tower of CLIP-H width (1024) and vocabulary, in the HF ``CLIPTextModel`` layout.

    The tiny models tree's own CLIP-H is full depth (354 M parameters, ~45 s to generate here); the demo only
    needs something the real loader reads and whose width matches the UNet's 1024-wide context.
    """
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tiny_models import CLIP_H, random_weights

    config = CLIPTextConfig(**{**CLIP_H, "num_hidden_layers": 2, "intermediate_size": 1024})
    with torch.device("meta"):
        model = CLIPTextModel(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    norms = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(random_weights(shapes, seed, torch.float16, norm_keys=norms), str(path))
    return path


def write_demo_models(models: Path) -> None:
    """The --demo-tiny models tree: tiny STAR + narrow SVD VAE from `star_core.tiny_models`, a small text tower."""
    from .tiny_models import write_tree

    write_tree(models, parts=("star", "vae_tiny"))
    write_demo_text_encoder(models / "text_encoders" / "clip_h_demo.safetensors")


@contextmanager
def _demo_setup(args: argparse.Namespace) -> Iterator[None]:
    """For --demo-tiny: write the tiny models tree (and a clip when no input was given) into a temp folder."""
    from .text.vocab import fetch_openclip_vocab
    from .tiny_models import FILES

    with tempfile.TemporaryDirectory(prefix="star_demo_") as tmp:
        print(DEMO_NOTE, file=sys.stderr)
        models = Path(tmp) / "models"
        write_demo_models(models)
        args.comfy_models, args.offline = models, True
        args.model = str(models / FILES["star"])
        args.tokenizer = args.tokenizer or fetch_openclip_vocab()
        # tiny networks gain little from more threads, and spinning OpenMP threads crawl on a busy machine
        args.threads = args.threads or 1
        if not args.inputs:
            clip = write_synthetic_clip(Path(tmp) / "demo_input.mp4", frames=DEMO_FRAMES, width=48, height=32, fps=24)
            args.inputs = [str(clip)]
            # the generated clip runs x2 with minimal padding and 4-frame chunks (options left at their defaults)
            args.padding = "minimal" if args.padding == default("output.padding") else args.padding
            args.scale = 2.0 if args.scale == default("output.scale") else args.scale
            args.chunk_len = 4 if args.chunk_len == default("sampler.chunk_len") else args.chunk_len
        yield


def load_components(args: argparse.Namespace, spec: RunSpec, device: torch.device) -> pipeline.Components:
    """Every model of the batch, loaded once: the text contexts (the text encoder is freed after), the VAE, the UNet."""
    models = resolve_models(args.model, vae=args.vae, text_encoder=args.text_encoder, tokenizer=args.tokenizer,
                            comfy_models=args.comfy_models, cache_dir=args.cache_dir, offline=args.offline)
    star_config = check_star_checkpoint(models.star)  # a wrong --model fails here, before any other model loads
    text_encoder = load_text_encoder(models, device)
    positive, negative = pipeline.encode_prompts(text_encoder, spec.prompt.prompt, suffix=spec.prompt.suffix,
                                                 negative_prompt=spec.prompt.negative_prompt)
    check_context_width(positive, star_config.context_dim, f"the context of --text-encoder {models.text_encoder}")
    del text_encoder
    gc.collect()
    vae = load_vae(models, device)
    unet = load_unet(models, device, pick_dtype(args.dtype, device))
    return pipeline.Components(unet, vae, positive, negative)


def out_of_memory_message(error: BaseException, fixed: Sequence[str] = ()) -> str:
    """One line for a video that ran out of memory: what ran out and what lowers the memory a step needs; `fixed`
    names the size flags the user set (auto sizing leaves them alone)."""
    if isinstance(error, NoPlanFits):  # the retry's own verdict: names the smallest plan tried and what it needs
        hand = f"; set by hand: {', '.join(fixed)} ('auto' lets the run choose smaller)" if fixed else ""
        return str(error) + hand
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"out of memory ({first}); {OOM_ADVICE}"


def _log(message: str) -> None:
    """A note for the user: one line on stderr, printed between the progress bars."""
    tqdm.write(message, file=sys.stderr)


def _file_spec(spec: RunSpec, source: FileSource, log: Callable[[str], None] | None = None) -> RunSpec:
    """The spec for one file: ``--target-size`` names the picture as shown, so for a file shown rotated by 90 or
    270 degrees it is swapped to the stored frames (which are what is upscaled); ``log`` gets a note saying so."""
    target = spec.output.target
    if target is None or round(source.video.rotation) % 180 == 0:
        return spec
    if log is not None:
        log(f"{source.info.name}: shown rotated by {source.video.rotation:g} degrees: --target-size "
            f"{target[0]}x{target[1]} applies to the picture as shown, {target[1]}x{target[0]} to the stored frames")
    return spec.with_options({"output.target": (target[1], target[0])})


def memory_budget(args: argparse.Namespace, components: pipeline.Components, device: torch.device) -> int | None:
    """Bytes the run may use for its ``auto`` sizes: ``--memory-budget``, else the device's free memory plus the
    models' weights on it (measured before each video)."""
    if args.memory_budget is not None:
        return int(args.memory_budget * 2**30)
    modules = [m for m in (components.model, getattr(components.vae, "model", None)) if isinstance(m, torch.nn.Module)]
    return autosize.device_budget(device, modules)


def shared_budget(work: Distributed, budget: int | None) -> int | None:
    """The budget every rank sizes its shared videos for: the smallest of the ranks' (the ranks must choose the
    same windows to share the sampler's work)."""
    if not work.active:
        return budget
    values = work.exchange({work.rank: torch.tensor([-1 if budget is None else budget], dtype=torch.int64)},
                           [(1,)] * work.world_size, list(range(work.world_size)), stage="control",
                           what="the memory budgets", dtype=torch.int64, device="cpu")
    known = [int(value) for value in values if int(value) >= 0]
    return min(known) if known else None


def _probe(pairs: list[tuple[Path, Path]], indices: list[int], spec: RunSpec, codec: str,
           crf: int | None) -> tuple[list[int], list[float], list[str]]:
    """
    Opens the inputs ``indices`` before any model is loaded, so unreadable inputs and outputs the codec cannot
    write fail fast; logs what will change about an input (truncated, alpha, bit depth, rotation).

    Returns:
        `tuple`: the runnable indices, their work (frames x pixels) and one error line per bad input.
    """
    checked, costs, errors = [], [], []
    for index in indices:
        src = pairs[index][0]
        try:
            source = FileSource(src)
            check_output(codec, crf, pipeline.plan(source.info, _file_spec(spec, source, _log)).target_size)
        except (ValueError, FileNotFoundError) as exc:
            errors.append(f"error: {exc}")
            continue
        for note in source.video.notes():
            _log(f"{src.name}: {note}")
        checked.append(index)
        costs.append(float(source.info.frames * source.info.width * source.info.height))
    return checked, costs, errors


def _upscale_one(src: Path, dst: Path, args: argparse.Namespace, spec: RunSpec, components: pipeline.Components,
                 host: HostContext, tag: str) -> None:
    """One video from file to file through :func:`pipeline.run` (on every rank of a shared video); an existing
    output is replaced only once the new video is complete (said in the log)."""
    started = time.perf_counter()
    if dst.exists():
        host.log(f"{dst} exists: it is replaced once the new video is complete (--skip-existing keeps it)")
    try:
        source = FileSource(src)
        audio = src if source.video.has_audio and not args.no_audio else None
        sink = VideoFileSink(dst, codec=args.codec, crf=args.crf, audio_from=audio, source=source, log=host.log)
        pipeline.run(source, sink, _file_spec(spec, source), components, host)
    finally:
        if isinstance(host.progress, Progress):
            host.progress.close()
    if host.distributed is None or host.distributed.is_main:
        print(f"{tag}{src} -> {dst} ({source.info.frames} frames, {time.perf_counter() - started:.1f} s)",
              file=sys.stderr)


def run_upscale(args: argparse.Namespace) -> int:
    """Runs the ``upscale`` command; returns the process exit code (under torchrun: this rank's)."""
    if not args.inputs and not args.demo_tiny:
        raise InputError("give at least one input video (or --demo-tiny for the install self-check)")
    try:
        check_output(args.codec, args.crf)
    except ValueError as exc:
        raise InputError(f"--{exc}") from None
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be >= 1, got {args.threads}")
    if args.dist_timeout <= 0:
        raise InputError(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")
    if args.memory_budget is not None and not args.memory_budget > 0:
        raise InputError(f"--memory-budget must be a positive number of GiB, got {args.memory_budget}")
    pairs = plan_outputs(expand_inputs(args.inputs, _log), args.output, args.codec)
    spec = spec_from_args(args)
    device = pick_device(args.device)
    if not Distributed.launched():
        return _upscale_batch(args, spec, pairs, device, Distributed())
    work = Distributed.from_env(device, timeout=args.dist_timeout)
    try:
        with work.guard():
            return _upscale_batch(args, spec, pairs, work.device, work)
    except BaseException as exc:  # noqa: BLE001 - every failure of a rank ends it here, after the guard posted it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the launcher stops the others now: say why first
        known = (DistributedError, InputError, ValueError, FileNotFoundError, ModelsMissingError, NoPlanFits)
        detail = str(exc) if isinstance(exc, known) else "".join(traceback.format_exception(exc))
        print(f"error: [rank {work.rank}] {detail}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # leave at once: a collective another rank never joins would block the interpreter's exit
        os._exit(EXIT_MODELS_MISSING if isinstance(exc, ModelsMissingError) else EXIT_FAILED)


def _upscale_batch(args: argparse.Namespace, spec: RunSpec, pairs: list[tuple[Path, Path]], device: torch.device,
                   work: Distributed) -> int:
    """Skips, probes and spreads the videos over the ranks (rank 0 decides), loads the models once, processes.
    Outside torchrun a video that fails (bad input, out of memory) is reported and the batch goes on, and Ctrl-C
    stops with one line."""
    tag = f"[rank {work.rank}] " if work.active else ""
    plan = None
    if work.is_main:
        todo = [i for i, (_, dst) in enumerate(pairs) if not (args.skip_existing and dst.exists())]
        for src, dst in (pairs[i] for i in sorted(set(range(len(pairs))) - set(todo))):
            print(f"skip {src}: {dst} exists (--skip-existing)", file=sys.stderr)
        checked, costs, errors = _probe(pairs, todo, spec, args.codec, args.crf)  # before loading any model
        for error in errors:
            print(error, file=sys.stderr)
        plan = (checked, plan_batch(costs, work.world_size), len(errors), len(todo))
    checked, batch, probe_failures, total = work.broadcast(plan, what="the batch plan")
    failures = probe_failures if work.is_main else 0
    if not checked:
        return EXIT_FAILED if probe_failures else 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    components = load_components(args, spec, device)
    log = _log if work.is_main else (lambda message: None)

    def host_for(src: Path, **extra) -> HostContext:
        return HostContext(device=device, progress=Progress(src.name, enabled=not args.quiet and work.is_main),
                           log=lambda message: log(f"{src.name}: {message}"), **extra)

    # the shared videos first, while the ranks are in step; then each rank's own videos, without communication
    for position in batch.shared:
        src, dst = pairs[checked[position]]
        budget = shared_budget(work, memory_budget(args, components, device))
        _upscale_one(src, dst, args, spec, components, host_for(src, distributed=work, memory_budget=budget), tag)
    own = batch.own[work.rank]
    for done, position in enumerate(own):
        src, dst = pairs[checked[position]]
        host = host_for(src, memory_budget=memory_budget(args, components, device))
        try:
            _upscale_one(src, dst, args, spec, components, host, tag)
        except (ValueError, FileNotFoundError) as exc:
            failures += 1
            print(f"error: {tag}{src}: {exc}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - out of memory only (this video did not fit, the next may)
            if not (isinstance(exc, MemoryError) or is_out_of_memory(exc, host.oom_errors)):
                raise
            failures += 1
            free_cached_memory()
            fixed = [FLAG_OF[path] for path in autosize.AUTO_OPTIONS if spec.get(path) != AUTO]
            print(f"error: {tag}{src}: {out_of_memory_message(exc, fixed)}", file=sys.stderr)
        except KeyboardInterrupt:
            if work.active:
                raise
            print(f"interrupted: stopped during {src.name} (no output written for it); {done} of {len(own)} "
                  "videos finished", file=sys.stderr)
            return EXIT_INTERRUPTED
    failures = work.finish(failures)  # every rank ends with the same status (torchrun stops all at the first error)
    if args.demo_tiny and work.is_main:
        print("demo finished; reminder: the tiny models are random, so the video is noise.", file=sys.stderr)
    if failures and work.is_main:
        print(f"{failures} of {total} videos failed (see the errors above)", file=sys.stderr)
    return EXIT_FAILED if failures else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m star_core`` and ``star-vsr``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "download":
            return run_download(args)
        if args.command == "train":
            return run_train(args)
        if args.demo_tiny:
            with _demo_setup(args):
                return run_upscale(args)
        return run_upscale(args)
    except ModelsMissingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_MODELS_MISSING
    except (InputError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted: stopped before any video was written", file=sys.stderr)
        return EXIT_INTERRUPTED
