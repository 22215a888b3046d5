"""Another model's file in a STAR slot (issue #11, rows 1 and 20): the error says what the file looks like and
what STAR needs, in the library loaders, the CLI (`--model`) and the ComfyUI nodes (tests/test_nodes_foreign.py)."""
from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from star_core import cli
from star_core.checkpoint import check_star_checkpoint, load_star_model
from star_core.identify import describe_weights
from star_core.text import load_text_encoder
from star_core.vae import load_svd_vae
from star_core.video_io import write_synthetic_clip

pytestmark = pytest.mark.usefixtures("one_thread")


def ldm_unet(prefix: str = "", context: int = 768, *, video: bool = False, xl: bool = False) -> dict:
    """The key layout of a Stability (ldm/sgm) UNet — the names STAR's own UNet shares — with small tensors."""
    shapes = {
        "time_embed.0.weight": (16, 8), "input_blocks.0.0.weight": (8, 4, 3, 3),
        "input_blocks.1.0.in_layers.2.weight": (8, 8, 3, 3),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, context),
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight": (8, context), "out.2.weight": (4, 8, 3, 3),
    }
    if video:
        shapes |= {"input_blocks.1.0.time_stack.in_layers.2.weight": (8, 8, 3, 1, 1),
                   "input_blocks.1.0.time_mixer.mix_factor": (1,)}
    if xl:
        shapes["label_emb.0.0.weight"] = (16, 2816)
    return {prefix + k: torch.zeros(s) for k, s in shapes.items()}


def sd15_checkpoint() -> dict:
    """A full SD 1.5 checkpoint (v1-5-pruned-emaonly layout): UNet + VAE + CLIP-L."""
    return ldm_unet("model.diffusion_model.") | {
        "first_stage_model.encoder.down.0.block.0.conv1.weight": torch.zeros(8, 8, 3, 3),
        "first_stage_model.encoder.conv_out.weight": torch.zeros(8, 8, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(16, 768),
    }


def svd_checkpoint() -> dict:
    """A full SVD checkpoint (svd_xt.safetensors layout): video UNet + temporal VAE + image conditioner."""
    return ldm_unet("model.diffusion_model.", 1024, video=True) | {
        "first_stage_model.decoder.conv_out.time_mix_conv.weight": torch.zeros(3, 3, 3, 1, 1),
        "conditioner.embedders.0.open_clip.model.visual.conv1.weight": torch.zeros(8, 3, 14, 14),
    }


def _meta(build):
    with torch.device("meta"):
        return build().state_dict()


def _diffusers_unet(**kwargs):
    from diffusers import UNet2DConditionModel
    return lambda: UNet2DConditionModel(**kwargs)


def _svd_unet():
    from diffusers import UNetSpatioTemporalConditionModel
    return UNetSpatioTemporalConditionModel()


def _image_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(32, 64))


