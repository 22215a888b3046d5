"""Every architecture the official constructor builds (issue #11, row 4): same keys and shapes as the official
code, config inferred from the state dict, strict load, forward equal to the official one; and `verify` turns a
group that raises into FAIL lines and goes on.

Data: tests/fixtures/official_architectures (README there: made by the official code)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from star_core.checkpoint import load_star_model
from star_core.model import STARConfig, STARUNet, config_from_state_dict
from star_core.tiny_models import random_weights
from star_core.verify.__main__ import main as verify_main

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).parent / "fixtures" / "official_architectures"
ARCHS = json.loads((DATA / "architectures.json").read_text())
WITH_FORWARD = sorted(name for name, entry in ARCHS.items() if "forward_latent" in entry)
WEIGHT_SEED, INPUT_SEED = 1234, 5


def config_of(name: str) -> STARConfig:
    args = ARCHS[name]["constructor_args"]
    return STARConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})


def meta_model(config: STARConfig) -> STARUNet:
    with torch.device("meta"):
        return STARUNet(config)


def recipe_weights(config: STARConfig) -> dict[str, torch.Tensor]:
    """The fixture weight recipe over the official parameter order (ours is the same, see the layout test)."""
    model = meta_model(config)
    norms = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))}
    return random_weights({k: tuple(v.shape) for k, v in model.state_dict().items()}, WEIGHT_SEED, norm_keys=norms)


def official_inputs(name: str) -> tuple[torch.Tensor, ...]:
    shape = ARCHS[name]["forward_latent"]
    g = torch.Generator().manual_seed(INPUT_SEED)
    x, hint = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return x, torch.tensor([500]), torch.randn(1, 77, 1024, generator=g), hint


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_layout_matches_official_and_config_is_inferred(name):
    config = config_of(name)
    model = meta_model(config)
    sd = model.state_dict()
    canonical = "\n".join(f"{k}:{list(v.shape)}" for k, v in sd.items())
    assert (len(sd), sum(p.numel() for p in model.parameters())) == (ARCHS[name]["num_keys"], ARCHS[name]["num_params"])
    assert hashlib.sha256(canonical.encode()).hexdigest() == ARCHS[name]["keys_shapes_sha256"]
    inferred = config_from_state_dict(sd)
    # everything but the head split is visible in the shapes
    assert dataclasses.replace(inferred, num_heads=config.num_heads, head_dim=config.head_dim) == config
    assert inferred.num_heads * inferred.head_dim == config.num_heads * config.head_dim


@pytest.mark.parametrize("name", WITH_FORWARD)
def test_strict_load_and_forward_match_official(name):
    config = config_of(name)
    weights = recipe_weights(config)
    x, t, y, hint = official_inputs(name)
    expected = load_file(str(DATA / "forward.safetensors"))[f"{name}.out"]
    inferred = load_star_model(weights)  # config from the shapes, strict load
    with torch.inference_mode():
        out_inferred = inferred(x, t, y, hint)
    assert out_inferred.shape == expected.shape and torch.isfinite(out_inferred).all()
    del inferred
    model = load_star_model(weights, config=config)  # the true head split
    with torch.inference_mode():
        out = model(x, t, y, hint)
    err = (out - expected).abs().max().item()
    print(f"{name}: max|Δ| vs official = {err:.2e}")
    assert err <= 1e-4
    if config_from_state_dict(weights) == config:
        assert torch.equal(out_inferred, out)
    else:  # a wrong head split still loads and runs, but it is another attention
        assert (out_inferred - out).abs().max() > 1e-3


def _write_forward_fixture(folder: Path, name: str, with_config: bool) -> None:
    config = config_of(name)
    folder.mkdir()
    save_file(recipe_weights(config), str(folder / "tiny_state_dict.safetensors"))
    x, t, y, hint = official_inputs(name)
    out = load_file(str(DATA / "forward.safetensors"))[f"{name}.out"]
    save_file({"x_t": x, "t": t, "y": y, "hint": hint, "out": out}, str(folder / "tiny_forward.safetensors"))
    if with_config:
        (folder / "tiny_config.json").write_text(json.dumps({"constructor_args": ARCHS[name]["constructor_args"]}))


def test_verify_reads_the_head_split_from_the_fixture_config(tmp_path, capsys):
    name = "single_level_1x64"  # shapes suggest 2 heads of 32; the official model has 1 head of 64
    _write_forward_fixture(tmp_path / "with_config", name, with_config=True)
    assert verify_main([str(tmp_path / "with_config"), "--only", "forward"]) == 0
    out = capsys.readouterr().out
    assert "PASS tiny_config/inferred_config" in out and "PASS tiny_forward/out" in out
    shutil.copytree(tmp_path / "with_config", tmp_path / "no_config")
    (tmp_path / "no_config" / "tiny_config.json").unlink()
    assert verify_main([str(tmp_path / "no_config"), "--only", "forward"]) == 1
    assert "FAIL tiny_forward/out" in capsys.readouterr().out


def test_verify_reports_a_group_that_raises_and_goes_on(tmp_path, fixtures_dir, capsys):
    for name in ("units.safetensors", "pipeline_helpers.json", "tiny_config.json", "tiny_forward.safetensors"):
        shutil.copy(fixtures_dir / name, tmp_path / name)
    # a state dict of another architecture than tiny_config.json states: the forward group cannot build the model
    config = config_of("no_attn_levels_2x32")
    save_file(recipe_weights(config), str(tmp_path / "tiny_state_dict.safetensors"))
    code = verify_main([str(tmp_path), "--only", "units,forward,helpers"])
    out = capsys.readouterr().out
    assert code == 1
    fail = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert any(line.startswith(f"FAIL {tmp_path.name}/forward  group stopped: ") and "(at " in line for line in fail), out
    assert "Traceback" not in out
    # the groups before and after it still ran and passed
    assert "PASS units/" in out and "PASS pipeline_helpers/" in out
    assert out.splitlines()[-1].startswith("verify: ") and "FAILED" in out.splitlines()[-1]
