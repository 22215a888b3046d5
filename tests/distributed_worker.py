"""Tiny distributed runs for tests/test_distributed.py: ``torchrun --nproc-per-node N tests/distributed_worker.py OUT``
(or plain ``python tests/distributed_worker.py OUT`` for the one-process reference). Rank 0 saves to ``OUT``:

* ``frames``: :func:`star_core.pipeline.run` on a 9-frame clip (3 sampler chunks × 6 diffusion tiles, blended
  decode windows and VAE tiles) into a TensorSink;
* ``grid``: the sampled latent of :func:`sample_star` over chunks × rows × columns (a 3-axis grid);
* ``single``: the sampled latent with one window (the CFG passes are what the ranks share then);
* ``batched``, ``unguided``: the 3-axis grid with both CFG passes in one call, and without CFG;
* ``replanned``: whole frames at first, but the negative pass runs out of memory on windows above 48 latent
  cells (on two ranks only rank 1, which owns it), so the evaluation is repeated with diffusion tiles on every
  rank (:class:`Replan`); ``asked``: what ``Replan.smaller`` was asked on rank 0;
* ``traffic``/``sent``: bytes received/sent by rank 0 per stage, and ``steps``.

``--hang SECONDS``: two exchanges with a 4 s timeout, rank 1 alive but sleeping SECONDS between them; every rank
prints its error and exits with status 1.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from star_core.checkpoint import load_star_model
from star_core.diffusion.star_sampling import (Replan, SamplerSettings, network_levels, plan_evaluations,
                                               sample_star)
from star_core.distributed import Distributed, DistributedError
from star_core.frames import TensorSink, TensorSource
from star_core.host import HostContext
from star_core.pipeline import Components, model_function, run
from star_core.spec import DEFAULTS
from star_core.vae import load_svd_vae
from star_core.windows import Grid, plan_windows

FIXTURES = Path(os.environ.get("STAR_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "star_tiny"))
OPTIONS = {"output.scale": 2.0, "output.padding": "minimal", "sampler.mode": "normal", "sampler.steps": 2,
           "sampler.chunk_len": 4, "sampler.overlap": 1, "sampler.fusion": "hann", "decode.window": 2,
           "decode.window_overlap": 1, "decode.tile": 32, "decode.tile_overlap": 16, "encode.tile": 32,
           "encode.tile_overlap": 16, "sampler.tile": (48, 32), "seed": 11}


def components() -> Components:
    model = load_star_model(FIXTURES / "tiny_state_dict.safetensors", dtype=torch.float32)
    vae = load_svd_vae(FIXTURES / "vae_tiny.safetensors", config=FIXTURES / "vae_tiny_config.json")
    g = torch.Generator().manual_seed(0)
    width = model.config.context_dim
    return Components(model, vae, torch.randn(1, 77, width, generator=g), torch.randn(1, 77, width, generator=g))


def sample_grid(parts: Components, work: Distributed, grid: Grid | None, shape: tuple[int, ...],
                **options) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    latent, start = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    settings = SamplerSettings(mode="normal", steps=2, chunk_len=shape[2], **options)
    return sample_star(model_function(parts.model), latent, parts.positive, parts.negative, settings,
                       start_noise=start, brownian=123, grid=grid, work=work)


def sample_replanned(parts: Components, work: Distributed) -> tuple[torch.Tensor, list]:
    g = torch.Generator().manual_seed(6)
    shape = (1, 4, 3, 10, 8)
    latent, start = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    settings = SamplerSettings(mode="normal", steps=2)
    model_fn = model_function(parts.model)

    def model(x, t, context, hint):
        if x.shape[3] * x.shape[4] > 48 and torch.equal(context, parts.negative):
            raise torch.OutOfMemoryError("injected: window too large")
        return model_fn(x, t, context, hint)

    asked = []

    def smaller(grid, error):
        asked.append((grid.shape, str(error)))
        return plan_evaluations(shape, SamplerSettings(mode="normal", steps=2, tile=(48, 32)),
                                network_levels(model_fn))

    replan = Replan(lambda error: isinstance(error, torch.OutOfMemoryError), smaller)
    out = sample_star(model, latent, parts.positive, parts.negative, settings, start_noise=start, brownian=7,
                      replan=replan, work=work)
    return out, asked


def main(out: Path) -> None:
    torch.set_num_threads(1)
    work = Distributed.from_env("cpu", timeout=120)
    with work.guard():
        parts = components()
        frames = torch.rand(9, 10, 14, 3, generator=torch.Generator().manual_seed(1))
        sink = TensorSink()
        run(TensorSource(frames), sink, DEFAULTS.with_options(OPTIONS), parts, HostContext(distributed=work))
        shape = (1, 4, 5, 10, 8)
        grid = Grid((plan_windows(5, 3, 1, "hann"), plan_windows(10, 6, 2, "linear"), plan_windows(8, 4, 2, "linear")),
                    (2, 3, 4))
        tiled = sample_grid(parts, work, grid, shape)
        single = sample_grid(parts, work, None, shape)
        batched = sample_grid(parts, work, grid, shape, batch_cfg=True)
        unguided = sample_grid(parts, work, grid, shape, cfg=1.0)
        traffic, sent = dict(work.traffic), dict(work.sent)
        replanned, asked = sample_replanned(parts, work)
        if work.is_main:
            torch.save({"frames": sink.frames, "grid": tiled, "single": single, "batched": batched,
                        "unguided": unguided, "replanned": replanned, "asked": asked, "traffic": traffic,
                        "sent": sent, "world": work.world_size}, out)


def hang(seconds: float) -> None:
    work = Distributed.from_env("cpu", timeout=4)
    try:
        with work.guard():
            for number in (1, 2):
                if work.rank == 1 and number == 2:
                    time.sleep(seconds)
                work.exchange({work.rank: torch.ones(2)}, [(2,), (2,)], stage="test", what=f"test exchange {number}")
    except DistributedError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        os._exit(1)


if __name__ == "__main__":
    if sys.argv[1] == "--hang":
        hang(float(sys.argv[2]))
    else:
        main(Path(sys.argv[1]))
