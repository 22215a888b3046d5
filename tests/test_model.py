"""STARUNet: parity with the official tiny forward, units, the full-size layout on meta, and forward contracts."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from star_core.checkpoint import load_star_model
from star_core.model import (STARConfig, STARUNet, SpatialLIEM, TemporalLIEM, check_latent_size,
                             config_from_state_dict, get_attention_function, sdpa_attention,
                             sinusoidal_embedding, use_attention)
import importlib
from star_core.verify.forward import load_fixture_model
from star_core.verify.manifest import check_manifest
from star_core.verify.report import Report

TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def forward_data(fixtures_dir):
    return load_file(str(fixtures_dir / "tiny_forward.safetensors"))


@pytest.fixture(scope="module")
def tiny_model(fixtures_dir):
    return load_fixture_model(fixtures_dir)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def test_forward_parity(tiny_model, forward_data):
    d = forward_data
    with torch.inference_mode():
        out = tiny_model(d["x_t"], d["t"], d["y"], d["hint"])
        out_none = tiny_model(d["x_t"], d["t"], d["y"], None)
        controls = tiny_model.VideoControlNet(d["x_t"], d["t"], d["y"], d["hint"])
    assert out.shape == d["out"].shape
    assert _max_err(out, d["out"]) <= TOL
    assert _max_err(out_none, d["out_hint_none"]) <= TOL
    keys = sorted(k for k in d if k.startswith("control_"))
    assert len(controls) == len(keys)
    for key, actual in zip(keys, controls):
        assert _max_err(actual, d[key]) <= TOL, key
    # The hint matters: without it the output is measurably different.
    assert _max_err(out, out_none) > 100 * TOL


def test_batch_rows_use_their_own_context(tiny_model, forward_data):
    d = forward_data
    x2 = d["x_t"].repeat(2, 1, 1, 1, 1)
    with torch.inference_mode():
        pair = tiny_model(x2, d["t"].repeat(2), torch.cat([d["y"], d["y_neg"]]), d["hint"].repeat(2, 1, 1, 1, 1))
        neg = tiny_model(d["x_t"], d["t"], d["y_neg"], d["hint"])
    assert _max_err(pair[0], d["out"][0]) <= TOL
    assert _max_err(pair[1], neg[0]) <= TOL
    assert _max_err(pair[0], pair[1]) > 100 * TOL


def test_transformer_slices_match_whole(tiny_model, forward_data, monkeypatch):
    d = forward_data
    args = (d["x_t"].repeat(2, 1, 1, 1, 1), d["t"].repeat(2), torch.cat([d["y"], d["y_neg"]]),
            d["hint"].repeat(2, 1, 1, 1, 1))
    with torch.inference_mode():
        whole = tiny_model(*args)
        # One frame / one position per slice: slices cross the boundary between the two samples' frames.
        monkeypatch.setattr(importlib.import_module("star_core.model.slicing"), "SLICE_ELEMENTS", 1)
        sliced = tiny_model(*args)
    assert _max_err(sliced, whole) <= 1e-5
    assert _max_err(sliced[0], d["out"][0]) <= TOL


@pytest.mark.parametrize("frames", [1, 2])
def test_any_frame_count(tiny_model, forward_data, frames):
    d = forward_data
    x = d["x_t"][:, :, :frames]
    with torch.inference_mode():
        out = tiny_model(x, d["t"], d["y"], d["hint"][:, :, :frames])
    assert out.shape == (1, 4, frames, 10, 12)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 0.05), (torch.bfloat16, 0.25)])
def test_low_precision_weights(fixtures_dir, forward_data, dtype, tol):
    d = forward_data
    model = load_star_model(fixtures_dir / "tiny_state_dict.safetensors", dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    with torch.inference_mode():
        out = model(d["x_t"].to(dtype), d["t"], d["y"].to(dtype), d["hint"].to(dtype))
    assert out.dtype == dtype
    assert _max_err(out.float(), d["out"]) <= tol


def test_bf16_storage_fp32_compute(fixtures_dir, forward_data):
    d = forward_data
    model = load_star_model(fixtures_dir / "tiny_state_dict.safetensors", dtype=torch.bfloat16,
                            compute_dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.inference_mode():
        out = model(d["x_t"], d["t"], d["y"], d["hint"])
    assert out.dtype == torch.float32
    # Only the weights are rounded, so the error is well below the all-bf16 run's.
    assert 1e-4 < _max_err(out, d["out"]) <= 0.1


def test_attention_is_replaceable_and_sliced(tiny_model, forward_data, monkeypatch):
    d = forward_data
    calls = []

    def counting(q, k, v, heads):
        calls.append(q.shape[0])
        return sdpa_attention(q, k, v, heads)

    with torch.inference_mode():
        with use_attention(counting):
            assert get_attention_function() is counting
            # A tiny score budget forces every call to be split into many slices; the result must not change.
            monkeypatch.setattr(importlib.import_module("star_core.model.attention"), "MAX_SCORES_PER_CALL", 64)
            out = tiny_model(d["x_t"], d["t"], d["y"], d["hint"])
    assert get_attention_function() is sdpa_attention
    assert calls and max(calls) < 5 * 10 * 12  # the temporal batch (h*w positions) was sliced
    assert _max_err(out, d["out"]) <= TOL


def test_bad_inputs_are_named(tiny_model, forward_data):
    d = forward_data
    with pytest.raises(ValueError, match=r"x must be a latent \[B,4,F,H,W\]"):
        tiny_model(d["x_t"][0], d["t"], d["y"], None)
    with pytest.raises(ValueError, match="context must be"):
        tiny_model(d["x_t"], d["t"], d["y"][0], None)
    with pytest.raises(ValueError, match="text context is 64 wide, from a 64-wide text encoder, but this STAR model "
                                         "reads 1024-wide text context"):
        tiny_model(d["x_t"], d["t"], d["y"][:, :, :64], None)
    with pytest.raises(ValueError, match="hint must have the latent's shape"):
        tiny_model(d["x_t"], d["t"], d["y"], d["hint"][:, :, :2])
    with pytest.raises(ValueError, match=r"latent size 11x12 does not fit"):
        tiny_model(torch.zeros(1, 4, 2, 11, 12), d["t"], d["y"], None)


def test_run_conv_small_maps_match_and_restore_onednn():
    from star_core.model.resblock import run_conv

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    x = torch.randn(2, 64, 3, 5)  # 15 pixels < 64 output channels: the plain (non-oneDNN) path
    with torch.inference_mode():
        assert _max_err(run_conv(conv, x), torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)) <= 1e-5
    assert torch.backends.mkldnn.enabled


def test_check_latent_size():
    check_latent_size(90, 160, 4)  # 720x1280 video, the official processing size
    check_latent_size(18, 24, 4)
    with pytest.raises(ValueError, match=r"valid heights near 92: \[90, 98\]; valid widths near 160: \[144, 152, 160"):
        check_latent_size(92, 160, 4)
    with pytest.raises(ValueError, match=r"valid widths near 14: \[4, 8, 12, 16, 20, 24, 28\]"):
        check_latent_size(10, 14, 3)


def test_liem_units(fixtures_dir):
    u = load_file(str(fixtures_dir / "units.safetensors"))
    spatial, temporal = SpatialLIEM(), TemporalLIEM()
    spatial.load_state_dict({"conv1.weight": u["liem_spatial.conv1.weight"]})
    temporal.load_state_dict({"conv1.weight": u["liem_temporal.conv1.weight"]})
    with torch.inference_mode():
        assert _max_err(spatial(u["liem_spatial.in"]), u["liem_spatial.out"]) <= 1e-6
        assert _max_err(temporal(u["liem_temporal.in"]), u["liem_temporal.out"]) <= 1e-6


def test_sinusoidal_unit(fixtures_dir):
    u = load_file(str(fixtures_dir / "units.safetensors"))
    emb = sinusoidal_embedding(u["sinusoidal_t"], 320)
    assert emb.shape == (6, 320)
    assert _max_err(emb, u["sinusoidal_320"]) <= 1e-6


def test_config_inference_tiny(fixtures_dir):
    sd = load_file(str(fixtures_dir / "tiny_state_dict.safetensors"))
    args = json.loads((fixtures_dir / "tiny_config.json").read_text())["constructor_args"]
    config = config_from_state_dict(sd)
    stated = STARConfig(**{f.name: args[f.name] for f in dataclasses.fields(STARConfig) if f.name in args})
    assert config == stated


@pytest.mark.parametrize("config", [
    STARConfig(dim=64, dim_mult=(1, 4), num_heads=2, head_dim=32, num_res_blocks=2, attn_scales=(0.5,)),
    STARConfig(dim=32, dim_mult=(1, 1, 2, 4), num_heads=2, head_dim=16, num_res_blocks=1, attn_scales=(1.0, 0.25)),
    STARConfig(in_dim=8, out_dim=4, context_dim=256, dim=128, dim_mult=(1, 2, 4), num_heads=4, head_dim=64,
               num_res_blocks=3, attn_scales=(1.0, 0.5, 0.25)),
])
def test_config_inference_other_configs(config):
    torch.manual_seed(0)
    model = STARUNet(config).eval()
    assert config_from_state_dict(model.state_dict()) == config
    x = torch.randn(2, config.in_dim, 3, 10, 8)
    with torch.inference_mode():
        out = model(x, torch.tensor([10, 500]), torch.randn(2, 7, config.context_dim), x)
    assert out.shape == (2, config.out_dim, 3, 10, 8) and torch.isfinite(out).all()


def test_config_inference_full_and_manifest(fixtures_dir):
    with torch.device("meta"):
        model = STARUNet()
    sd = model.state_dict()
    assert config_from_state_dict(sd) == STARConfig()
    assert len(sd) == 2247
    assert sum(p.numel() for p in model.parameters()) == 2_041_121_910
    assert not list(model.buffers())
    report = Report()
    check_manifest(fixtures_dir / "star_keys_i2vgenxl.json", report)
    assert report.failures == [] and report.count >= 5


def test_config_rejects_bad_widths():
    with pytest.raises(ValueError, match="not a multiple of 32"):
        STARConfig(dim=48)
    with pytest.raises(ValueError, match=r"dim_mult must end in 4, got \(1, 2\) \(the official ControlNet"):
        STARConfig(dim=32, dim_mult=(1, 2))
    with pytest.raises(ValueError, match="head_dim 24 does not divide the attention width 32"):
        STARConfig(dim=32, dim_mult=(1, 4), num_heads=1, head_dim=24, attn_scales=(1.0,))
    # the first temporal transformer's inner width (num_heads * head_dim) is not group-normalised: 3 x 8 = 24 is fine
    assert STARConfig(dim=32, dim_mult=(1, 2, 4), num_heads=3, head_dim=8).num_heads == 3
