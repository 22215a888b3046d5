"""The tiny models tree: real file layouts that star_core's and ComfyUI's loaders accept."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from star_core import tiny_models
from star_core.checkpoint import load_star_model
from star_core.model import STARConfig
from star_core.vae import build_vae, load_svd_vae


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return root, tiny_models.write_tree(root, ["star", "vae_tiny"], seed=5)


def test_writes_a_comfyui_models_tree(tree):
    root, written = tree
    assert {p.relative_to(root).as_posix() for p in written.values()} == {
        "STAR/star_tiny.safetensors", "vae/svd_vae_tiny.safetensors"}


def test_star_checkpoint_has_the_official_keys_and_loads_strictly(tree, fixtures_dir):
    root, written = tree
    sd = load_file(str(written["star"]))
    official = load_file(str(fixtures_dir / "tiny_state_dict.safetensors"))
    # same key set and shapes as the official tiny model (the fixture was saved by the official code)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in official.items()}
    model = load_star_model(written["star"])
    assert model.config.dim == 32 and model.config.dim_mult == (1, 2, 4)
    x = torch.randn(1, 4, 2, 10, 8)
    with torch.no_grad():
        v = model(x, torch.tensor([899]), torch.randn(1, 77, 1024), x)
    assert v.shape == x.shape and torch.isfinite(v).all() and v.std() > 0.05


def test_weights_follow_the_seed(tree):
    _, written = tree
    again = tiny_models.star_weights(seed=5)
    other = tiny_models.star_weights(seed=6)
    stored = load_file(str(written["star"]))
    key = "input_blocks.0.0.weight"
    assert torch.equal(stored[key], again[key]) and not torch.equal(stored[key], other[key])
    norm = stored["out.0.weight"]  # GroupNorm weight: 1 + 0.1·randn
    assert abs(norm.mean().item() - 1) < 0.1 and 0.03 < norm.std().item() < 0.2


def test_tiny_vae_is_original_svd_layout_and_round_trips(tree):
    _, written = tree
    sd = load_file(str(written["vae_tiny"]))
    assert "decoder.mid.block_1.mix_factor" in sd  # ComfyUI's SVD-VAE marker
    assert "quant_conv.weight" not in sd  # the original layout has none (identity in diffusers)
    vae = load_svd_vae(written["vae_tiny"])
    assert vae.model.config.block_out_channels == (32, 32, 64, 64) or \
        list(vae.model.config.block_out_channels) == [32, 32, 64, 64]
    frames = torch.rand(2, 3, 32, 48) * 2 - 1
    latent = vae.encode(frames, torch.zeros(2, 4, 4, 6))
    assert latent.shape == (1, 4, 2, 4, 6)
    assert vae.decode(latent, 2).shape == (2, 3, 32, 48)


def test_full_width_vae_matches_comfyui_fixed_svd_config():
    sd = tiny_models.svd_vae_weights(seed=1, dtype=torch.float16, **tiny_models.FULL_VAE)
    # ComfyUI builds the SVD VAE with ch=128, ch_mult=[1,2,4,4], num_res_blocks=2, z_channels=4
    assert sd["encoder.conv_in.weight"].shape == (128, 3, 3, 3)
    assert sd["encoder.down.3.block.1.conv2.weight"].shape == (512, 512, 3, 3)
    assert sd["decoder.up.0.block.2.conv2.weight"].shape == (128, 128, 3, 3)
    assert sd["decoder.conv_out.time_mix_conv.weight"].shape[:2] == (3, 3)
    assert sd["encoder.conv_out.weight"].shape == (8, 512, 3, 3) and sd["decoder.conv_in.weight"].shape[1] == 4
    assert all(v.dtype == torch.float16 for v in sd.values())
    model = build_vae(sd)  # strict load into the released SVD config
    assert list(model.config.block_out_channels) == [128, 256, 512, 512]


def test_clip_h_layout_is_what_comfyui_detects_as_sd2():
    shapes = tiny_models.clip_h_shapes()
    # comfy.sd.detect_te_model: layer 22 present (CLIP-H) and layer 30 absent (not CLIP-G)
    assert shapes["text_model.encoder.layers.22.mlp.fc1.weight"] == (4096, 1024)
    assert "text_model.encoder.layers.30.mlp.fc1.weight" not in shapes
    assert sum(k.endswith("mlp.fc1.weight") for k in shapes) == 24
    assert shapes["text_model.embeddings.token_embedding.weight"] == (49408, 1024)
    assert shapes["text_model.embeddings.position_embedding.weight"] == (77, 1024)
    assert shapes["text_projection.weight"] == (1024, 1024)


def test_unknown_part_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"unknown tiny-model parts \['vae'\]"):
        tiny_models.write_tree(tmp_path, ["star", "vae"])
    assert STARConfig(**tiny_models.TINY_STAR).embed_dim == 128
