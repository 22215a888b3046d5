"""The fine-tuning loop on a tiny model: the loss goes down, resume is exact, NaN stops cleanly, the result loads;
dropout and activation checkpointing; clipping modes; the ``train`` command."""
from __future__ import annotations

import json
import re
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from star_core.checkpoint import load_star_model, read_delta_metadata
from star_core.tiny_models import FILES, write_tree
from star_core.train import StepSettings, prepare_for_training, set_checkpointing, step_loss
from star_core.train.data import ClipDataset, DataSettings, find_pairs
from star_core.train.network import set_dropout
from star_core.train.trainer import Trainer, TrainingDiverged, TrainSettings, Validation
from star_core.vae import load_svd_vae

pytestmark = pytest.mark.usefixtures("one_thread")
CROP, FRAMES = (48, 64), 2  # latent 6x8: the smallest the tiny 3-level UNet takes


def _write_frames(folder: Path, frames: np.ndarray) -> None:
    folder.mkdir(parents=True)
    for i, image in enumerate(frames):
        with av.open(str(folder / f"{i:04d}.png"), "w") as out:
            stream = out.add_stream("png", rate=1)
            stream.width, stream.height, stream.pix_fmt = image.shape[1], image.shape[0], "rgb24"
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            out.mux(stream.encode(None))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Tiny models and one synthetic pair: a smooth HQ clip and its x4 smaller LQ."""
    root = tmp_path_factory.mktemp("train")
    write_tree(root / "models", ["star", "vae_tiny"])
    base = torch.rand(4, 3, 6, 8, generator=torch.Generator().manual_seed(0))
    hq = torch.nn.functional.interpolate(base, size=CROP, mode="bicubic").clamp(0, 1)
    lq = torch.nn.functional.interpolate(hq, size=(12, 16), mode="area")
    as_u8 = lambda x: (x * 255).round().byte().permute(0, 2, 3, 1).numpy()  # noqa: E731
    _write_frames(root / "HQ" / "clip", as_u8(hq))
    _write_frames(root / "LQ" / "clip", as_u8(lq))
    return root


@pytest.fixture(scope="module")
def vae(root):
    return load_svd_vae(root / "models" / "vae" / "svd_vae_tiny.safetensors")


@pytest.fixture(scope="module")
def dataset(root):
    return ClipDataset(find_pairs(root / "HQ", root / "LQ"), DataSettings(frames=FRAMES, crop=CROP))


@pytest.fixture(scope="module")
def contexts(dataset):
    g = torch.Generator().manual_seed(1)
    return {c: torch.randn(77, 1024, generator=g) for c in dataset.captions()}


def _trainer(root, vae, dataset, contexts, out, **kw) -> Trainer:
    base = root / "models" / FILES["star"]
    settings = TrainSettings(**{"lr": 1e-3, "save_every": 0, "seed": 5, **kw})
    validation = Validation([dataset[(0, 99)]], t_values=(300, 700), videos=False)
    return Trainer(load_star_model(base), vae, dataset, contexts, settings, out, base, validation=validation)


def test_twenty_steps_lower_the_loss_and_the_result_loads(root, vae, dataset, contexts, tmp_path):
    trainer = _trainer(root, vae, dataset, contexts, tmp_path / "out", steps=20)
    before = trainer.validate()["val_loss"]
    history = trainer.train(progress=False)
    after = trainer.validate()["val_loss"]
    assert [r["step"] for r in history] == list(range(1, 21))
    assert after < 0.8 * before, (before, after)
    first, last = (np.mean([r["loss"] for r in part]) for part in (history[:5], history[-5:]))
    assert last < first
    lines = (tmp_path / "out" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 20 and {"loss", "loss_v", "loss_df", "grad_norm", "lr"} <= set(json.loads(lines[-1]))
    assert (tmp_path / "out" / "checkpoints" / "step_000020" / "finetune.safetensors").is_file()  # the last step
    # the fine-tune: a delta of the base with only the trainable tensors, loading through the normal loader
    delta = trainer.write_final("tuned")
    meta = read_delta_metadata(delta)
    assert meta["star_base_name"] == FILES["star"].split("/")[-1] and meta["star_step"] == "20"
    tuned, plain = load_star_model(delta), load_star_model(root / "models" / FILES["star"])
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, plain.state_dict()[k])]
    assert changed and set(changed) <= {n for n, _ in trainer.params}
    g = torch.Generator().manual_seed(2)
    x, hint, ctx = torch.randn(1, 4, 2, 6, 8, generator=g), torch.randn(1, 4, 2, 6, 8, generator=g), \
        torch.randn(1, 77, 1024, generator=g)
    with torch.inference_mode():
        assert not torch.allclose(tuned(x, torch.tensor([400]), ctx, hint), plain(x, torch.tensor([400]), ctx, hint),
                                  atol=1e-4)


def test_resume_continues_at_the_same_step_with_the_same_state(root, vae, dataset, contexts, tmp_path):
    straight = _trainer(root, vae, dataset, contexts, tmp_path / "a", steps=3, grad_accum=2)
    straight.train(progress=False)
    first = _trainer(root, vae, dataset, contexts, tmp_path / "b", steps=1, grad_accum=2)
    first.train(progress=False)
    resumed = _trainer(root, vae, dataset, contexts, tmp_path / "b", steps=3, grad_accum=2)
    assert resumed.resume(tmp_path / "b") == 1
    assert resumed.optimizer.state_dict()["state"][0]["step"].item() == 1
    resumed.train(progress=False)
    assert [r["step"] for r in resumed.history] == [2, 3]
    for (name, p), (_, q) in zip(straight.params, resumed.params):
        assert torch.equal(p, q), name
    a, b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)
    logged = [json.loads(line)["loss"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert logged == [r["loss"] for r in straight.history]
    with pytest.raises(FileNotFoundError, match="no training checkpoint to resume"):
        resumed.resume(tmp_path / "nothing")
    other = _trainer(root, vae, dataset, contexts, tmp_path / "c", steps=3, trainable="controlnet")
    with pytest.raises(ValueError, match="another trainable set .* resume with the same --trainable"):
        other.resume(tmp_path / "b")


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(root, vae, dataset, contexts, tmp_path):
    trainer = _trainer(root, vae, dataset, {}, tmp_path / "out", steps=5, save_every=1)
    poison = torch.full((77, 1024), float("nan"))
    trainer.contexts = lambda caption: poison if trainer.step >= 2 else contexts[caption]
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 3 \(micro-batch 1\); training stopped "
                                               r"without applying it, the last good checkpoint is .*step_000002"):
        trainer.train(progress=False)
    saved = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert saved == ["step_000001", "step_000002"]
    assert all(torch.isfinite(p).all() for _, p in trainer.params)


def test_dropout_modes_and_checkpointing(root, vae, dataset, contexts):
    model = load_star_model(root / "models" / FILES["star"])
    params = prepare_for_training(model, dropout="trainable")
    controlnet_resblocks = sum(1 for n, m in model.named_modules()
                               if n.startswith("VideoControlNet.") and type(m).__name__ == "ResBlock")
    assert set_dropout(model, "trainable") == controlnet_resblocks * 4  # out_layers + 3 temporal stages each
    assert set_dropout(model, "official") > set_dropout(model, "trainable") > set_dropout(model, "off") == 0
    item = dataset[(0, 3)]
    g = torch.Generator().manual_seed(0)
    z = vae.encode(item["hq"], generator=g)[None].squeeze(0)
    z_lq = vae.encode(item["lq"], generator=g)
    ctx = contexts[item["caption"]][None]
    kw = dict(t=torch.tensor([500]), noise=torch.randn(z.shape, generator=g), df_indices=None)

    def grads(dropout: str, checkpointing: bool, train: bool = True):
        set_dropout(model, dropout)
        set_checkpointing(model, checkpointing)
        model.train(train)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        result = step_loss(model, vae, z, z_lq, ctx, item["hq"][None], StepSettings(checkpoint_decode=checkpointing),
                           generator=torch.Generator().manual_seed(1), **kw)
        result.loss.backward()
        return result.loss.item(), [p.grad.clone() for _, p in params]

    plain = grads("off", False)
    ckpt = grads("off", True)
    assert ckpt[0] == plain[0] and all(torch.allclose(a, b, rtol=1e-5, atol=1e-9) for a, b in zip(ckpt[1], plain[1]))
    dropped = grads("trainable", False)
    assert dropped[0] != plain[0]
    dropped_ckpt = grads("trainable", True)  # the recomputation replays the same dropout masks
    assert dropped_ckpt[0] == dropped[0]
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-9) for a, b in zip(dropped_ckpt[1], dropped[1]))
    assert grads("trainable", False, train=False)[0] == plain[0]  # eval mode: no dropout


def test_clip_modes(root, vae, dataset, contexts, tmp_path):
    for mode, unet_liem_clipped in (("all", True), ("official", False)):
        trainer = _trainer(root, vae, dataset, contexts, tmp_path / mode, steps=1, clip=mode, max_grad_norm=1e-3)
        for _, p in trainer.params:
            p.grad = torch.ones_like(p)
        trainer._clip()
        liem = [p.grad for n, p in trainer.params if not n.startswith("VideoControlNet.")]
        controlnet = [p.grad for n, p in trainer.params if n.startswith("VideoControlNet.")]
        assert torch.nn.utils.get_total_norm(controlnet).item() <= 1e-3 * 1.0001
        assert (liem[0].max().item() < 1) == unet_liem_clipped


def test_train_command(root, tmp_path, capsys):
    from star_core.cli import main, write_demo_text_encoder
    from star_core.text import fetch_openclip_vocab

    text = write_demo_text_encoder(tmp_path / "clip_demo.safetensors")
    common = ["--vae", str(root / "models" / "vae" / "svd_vae_tiny.safetensors"), "--text-encoder", str(text),
              "--tokenizer", str(fetch_openclip_vocab()), "--offline", "--threads", "1", "--quiet",
              "--frames", str(FRAMES), "--crop", "x".join(map(str, CROP)), "--no-checkpointing"]
    model = str(root / "models" / FILES["star"])
    out = tmp_path / "out"
    argv = ["train", "--hq", str(root / "HQ"), "--lq", str(root / "LQ"), "--model", model, "-o", str(out),
            "--steps", "2", "--save-every", "1", "--keep", "1", "--validate-every", "2", "--merge", *common]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"wrote {out / 'finetune.safetensors'}" in err and "finetune_merged.safetensors" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002"]  # --keep 1
    assert (out / "validation" / "step_000002.mp4").is_file()
    assert read_delta_metadata(out / "finetune.safetensors") is not None
    assert read_delta_metadata(out / "finetune_merged.safetensors") is None
    merged = load_star_model(out / "finetune_merged.safetensors").state_dict()
    assert all(torch.equal(v, merged[k]) for k, v in load_star_model(out / "finetune.safetensors").state_dict().items())
    # resume to 3 steps
    assert main([*argv[:argv.index("--steps")], "--steps", "3", "--resume", *common]) == 0
    assert "resuming at step 2" in capsys.readouterr().err
    assert len((out / "log.jsonl").read_text().splitlines()) == 3
    # --merge-only
    assert main(["train", "--merge-only", str(out / "finetune.safetensors"), "-o", str(tmp_path / "m.safetensors")]) == 0
    # user mistakes: one line each, exit 1
    vae_file = str(root / "models" / "vae" / "svd_vae_tiny.safetensors")
    cases = [
        (["--hq", str(root / "HQ"), "--lq", str(root / "LQ"), "--model", vae_file], "not a STAR I2VGen-XL checkpoint"),
        (["--hq", str(root / "LQ"), "--lq", str(tmp_path), "--model", model], "no HQ/LQ pairs found"),
        (["--hq", str(root / "HQ"), "--lq", str(root / "LQ"), "--model", model, "--crop", "40x64"],
         r"--crop 40x64: latent size 5x8 does not fit"),
    ]
    for extra, message in cases:
        assert main(["train", "-o", str(tmp_path / "bad"), "--steps", "1", *common, *extra]) == 1
        err = capsys.readouterr().err
        assert re.search(f"^error: .*{message}", err, re.M), err


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_precisions_keep_frozen_storage_and_fp32_masters(root, vae, dataset, contexts, tmp_path,
                                                                   precision, dtype):
    base = root / "models" / FILES["star"]
    model = load_star_model(base, dtype=dtype, compute_dtype=dtype)
    trainer = Trainer(model, vae, dataset, contexts, TrainSettings(steps=1, precision=precision, save_every=0,
                                                                  checkpointing=True), tmp_path, base)
    before = {n: p.detach().clone() for n, p in trainer.params}
    (record,) = trainer.train(progress=False)
    assert np.isfinite(record["loss"]) and trainer.scaler.is_enabled() == (precision == "fp16")
    assert {p.dtype for _, p in trainer.params} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {dtype}
    assert any(not torch.equal(before[n], p) for n, p in trainer.params)
