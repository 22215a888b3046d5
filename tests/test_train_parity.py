"""The training step against the official one (``train_*`` fixtures): losses, intermediates, gradients, trainable set.

Settings (t values, seeds, variants, gradient names) come from ``train_*_info.json``; the comparisons themselves
live in the verify group ``star_core.verify.train`` (also run by ``python -m star_core.verify``).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from star_core.train import StepSettings, df_loss, magnitude_cutoff, percentile, prepare_for_training, step_loss
from star_core.train import loss as loss_module
from star_core.vae import load_svd_vae
from star_core.verify import train as verify_train
from star_core.verify.forward import load_fixture_model
from star_core.verify.report import Report

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def info(fixtures_dir) -> dict:
    return json.loads((fixtures_dir / "train_tiny_info.json").read_text())


@pytest.fixture(scope="module")
def data(fixtures_dir) -> dict[str, torch.Tensor]:
    return load_file(str(fixtures_dir / "train_tiny.safetensors"))


@pytest.fixture(scope="module")
def vae(fixtures_dir, info):
    config = fixtures_dir / info["settings"]["vae_config"].split("/")[-1]
    return load_svd_vae(config.with_name(config.name.replace("_config.json", ".safetensors")), config=config)


@pytest.fixture()
def model(fixtures_dir):
    model = load_fixture_model(fixtures_dir)
    prepare_for_training(model, dropout="off")
    return model.eval()


def _prefix(t: int) -> str:
    return f"t{t:03d}."


def test_verify_group_parity(fixtures_dir, capsys):
    report = Report()
    assert verify_train.run(fixtures_dir, report) is True
    lines = capsys.readouterr().out.splitlines()
    with capsys.disabled():
        print("\n" + "\n".join(line for line in lines if "grad" in line or "FAIL" in line))
    assert report.failures == []
    with safe_open(fixtures_dir / "train_tiny.safetensors", "pt") as f:
        stored = set(f.keys())
    checked = {line.split()[1].split("/", 1)[1] for line in lines if line.startswith(("PASS", "FAIL"))}
    inputs = {"z_hq", "z_lq", "y", "gt_video"} | {k for k in stored if k.endswith(("timesteps", ".eps", "df_idx_pred",
                                                                                   "df_idx_gt", ".x", ".idx"))}
    assert stored - inputs <= checked  # every recorded output is compared
    assert verify_train.run(fixtures_dir / "nonexistent", Report()) is False


def test_only_the_trainable_set_gets_gradients(model, vae, data, info):
    step = info["steps"][0]
    p = _prefix(step["t"])
    result = step_loss(model, vae, data["z_hq"], data["z_lq"], data["y"], data["gt_video"].transpose(1, 2),
                       StepSettings(), t=data[p + "timesteps"], noise=data[p + "eps"],
                       df_indices=[(data[p + "df_idx_pred"], data[p + "df_idx_gt"])])
    result.loss.backward()
    names = set(info["trainable"]["names"])
    with_grad = {n for n, q in model.named_parameters() if q.grad is not None}
    assert with_grad == names and len(names) == info["trainable"]["n_tensors"]
    assert sum(q.numel() for n, q in model.named_parameters() if n in names) == info["trainable"]["n_numel"]
    assert all(q.dtype == torch.float32 for n, q in model.named_parameters() if n in names)


def test_released_variant_trains_on_loss_v_alone(model, vae, data, info):
    """df_gradient=False: the DF term is logged but its gradient is exactly that of loss_v (fact 1 of the README)."""
    step = info["steps"][0]
    p = _prefix(step["t"])
    args = (model, vae, data["z_hq"], data["z_lq"], data["y"], data["gt_video"].transpose(1, 2))
    kw = dict(t=data[p + "timesteps"], noise=data[p + "eps"], df_indices=[(data[p + "df_idx_pred"], data[p + "df_idx_gt"])])
    released = step_loss(*args, StepSettings(df_gradient=False), **kw)
    released.loss.backward()
    grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    model.zero_grad(set_to_none=True)
    plain = step_loss(*args, StepSettings(df_weight=0.0), **kw)
    assert plain.df == [] and plain.loss.item() == pytest.approx(step["values"]["loss_v"], abs=1e-6)
    plain.loss.backward()
    for name, grad in grads.items():
        assert torch.equal(grad, dict(model.named_parameters())[name].grad), name
    assert released.loss.item() == pytest.approx(step["values"]["loss"][0], abs=1e-6)


def test_injectable_generator_reproduces_the_recorded_draw(data, info):
    """The official draw comes from the global CPU generator after manual_seed(df_seed): a fresh generator with
    that seed gives the same indices (prediction first), and the cutoffs follow."""
    for step in info["steps"]:
        p = _prefix(step["t"])
        pred, gt = data[p + "pred_video"][0].transpose(0, 1), data["gt_video"][0].transpose(0, 1)
        terms = df_loss(pred, gt, data[p + "timesteps"], generator=torch.Generator().manual_seed(step["df_seed"]))
        assert torch.equal(terms.indices_pred, data[p + "df_idx_pred"])
        assert torch.equal(terms.indices_gt, data[p + "df_idx_gt"])
        assert terms.cutoff_pred.item() == pytest.approx(step["cutoff_pred"], rel=1e-6)
        assert terms.loss.item() == pytest.approx(step["values"]["weight_t"][0] * step["values"]["loss_t"][0], rel=1e-5)


def test_exact_percentile_option(data, info):
    step = info["steps"][0]
    p = _prefix(step["t"])
    pred, gt = data[p + "pred_video"][0].transpose(0, 1), data["gt_video"][0].transpose(0, 1)
    exact = df_loss(pred, gt, data[p + "timesteps"], exact=True)
    magnitude = torch.fft.rfft2(pred).abs()
    assert exact.indices_pred is None and exact.cutoff_pred.item() == pytest.approx(
        torch.quantile(magnitude.flatten(), 0.8).item(), rel=1e-7)
    # the estimate is off the exact percentile by ~1 % here (README fact 4)
    assert abs(exact.cutoff_pred.item() / step["cutoff_pred"] - 1) < 0.03
    with pytest.raises(ValueError, match="indices were given"):
        magnitude_cutoff(magnitude, exact=True, indices=data[p + "df_idx_pred"])


def test_percentile_beyond_torch_quantile_limit(monkeypatch):
    values = torch.randn(1001, generator=torch.Generator().manual_seed(0), requires_grad=True)
    reference = torch.quantile(values, 0.8)
    monkeypatch.setattr(loss_module, "_TORCH_QUANTILE_LIMIT", 100)  # force the kthvalue path
    estimate = percentile(values, 0.8)
    assert estimate.item() == pytest.approx(reference.item(), abs=1e-7)
    estimate.backward()
    assert values.grad.abs().sum().item() == pytest.approx(1.0)  # a lerp of two order statistics


def test_batch_of_two_is_the_mean_of_its_clips(model, vae, data, info):
    """B > 1 (not possible officially): per-clip t, noise, cutoffs; the total is the mean of the clip totals."""
    steps = info["steps"]
    prefixes = [_prefix(s["t"]) for s in steps[:2]]
    gt = data["gt_video"].transpose(1, 2)
    singles = []
    with torch.no_grad():
        for p in prefixes:
            singles.append(step_loss(model, vae, data["z_hq"], data["z_lq"], data["y"], gt, t=data[p + "timesteps"],
                                     noise=data[p + "eps"], df_indices=[(data[p + "df_idx_pred"], data[p + "df_idx_gt"])]))
        both = step_loss(model, vae, data["z_hq"].repeat(2, 1, 1, 1, 1), data["z_lq"].repeat(2, 1, 1, 1, 1),
                         data["y"].repeat(2, 1, 1), gt.repeat(2, 1, 1, 1, 1),
                         t=torch.cat([data[p + "timesteps"] for p in prefixes]),
                         noise=torch.cat([data[p + "eps"] for p in prefixes]),
                         df_indices=[(data[p + "df_idx_pred"], data[p + "df_idx_gt"]) for p in prefixes])
    assert both.loss.item() == pytest.approx((singles[0].loss.item() + singles[1].loss.item()) / 2, rel=1e-5)
    for single, terms in zip(singles, both.df):
        assert terms.cutoff_pred.item() == pytest.approx(single.df[0].cutoff_pred.item(), rel=1e-5)
