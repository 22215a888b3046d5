"""Data-parallel training: two CPU processes (Gloo) launched by torchrun keep identical weights and save once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from star_core.tiny_models import FILES, write_tree

WORKER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from star_core.checkpoint import load_star_model
    from star_core.train.data import ClipDataset, DataSettings, find_pairs
    from star_core.train.trainer import Trainer, TrainSettings
    from star_core.vae import load_svd_vae

    torch.set_num_threads(1)
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    data = ClipDataset(find_pairs(root / "HQ"), DataSettings(frames=2, crop=(48, 64), null_text_ratio=0.0))
    contexts = {c: torch.ones(77, 1024) * i for i, c in enumerate(data.captions())}
    base = root / "models" / "STAR" / "star_tiny.safetensors"
    trainer = Trainer(load_star_model(base), load_svd_vae(root / "models" / "vae" / "svd_vae_tiny.safetensors"),
                      data, contexts, TrainSettings(steps=2, lr=1e-3, save_every=2, seed=3), out, base)
    history = trainer.train(progress=False)
    rank = dist.get_rank()
    save_file({n: p.detach().contiguous() for n, p in trainer.params}, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"world": trainer.world, "loss": history[-1]["loss"]}))
""")


@pytest.mark.timeout(600)
def test_two_gloo_ranks_stay_in_sync(tmp_path):
    write_tree(tmp_path / "models", ["star", "vae_tiny"])
    (tmp_path / "HQ").mkdir()
    from star_core.video_io import write_synthetic_clip

    for name in ("a", "b"):
        write_synthetic_clip(tmp_path / "HQ" / f"{name}.mp4", frames=3, width=64, height=48, audio=False)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script), str(tmp_path), str(out)]
    repo = Path(__file__).parents[1]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=repo,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)},
                            start_new_session=True)  # its own process group: a hang is killed with its workers
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["loss"] != ranks[1]["loss"]  # each rank trained on its own samples ...
    a, b = (load_file(str(out / f"rank{r}.safetensors")) for r in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)  # ... and the averaged gradients kept the weights identical
    base = load_file(str(tmp_path / "models" / FILES["star"]))
    assert any(not torch.equal(a[k], base[k]) for k in a)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002"]