def _clip_text(width):
    from transformers import CLIPTextConfig, CLIPTextModel
    return lambda: CLIPTextModel(CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=1,
                                                num_attention_heads=width // 64))


CASES = {
    "sd15_full": (sd15_checkpoint, "a full Stable Diffusion 1.x checkpoint (UNet + VAE + text encoder, ldm layout)"),
    "svd_full": (svd_checkpoint, "a full Stable Video Diffusion (SVD) checkpoint (UNet + VAE + text encoder, ldm"),
    "sd15_unet_ldm": (ldm_unet, "a Stable Diffusion 1.x UNet (ldm layout)"),
    "sd2_unet_ldm": (lambda: ldm_unet(context=1024), "a Stable Diffusion 2.x UNet (ldm layout)"),
    "sdxl_unet_ldm": (lambda: ldm_unet(context=2048, xl=True), "an SDXL UNet (ldm layout)"),
    "svd_unet_ldm": (lambda: ldm_unet(context=1024, video=True), "a Stable Video Diffusion (SVD) UNet (ldm layout)"),
    "sd15_unet_diffusers": (lambda: _meta(_diffusers_unet(cross_attention_dim=768)),
                            "a Stable Diffusion 1.x UNet (diffusers UNet2DConditionModel)"),
    "sdxl_unet_diffusers": (lambda: _meta(_diffusers_unet(cross_attention_dim=2048, addition_embed_type="text_time",
                                                          projection_class_embeddings_input_dim=2816,
                                                          addition_time_embed_dim=256)),
                            "an SDXL UNet (diffusers layout)"),
    "svd_unet_diffusers": (lambda: _meta(_svd_unet),
                           "a Stable Video Diffusion (SVD) UNet (diffusers UNetSpatioTemporalConditionModel)"),
    "image_vae": (lambda: _meta(_image_vae), "an image VAE (Stable Diffusion / SDXL AutoencoderKL, diffusers layout)"),
    "clip_l": (lambda: _meta(_clip_text(768)), "a CLIP ViT-L/14 text encoder (SD 1.x) (768 wide)"),
    "clip_bigg": (lambda: _meta(_clip_text(1280)), "an OpenCLIP ViT-bigG/14 text encoder (SDXL) (1280 wide)"),
    "lora": (lambda: {"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 8)}, "a LoRA"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_other_models_are_recognised(case):
    build, expected = CASES[case]
    assert describe_weights(build()).startswith(expected)


def test_unknown_weights_are_not_guessed():
    assert describe_weights({"foo.weight": torch.zeros(2)}) is None
    assert describe_weights({}) is None


@pytest.mark.parametrize("case, expected", [
    ("sd15_full", "a full Stable Diffusion 1.x checkpoint"),
    ("svd_full", "a full Stable Video Diffusion (SVD) checkpoint"),
    ("svd_unet_ldm", "a Stable Video Diffusion (SVD) UNet (ldm layout)"),
    ("sdxl_unet_ldm", "an SDXL UNet"),
])
def test_star_loader_says_what_another_checkpoint_is(tmp_path, case, expected):
    path = tmp_path / f"{case}.safetensors"
    save_file(CASES[case][0](), str(path))
    pattern = (f"{re.escape(str(path))} is not a STAR I2VGen-XL checkpoint: it looks like {re.escape(expected)}.*"
               r"STAR needs its own checkpoint, light_deg\.pt or heavy_deg\.pt")
    with pytest.raises(ValueError, match=pattern):
        load_star_model(path)
    with pytest.raises(ValueError, match=pattern):  # the header-only check the CLI runs first
        check_star_checkpoint(path)
    pt = tmp_path / f"{case}.pt"
    torch.save(CASES[case][0](), pt)
    with pytest.raises(ValueError, match="looks like " + re.escape(expected)):
        load_star_model(pt)


def test_cli_model_option_with_another_checkpoint_fails_fast_in_one_line(tmp_path, capsys):
    clip = write_synthetic_clip(tmp_path / "in.mp4", frames=2, width=32, height=16)
    svd = tmp_path / "svd_xt.safetensors"
    save_file(svd_checkpoint(), str(svd))
    # the other components only have to exist: the checkpoint is checked before any of them is loaded
    (tmp_path / "vae.safetensors").write_bytes(b"x")
    (tmp_path / "clip_h.safetensors").write_bytes(b"x")
    (tmp_path / "tok").mkdir()
    code = cli.main(["upscale", str(clip), "-o", str(tmp_path / "out.mp4"), "--model", str(svd), "--offline",
                     "--vae", str(tmp_path / "vae.safetensors"), "--text-encoder", str(tmp_path / "clip_h.safetensors"),
                     "--tokenizer", str(tmp_path / "tok"), "--quiet"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_FAILED
    assert err.count("\n") == 1 and err.startswith(f"error: {svd} is not a STAR I2VGen-XL checkpoint: it looks like "
                                                   "a full Stable Video Diffusion (SVD) checkpoint"), err
    assert "light_deg.pt or heavy_deg.pt" in err and "Traceback" not in err
    assert not (tmp_path / "out.mp4").exists()


def test_vae_loader_says_what_another_file_is(tmp_path, fixtures_dir):
    from star_core.tiny_models import random_weights

    image_vae = tmp_path / "sd_vae.safetensors"
    shapes = {k: tuple(v.shape) for k, v in _meta(_image_vae).items()}
    save_file(random_weights(shapes, 0), str(image_vae))
    with pytest.raises(ValueError, match=rf"{re.escape(str(image_vae))} is not the SVD temporal-decoder VAE: it looks like an image "
                                         r"VAE .*STAR needs the SVD temporal-decoder VAE \(stabilityai/"):
        load_svd_vae(image_vae)
    with pytest.raises(ValueError, match="is not the SVD temporal-decoder VAE: it looks like a STAR checkpoint"):
        load_svd_vae(fixtures_dir / "tiny_state_dict.safetensors")


def test_text_loader_says_what_another_file_is(fixtures_dir):
    path = fixtures_dir / "vae_tiny.safetensors"
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} holds no CLIP text tower: it looks like the SVD temporal-decoder "
                                         r"VAE .*STAR needs the OpenCLIP ViT-H/14 text encoder, 1024 wide"):
        load_text_encoder(path)


def test_conditioning_of_another_text_encoder_is_refused_by_the_network(fixtures_dir):
    from star_core.verify.forward import load_fixture_model

    model = load_fixture_model(fixtures_dir)
    x = torch.zeros(1, 4, 1, 10, 12)
    with pytest.raises(ValueError, match=r"text context is 768 wide, from a CLIP ViT-L/14 text encoder \(SD 1\.x\), "
                                         r"but this STAR model reads 1024-wide text context\. STAR needs the OpenCLIP "
                                         r"ViT-H/14 text encoder"):
        model(x, torch.tensor([500]), torch.zeros(1, 77, 768), x)


def test_cli_text_encoder_of_another_width_fails_before_the_video_is_encoded(tmp_path, capsys):
    from transformers import CLIPTextConfig, CLIPTextModel

    from star_core.text.vocab import fetch_openclip_vocab
    from star_core.tiny_models import random_weights, write_tree

    write_tree(tmp_path / "models", ["star", "vae_tiny"])
    config = CLIPTextConfig(hidden_size=768, intermediate_size=768, num_hidden_layers=2, num_attention_heads=12)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in CLIPTextModel(config).state_dict().items() if "position_ids" not in k}
    clip_l = tmp_path / "clip_l.safetensors"
    save_file(random_weights(shapes, 0), str(clip_l))
    clip = write_synthetic_clip(tmp_path / "in.mp4", frames=2, width=32, height=16)
    code = cli.main(["upscale", str(clip), "-o", str(tmp_path / "out.mp4"), "--offline", "--quiet",
                     "--model", str(tmp_path / "models" / "STAR" / "star_tiny.safetensors"),
                     "--vae", str(tmp_path / "models" / "vae" / "svd_vae_tiny.safetensors"),
                     "--text-encoder", str(clip_l), "--tokenizer", str(fetch_openclip_vocab()), "--threads", "1"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_FAILED and err.count("\n") == 1, err
    assert err.startswith(f"error: the context of --text-encoder {clip_l} is 768 wide, from a CLIP ViT-L/14 text "
                          "encoder (SD 1.x), but this STAR model reads 1024-wide text context. STAR needs the "
                          "OpenCLIP ViT-H/14 text encoder"), err
    assert not (tmp_path / "out.mp4").exists()
