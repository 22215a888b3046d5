"""The fine-tuning loop: AdamW, accumulation, autocast, clipping, periodic validation and resumable checkpoints.

Output folder layout::

    OUT/log.jsonl                          one line per optimizer step (loss terms, grad norm, lr, seconds)
    OUT/checkpoints/step_000500/           every --save-every steps (the last ``keep`` are kept):
        finetune.safetensors               the fine-tune as a delta of the base checkpoint (loads anywhere)
        trainable.safetensors              fp32 master weights of the trainable set
        state.pt                           step, optimizer and grad-scaler state, settings
    OUT/validation/step_000500.mp4         LQ | restored | HQ of the validation clips (every --validate-every)
    OUT/<name>.safetensors                 the final fine-tune (delta), and with --merge a full checkpoint

Every random draw of a step (data sample, VAE posterior noise, t, diffusion noise, DF indices, dropout) is
seeded from the run seed and the step's position, so a resumed run continues exactly like an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..checkpoint import save_delta
from .data import ClipDataset, SeededSampler, collate
from .network import DROPOUT_MODES, TRAINABLE_SETS, prepare_for_training
from .step import StepResult, StepSettings, encode_clips, step_loss

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CLIP_MODES = {
    "all": "clip the gradient norm of every trainable tensor together",
    "official": "clip only the ControlNet's gradients (the released script; the UNet-side LIEM weights go unclipped)",
    "none": "no clipping",
}
DELTA_NAME, MASTER_NAME, STATE_NAME = "finetune.safetensors", "trainable.safetensors", "state.pt"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings; defaults are the official ones except ``clip``, ``dropout`` and ``step.df_gradient``.

    Parameters:
        steps (`int`): optimizer steps in total (official 15 000 on 8 GPUs).
        lr (`float`): AdamW learning rate (official 5e-5).
        weight_decay (`float`): AdamW weight decay (official 1e-2).
        warmup (`int`): linear learning-rate warm-up steps (official none: 0).
        batch (`int`): clips per micro-batch and process (official 1).
        grad_accum (`int`): micro-batches per optimizer step.
        precision (`str`): autocast dtype, ``"fp32"`` (none), ``"bf16"`` or ``"fp16"`` (with loss scaling).
        max_grad_norm (`float`): clipping threshold (official 1.0).
        clip (`str`): which gradients are clipped, see `CLIP_MODES` (official: ``"official"``).
        trainable (`str`): see `star_core.train.network.TRAINABLE_SETS`.
        dropout (`str`): see `star_core.train.network.DROPOUT_MODES` (official: ``"official"``).
        checkpointing (`bool`): activation checkpointing of the network layers and of the DF decode.
        seed (`int`): run seed.
        save_every (`int`): checkpoint interval in steps (0: only at the end).
        validate_every (`int`): validation interval in steps (0: never).
        keep (`int`): checkpoints kept in ``OUT/checkpoints``.
        workers (`int`): data-loader worker processes.
        step (`StepSettings`): the loss settings.
    """

    steps: int = 1000
    lr: float = 5e-5
    weight_decay: float = 1e-2
    warmup: int = 0
    batch: int = 1
    grad_accum: int = 1
    precision: str = "fp32"
    max_grad_norm: float = 1.0
    clip: str = "all"
    trainable: str = "official"
    dropout: str = "trainable"
    checkpointing: bool = False
    seed: int = 0
    save_every: int = 500
    validate_every: int = 0
    keep: int = 2
    workers: int = 0
    step: StepSettings = field(default_factory=StepSettings)

    def __post_init__(self) -> None:
        checks = {"precision": (self.precision, PRECISIONS), "clip": (self.clip, CLIP_MODES),
                  "trainable": (self.trainable, TRAINABLE_SETS), "dropout": (self.dropout, DROPOUT_MODES)}
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"{name} must be one of {sorted(allowed)}, got {value!r}")
        if min(self.steps, self.batch, self.grad_accum, self.keep) < 1 or min(self.warmup, self.workers) < 0 \
                or self.lr <= 0 or self.max_grad_norm <= 0:
            raise ValueError(f"steps, batch, grad_accum and keep must be >= 1, warmup and workers >= 0, lr and "
                             f"max_grad_norm > 0; got {self}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), so neighbouring steps get unrelated streams."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return state >> 1


def distributed() -> tuple[int, int]:
    """``(rank, world)``; joins the process group when launched by torchrun (``WORLD_SIZE`` > 1)."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class Validation:
    """Fixed validation clips: a deterministic loss at fixed timesteps and, optionally, restored videos.

    Parameters:
        items (`list[dict]`): dataset items (``hq``, ``lq`` ``[F,3,H,W]`` in [-1, 1], ``caption``).
        t_values (`tuple[int, ...]`): timesteps of the validation loss.
        videos (`bool`): also sample each clip with the inference sampler and write LQ | restored | HQ videos.
        positive, negative (`torch.Tensor`, *optional*): ``[1,77,1024]`` contexts of the sampler (needed for videos).
        seed (`int`): seed of every draw of the validation.
    """

    items: list[dict]
    t_values: tuple[int, ...] = (100, 500, 900)
    videos: bool = True
    positive: torch.Tensor | None = None
    negative: torch.Tensor | None = None
    seed: int = 1234


class Trainer:
    """
    Fine-tunes a STAR network.

    Parameters:
        model (`torch.nn.Module`): `STARUNet`, loaded on ``device`` with the frozen parts in their storage dtype.
        vae (`SVDVideoVAE`): the VAE, on ``device``.
        dataset (`ClipDataset`): the training clips.
        contexts (`Mapping[str, torch.Tensor]` or `Callable`): caption → ``[77,1024]`` text context (precomputed
            for `ClipDataset.captions`).
        settings (`TrainSettings`): optimisation settings.
        output (`Path`): the output folder.
        base (`Path`): the base checkpoint file (deltas name it).
        device (`torch.device`): where the step runs.
        validation (`Validation`, *optional*): what to validate on.
        save_dtype (`torch.dtype`, *optional*): dtype of the saved delta (default: the base's storage dtype).
    """

    def __init__(self, model: torch.nn.Module, vae, dataset: ClipDataset,
                 contexts: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor], settings: TrainSettings,
                 output: str | Path, base: str | Path, *, device: torch.device | str = "cpu",
                 validation: Validation | None = None, save_dtype: torch.dtype | None = None) -> None:
        self.model, self.vae, self.dataset, self.settings = model, vae, dataset, settings
        self.contexts = contexts
        self.output, self.base, self.device = Path(output), Path(base), torch.device(device)
        self.validation = validation
        self.save_dtype = save_dtype or next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.rank, self.world = distributed()
        self.params = prepare_for_training(model, trainable=settings.trainable, dropout=settings.dropout,
                                           checkpointing=settings.checkpointing)
        self.optimizer = torch.optim.AdamW([p for _, p in self.params], lr=settings.lr,
                                           weight_decay=settings.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=settings.precision == "fp16")
        self.net = model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                               else None)
        self.step = 0
        self.last_saved: Path | None = None
        self.history: list[dict] = []

    # ---------------------------------------------------------------------------------------------- state

    @property
    def checkpoints(self) -> Path:
        return self.output / "checkpoints"

    def delta_tensors(self) -> dict[str, torch.Tensor]:
        """The trainable tensors in the save dtype (what a delta holds)."""
        return {name: p.detach().to("cpu", self.save_dtype) for name, p in self.params}

    def save(self) -> Path:
        """Writes ``OUT/checkpoints/step_NNNNNN`` (delta, fp32 masters, optimizer state); keeps the last ``keep``."""
        folder = self.checkpoints / f"step_{self.step:06d}"
        if self.rank == 0:
            tmp = folder.with_name(folder.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            meta = {"star_train": self.settings.to_json(), "star_step": str(self.step)}
            save_delta(tmp / DELTA_NAME, self.delta_tensors(), self.base, meta)
            save_file({n: p.detach().to("cpu").contiguous() for n, p in self.params}, str(tmp / MASTER_NAME))
            torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(),
                        "scaler": self.scaler.state_dict(), "settings": self.settings.to_json(),
                        "trainable": [n for n, _ in self.params], "base_name": self.base.name,
                        "base_size": self.base.stat().st_size}, tmp / STATE_NAME)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
            done = sorted(p for p in self.checkpoints.glob("step_*") if not p.name.endswith(".partial"))
            for old in done[:-self.settings.keep]:
                shutil.rmtree(old, ignore_errors=True)
        if self.world > 1:
            dist.barrier()
        self.last_saved = folder
        return folder

    @staticmethod
    def latest_checkpoint(path: str | Path) -> Path:
        """A checkpoint folder: ``path`` itself, or the newest ``step_*`` under ``path`` or ``path/checkpoints``."""
        path = Path(path)
        if (path / STATE_NAME).is_file():
            return path
        for root in (path / "checkpoints", path):
            found = sorted(p for p in root.glob("step_*") if (p / STATE_NAME).is_file()) if root.is_dir() else []
            if found:
                return found[-1]
        raise FileNotFoundError(f"no training checkpoint to resume in {path}: expected a step_NNNNNN folder with "
                                f"{STATE_NAME} (in {path} or {path / 'checkpoints'})")

    def resume(self, path: str | Path) -> int:
        """Loads the master weights, optimizer and scaler state of a checkpoint; returns the step it continues at."""
        folder = self.latest_checkpoint(path)
        state = torch.load(folder / STATE_NAME, map_location="cpu", weights_only=True)
        names = [n for n, _ in self.params]
        if state["trainable"] != names:
            raise ValueError(f"{folder} was trained with another trainable set ({len(state['trainable'])} tensors, "
                             f"this run has {len(names)}): resume with the same --trainable")
        if state["base_name"] != self.base.name or state["base_size"] != self.base.stat().st_size:
            raise ValueError(f"{folder} fine-tunes {state['base_name']} ({state['base_size']:,} bytes), not "
                             f"{self.base.name}: resume from the same base checkpoint")
        masters = load_file(str(folder / MASTER_NAME))
        with torch.no_grad():
            for name, param in self.params:
                param.copy_(masters[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.last_saved = folder
        return self.step

    def write_final(self, name: str = "finetune") -> Path:
        """The fine-tune as ``OUT/<name>.safetensors`` (a delta of the base)."""
        path = self.output / f"{name}.safetensors"
        if self.rank == 0:
            save_delta(path, self.delta_tensors(), self.base,
                       {"star_train": self.settings.to_json(), "star_step": str(self.step)})
        return path

    # ----------------------------------------------------------------------------------------------- step

    def _context(self, captions: list[str]) -> torch.Tensor:
        get = self.contexts if callable(self.contexts) else self.contexts.__getitem__
        return torch.stack([get(c) for c in captions]).to(self.device)

    def _autocast(self):
        dtype = PRECISIONS[self.settings.precision]
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def micro_step(self, batch: dict, seed: int) -> StepResult:
        """Forward of one micro-batch with every draw from ``seed`` (no backward)."""
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(_mix(seed, 1))  # dropout masks (global generators of every device)
        hq, lq = batch["hq"].to(self.device), batch["lq"].to(self.device)
        with torch.no_grad():
            z_hq, z_lq = encode_clips(self.vae, hq, generator), encode_clips(self.vae, lq, generator)
        with self._autocast():
            return step_loss(self.net, self.vae, z_hq, z_lq, self._context(batch["caption"]), hq, self.settings.step,
                             generator=generator)

    def _clip(self) -> torch.Tensor:
        params = [p for n, p in self.params if self.settings.clip != "official" or n.startswith("VideoControlNet.")]
        limit = self.settings.max_grad_norm if self.settings.clip != "none" else math.inf
        return torch.nn.utils.clip_grad_norm_(params, limit)

    def _check_finite(self, result: StepResult, micro: int) -> None:
        finite = torch.isfinite(result.loss.detach()).to(torch.float32)
        if self.world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            last = (f"the last good checkpoint is {self.last_saved}" if self.last_saved is not None
                    else "no checkpoint was saved before it")
            hint = " (fp16 overflows easily: try --precision bf16)" if self.settings.precision == "fp16" else ""
            raise TrainingDiverged(f"the training loss became {result.loss.item()} at step {self.step + 1} "
                                   f"(micro-batch {micro + 1}); training stopped without applying it, {last}. "
                                   f"Lower --lr or check the data{hint}")

    def optimizer_step(self, batches) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches drawn from ``batches``; returns the logged terms."""
        s = self.settings
        started = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = s.lr * min(1.0, (self.step + 1) / s.warmup) if s.warmup else s.lr
        sums: dict[str, float] = {}
        for micro in range(s.grad_accum):
            batch = next(batches)
            sync = micro == s.grad_accum - 1 or self.world == 1
            context = self.net.no_sync() if not sync else _null()
            with context:
                result = self.micro_step(batch, _mix(s.seed, self.step, micro, self.rank))
                self._check_finite(result, micro)
                self.scaler.scale(result.loss / s.grad_accum).backward()
            for key, value in result.terms().items():
                sums[key] = sums.get(key, 0.0) + value / s.grad_accum
        self.scaler.unscale_(self.optimizer)
        norm = self._clip()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, **sums, "grad_norm": norm.item(), "lr": self.optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - started}

    # ------------------------------------------------------------------------------------------ validation

    def validate(self) -> dict:
        """Validation loss at fixed t (mean over clips and t) and, if asked, ``OUT/validation/step_N.mp4``."""
        v = self.validation
        self.model.eval()
        losses = []
        try:
            with torch.no_grad():
                for i, item in enumerate(v.items):
                    batch = collate([item])
                    for t in v.t_values:
                        generator = torch.Generator().manual_seed(_mix(v.seed, i, t))
                        hq, lq = batch["hq"].to(self.device), batch["lq"].to(self.device)
                        z_hq, z_lq = encode_clips(self.vae, hq, generator), encode_clips(self.vae, lq, generator)
                        with self._autocast():
                            result = step_loss(self.model, self.vae, z_hq, z_lq, self._context(batch["caption"]), hq,
                                               self.settings.step, t=torch.tensor([t]), generator=generator)
                        losses.append(result.loss.item())
                if v.videos and self.rank == 0:
                    self._write_videos()
        finally:
            self.model.train()
        return {"step": self.step, "val_loss": sum(losses) / len(losses)}

    def _write_videos(self) -> Path:
        from ..pipeline import sample
        from ..seeds import RunNoise
        from ..video_io import VideoWriter

        v = self.validation
        rows = []
        for i, item in enumerate(v.items):
            lq = item["lq"].to(self.device)
            z_lq = self.vae.encode(lq, generator=torch.Generator().manual_seed(_mix(v.seed, i)))
            with self._autocast():
                latent = sample(self.model, z_lq, v.positive.to(self.device), v.negative.to(self.device),
                                noise=RunNoise(_mix(v.seed, i, 1) % 2**63))
            restored = self.vae.decode(latent.float()).cpu()
            rows.append(torch.cat([item["lq"], restored.clamp(-1, 1), item["hq"]], dim=-1))
        frames = ((torch.cat(rows, dim=-2) * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        path = self.output / "validation" / f"step_{self.step:06d}.mp4"
        with VideoWriter(path, frames.shape[-1], frames.shape[-2], 8, codec="h264") as writer:
            writer.write(frames.permute(0, 2, 3, 1).numpy())
        return path

    # ------------------------------------------------------------------------------------------------ loop

    def batches(self):
        """Micro-batches from the current step on (data-loader over the seeded sampler)."""
        s = self.settings
        start = self.step * s.grad_accum * s.batch * self.world
        sampler = SeededSampler(len(self.dataset), s.seed, start, self.rank, self.world)
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=s.batch, sampler=sampler,
                                             num_workers=s.workers, collate_fn=collate,
                                             persistent_workers=s.workers > 0)
        return iter(loader)

    def train(self, progress: bool = True, log: Callable[[str], None] | None = None) -> list[dict]:
        """
        Runs the remaining steps: saves every ``save_every`` steps and at the end, validates every
        ``validate_every`` steps, appends each step's terms to ``OUT/log.jsonl``.

        Raises:
            TrainingDiverged: the loss became NaN/inf (nothing of that step is applied or saved).
        """
        from tqdm import tqdm

        s = self.settings
        self.output.mkdir(parents=True, exist_ok=True)
        batches = self.batches()
        bar = tqdm(total=s.steps, initial=self.step, desc="train", unit="step",
                   disable=not progress or self.rank != 0)
        log_file = self.output / "log.jsonl"
        try:
            while self.step < s.steps:
                record = self.optimizer_step(batches)
                if s.validate_every and self.validation is not None and self.step % s.validate_every == 0:
                    record.update(self.validate())
                if self.rank == 0:
                    with open(log_file, "a") as handle:
                        handle.write(json.dumps(record) + "\n")
                self.history.append(record)
                bar.update(1)
                bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "loss_v", "loss_df", "val_loss")
                                 if k in record})
                if (s.save_every and self.step % s.save_every == 0) or self.step == s.steps:
                    self.save()
                    if log is not None:
                        log(f"step {self.step}: saved {self.last_saved}")
        finally:
            bar.close()
        return self.history


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
