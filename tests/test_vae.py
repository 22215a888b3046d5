"""SVD VAE adapter: fixture parity, both weight layouts, tiled/windowed encode and decode, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLTemporalDecoder
from safetensors.torch import load_file, save_file

from star_core.vae import SpatialTiling, SVDVideoVAE, diffusers_to_svd, load_svd_vae, svd_to_diffusers
from star_core.vae.tiled import decode_windows, encode_moments

TINY = {"block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D"] * 2, "layers_per_block": 1,
        "latent_channels": 4}


@pytest.fixture(scope="module")
def fixture_vae(fixtures_dir: Path) -> SVDVideoVAE:
    return load_svd_vae(fixtures_dir / "vae_tiny.safetensors", config=fixtures_dir / "vae_tiny_config.json")


@pytest.fixture(scope="module")
def fixture_io(fixtures_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(fixtures_dir / "vae_tiny_io.safetensors"))


@pytest.fixture(scope="module")
def random_model() -> AutoencoderKLTemporalDecoder:
    """A tiny random SVD VAE (2 levels: factor 2) whose every parameter, mix factors included, is non-trivial."""
    torch.manual_seed(0)
    model = AutoencoderKLTemporalDecoder(**TINY).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(0.05 * torch.randn_like(param) + (1.0 if name.endswith("norm1.weight") else 0.0)
                        if param.ndim == 1 else torch.randn_like(param) / param[0].numel() ** 0.5)
    return model


# --- parity with the official code (vae_tiny fixtures) -----------------------------------------------------------

def test_fixture_encode_parity(fixture_vae: SVDVideoVAE, fixture_io: dict) -> None:
    mean, std = fixture_vae.posterior(fixture_io["frames"])
    torch.testing.assert_close(mean, fixture_io["posterior_mean"], rtol=0, atol=1e-4)
    torch.testing.assert_close(std, fixture_io["posterior_std"], rtol=0, atol=1e-4)
    latent = fixture_vae.encode(fixture_io["frames"], fixture_io["posterior_eps"])
    assert latent.shape == (1, 4, 5, 8, 12)
    torch.testing.assert_close(latent, fixture_io["latent"], rtol=0, atol=1e-4)


def test_fixture_decode_parity_official_windows(fixture_vae: SVDVideoVAE, fixture_io: dict,
                                                fixtures_dir: Path) -> None:
    info = json.loads((fixtures_dir / "vae_tiny_info.json").read_text())["io"]
    calls = []
    decoded = fixture_vae.decode(fixture_io["latent"], window=info["decode_chunk"],
                                 callback=lambda done, total: calls.append((done, total)))
    torch.testing.assert_close(decoded, fixture_io["decoded"], rtol=0, atol=1e-4)
    assert calls == [(1, 2), (2, 2)]  # windows of 3 + 2 frames, as `decode_chunk_sizes`
    assert info["decode_chunk_sizes"] == [3, 2]


def test_mean_encode_and_generator_noise(fixture_vae: SVDVideoVAE, fixture_io: dict) -> None:
    frames = fixture_io["frames"][:2, :, :32, :48]
    mean, std = fixture_vae.posterior(frames)
    torch.testing.assert_close(fixture_vae.encode(frames, sample=False), (mean * 0.18215).transpose(0, 1)[None])
    first = fixture_vae.encode(frames, generator=torch.Generator().manual_seed(5))
    again = fixture_vae.encode(frames, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    g = torch.Generator().manual_seed(5)
    eps = torch.cat([torch.randn(1, 4, 4, 6, generator=g) for _ in range(2)])  # one draw per frame, in order
    torch.testing.assert_close(first, fixture_vae.encode(frames, eps), rtol=0, atol=0)


def test_low_precision_decode(fixtures_dir: Path, fixture_vae: SVDVideoVAE, fixture_io: dict) -> None:
    """bf16 (autocast over fp32 weights, like the official fp16 GPU decode, or bf16 weights) returns float32 frames
    within bf16 rounding of the fp32 decode (8 mantissa bits over ~20 layers: |Δ| well under 0.1 on [-1.3, 1.8])."""
    latent = fixture_io["latent"][:, :, :2, :4, :6]  # small: bf16 convolutions are slow on CPUs without bf16 units
    reference = fixture_vae.decode(latent)
    for options in ({"decode_autocast": torch.bfloat16}, {"dtype": torch.bfloat16}):
        vae = load_svd_vae(fixtures_dir / "vae_tiny.safetensors", config=fixtures_dir / "vae_tiny_config.json",
                           **options)
        decoded = vae.decode(latent)
        assert decoded.dtype == torch.float32
        assert 0 < (decoded - reference).abs().max() < 0.1


# --- weight layouts ----------------------------------------------------------------------------------------------

def _outputs(vae: SVDVideoVAE) -> tuple[torch.Tensor, torch.Tensor]:
    frames = torch.linspace(-1, 1, 4 * 3 * 16 * 24).reshape(4, 3, 16, 24).sin()
    latent = vae.encode(frames, sample=False)
    return latent, vae.decode(latent)


def test_svd_layout_round_trip(random_model: AutoencoderKLTemporalDecoder, tmp_path: Path) -> None:
    state = random_model.state_dict()
    svd = diffusers_to_svd(state)
    assert "decoder.up.0.block.1.time_stack.out_layers.3.weight" in svd
    assert svd["decoder.up.0.block.1.conv1.weight"].shape[0] == 32  # up.0 is the full-resolution level
    assert "decoder.up.0.block.0.mix_factor" in svd and "decoder.conv_out.time_mix_conv.weight" in svd
    assert svd["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert "quant_conv.weight" in svd  # random, so kept; only an identity is dropped
    back = svd_to_diffusers(svd)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)

    save_file({f"first_stage_model.{k}": v.contiguous() for k, v in svd.items()}, str(tmp_path / "svd.safetensors"))
    loaded = load_svd_vae(tmp_path / "svd.safetensors")  # config inferred from shapes
    assert loaded.downscale == 2 and loaded.scaling_factor == 0.18215
    for ours, reference in zip(_outputs(loaded), _outputs(SVDVideoVAE(random_model))):
        assert torch.equal(ours, reference)


def test_identity_quant_conv_is_implicit_in_svd_layout(random_model: AutoencoderKLTemporalDecoder) -> None:
    state = dict(random_model.state_dict())
    state["quant_conv.weight"] = torch.eye(8)[:, :, None, None]
    state["quant_conv.bias"] = torch.zeros(8)
    svd = diffusers_to_svd(state)
    assert "quant_conv.weight" not in svd  # the original SVD checkpoint has none
    torch.testing.assert_close(svd_to_diffusers(svd)["quant_conv.weight"], state["quant_conv.weight"])


def test_diffusers_folder_with_fp16_variant(random_model: AutoencoderKLTemporalDecoder, tmp_path: Path) -> None:
    folder = tmp_path / "svd" / "vae"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(dict(random_model.config)))
    half = {k: v.half() for k, v in random_model.state_dict().items()}
    save_file(half, str(folder / "diffusion_pytorch_model.fp16.safetensors"))
    with pytest.raises(FileNotFoundError, match="variant='fp16'"):
        load_svd_vae(tmp_path / "svd")
    loaded = load_svd_vae(tmp_path / "svd", variant="fp16")  # parent folder: its vae/ is used
    assert loaded.dtype == torch.float32  # fp16 file into fp32 parameters, as the official loader
    reference = AutoencoderKLTemporalDecoder(**TINY)
    reference.load_state_dict({k: v.float() for k, v in half.items()})
    for ours, expected in zip(_outputs(loaded), _outputs(SVDVideoVAE(reference))):
        assert torch.equal(ours, expected)


def test_not_an_svd_vae(tmp_path: Path) -> None:
    image_vae = {"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "decoder.conv_out.weight": torch.zeros(3, 8, 3, 3)}
    save_file(image_vae, str(tmp_path / "sd_vae.safetensors"))
    with pytest.raises(ValueError, match="sd_vae.safetensors is not the SVD temporal-decoder VAE"):
        load_svd_vae(tmp_path / "sd_vae.safetensors")
    torch.save({"weights": object()}, tmp_path / "code.pt")  # needs pickle code execution to load
    with pytest.raises(ValueError, match=r"refusing to load .*code\.pt: unpickling it would call [\w.]*object, i\.e\. run code"):
        load_svd_vae(tmp_path / "code.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_svd_vae(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="without config.json"):
        load_svd_vae(tmp_path)


def test_missing_keys_are_reported(random_model: AutoencoderKLTemporalDecoder, tmp_path: Path) -> None:
    state = {k: v for k, v in random_model.state_dict().items() if "conv_norm_out" not in k}
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match="missing keys .*conv_norm_out"):
        load_svd_vae(tmp_path / "broken.safetensors")


# --- tiling and windows ------------------------------------------------------------------------------------------

def test_blending_is_exact_for_local_functions() -> None:
    """With a per-pixel, per-frame network the tiled, windowed result must equal the untiled one: the blend
    divides by the weight sum, so any deviation of a real VAE comes from its non-local layers."""
    latent = torch.randn(1, 4, 7, 13, 11)

    def decode_fn(z: torch.Tensor, n: int) -> torch.Tensor:
        return F.interpolate(z[:, :3].tanh(), scale_factor=8, mode="nearest")

    untiled = decode_windows(decode_fn, latent, 8, window=7, window_overlap=0)
    tiled = decode_windows(decode_fn, latent, 8, window=4, window_overlap=2, tiling=SpatialTiling(48, 16, "fast"))
    torch.testing.assert_close(tiled, untiled, rtol=0, atol=2e-6)

    frames = torch.randn(3, 3, 50, 42)
    moments_fn = lambda x: F.avg_pool2d(torch.cat([x, x.square()], 1), 8)  # noqa: E731
    full = encode_moments(moments_fn, frames, 8)
    assert full.shape == (3, 6, 7, 6)  # 50x42 is edge-padded to 56x48
    torch.testing.assert_close(encode_moments(moments_fn, frames, 8, tiling=SpatialTiling(24, 8, "fast")), full,
                               rtol=0, atol=2e-6)


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_single_tile_equals_untiled(fixture_vae: SVDVideoVAE, fixture_io: dict, mode: str) -> None:
    tiling = SpatialTiling(96, 32, mode)  # covers the 64x96 frames in one tile
    latent = fixture_io["latent"][:, :, :3]
    assert torch.equal(fixture_vae.decode(latent, tiling=tiling), fixture_vae.decode(latent))
    frames = fixture_io["frames"][:1]
    assert torch.equal(fixture_vae.posterior(frames, tiling=tiling)[0], fixture_vae.posterior(frames)[0])


def test_fast_tiled_decode_and_encode_approximate_untiled(fixture_vae: SVDVideoVAE) -> None:
    """Fast mode. Tolerance: tiles see their own GroupNorm statistics and mid-block attention context, so tiled != untiled for
    any VAE (the helper test above shows the blending itself is exact). On statistically stationary content the
    per-tile statistics estimate the frame's, so the deviation must shrink as tiles grow and stay well below the
    signal: with 2x2 tiles of 112 px on 128-px frames mean|Δ| <= 10 % and max|Δ| <= 100 % of the output's std
    (measured: decode 5 % / 63 %, encode 6 % / 38 %); feathered overlaps must beat hard seams."""
    g = torch.Generator().manual_seed(0)
    latent = 0.2 * torch.randn(1, 4, 1, 16, 16, generator=g)
    reference = fixture_vae.decode(latent)
    error = {size: (fixture_vae.decode(latent, tiling=SpatialTiling(*size, "fast")) - reference).abs()
             for size in ((64, 0), (64, 16), (96, 32), (112, 32))}
    scale = reference.std()
    assert error[112, 32].mean() <= 0.1 * scale and error[112, 32].max() <= scale
    assert error[112, 32].mean() < error[96, 32].mean() < error[64, 16].mean() < error[64, 0].mean()
    assert error[64, 16].max() < 0.8 * error[64, 0].max()

    frames = torch.rand(1, 3, 128, 128, generator=g) * 2 - 1
    mean = fixture_vae.posterior(frames)[0]
    error = {size: (fixture_vae.posterior(frames, tiling=SpatialTiling(*size, "fast"))[0] - mean).abs()
             for size in ((64, 0), (96, 32), (112, 32))}
    scale = mean.std()
    assert error[112, 32].mean() <= 0.1 * scale and error[112, 32].max() <= scale
    assert error[112, 32].mean() < error[96, 32].mean() < error[64, 0].mean()
    assert error[96, 32].max() < 0.5 * error[64, 0].max()


@pytest.mark.parametrize("frames", [1, 2, 5, 7])
def test_official_windows_match_manual_chunks(random_model: AutoencoderKLTemporalDecoder, frames: int) -> None:
    vae = SVDVideoVAE(random_model)
    latent = torch.randn(1, 4, frames, 6, 5)
    z = latent[0].transpose(0, 1) / 0.18215
    with torch.no_grad():
        manual = torch.cat([random_model.decode(z[s:s + 3], num_frames=len(z[s:s + 3])).sample
                            for s in range(0, frames, 3)])
    decoded = vae.decode(latent)
    assert decoded.shape == (frames, 3, 12, 10)
    assert torch.equal(decoded, manual)


def test_overlapping_windows_blend(random_model: AutoencoderKLTemporalDecoder) -> None:
    vae = SVDVideoVAE(random_model)
    latent = torch.randn(1, 4, 6, 4, 4)
    z = latent[0].transpose(0, 1) / 0.18215
    with torch.no_grad():
        first, last = (random_model.decode(z[s:s + 4], num_frames=4).sample for s in (0, 2))
    blended = vae.decode(latent, window=4, window_overlap=2)  # windows (0,4), (2,6)
    torch.testing.assert_close(blended[:2], first[:2], rtol=0, atol=0)
    torch.testing.assert_close(blended[4:], last[2:], rtol=0, atol=0)
    torch.testing.assert_close(blended[2], 2 / 3 * first[2] + 1 / 3 * last[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(blended[3], 1 / 3 * first[3] + 2 / 3 * last[1], rtol=0, atol=1e-6)


def test_one_frame_and_odd_sizes(fixture_vae: SVDVideoVAE) -> None:
    frames = torch.rand(1, 3, 37, 53) * 2 - 1
    latent = fixture_vae.encode(frames, sample=False)
    assert latent.shape == (1, 4, 1, 5, 7)  # ceil(37/8) x ceil(53/8)
    calls = []
    tiled = fixture_vae.encode(frames, sample=False, tiling=SpatialTiling(32, 16, "fast"),
                               callback=lambda done, total: calls.append((done, total)))
    assert tiled.shape == latent.shape and calls[-1] == (6, 6)  # 2x3 tiles of 4 (overlap 2) over the 5x7 latent
    decoded = fixture_vae.decode(latent, tiling=SpatialTiling(24, 8, "fast"), window=3, window_overlap=1)
    assert decoded.shape == (1, 3, 40, 56) and bool(decoded.isfinite().all())


def test_callback_interrupts(fixture_vae: SVDVideoVAE, fixture_io: dict) -> None:
    class Stop(Exception):
        pass

    def stop_after_two(done: int, total: int) -> None:
        if done == 2:
            raise Stop(f"{done}/{total}")

    with pytest.raises(Stop, match="2/12"):  # 2 windows x (2 x 3) tiles
        fixture_vae.decode(fixture_io["latent"], tiling=SpatialTiling(48, 16, "fast"), callback=stop_after_two)


def test_bad_inputs(fixture_vae: SVDVideoVAE, fixture_io: dict) -> None:
    with pytest.raises(ValueError, match=r"frames must be a float tensor \[T,3,H,W\]"):
        fixture_vae.encode(torch.zeros(2, 64, 96, 3))
    with pytest.raises(ValueError, match="eps has shape"):
        fixture_vae.encode(fixture_io["frames"][:2], torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"latent must be \[1,4,T,h,w\]"):
        fixture_vae.decode(torch.zeros(4, 5, 8, 12))
    with pytest.raises(ValueError, match="window_overlap < window"):
        fixture_vae.decode(fixture_io["latent"], window=3, window_overlap=3)
    with pytest.raises(ValueError, match="multiple of 8"):
        SpatialTiling(100, 16)
    with pytest.raises(ValueError, match="smaller than the tile"):
        SpatialTiling(64, 64, "fast")
