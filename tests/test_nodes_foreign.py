"""Another model's file or conditioning at a STAR node (issue #11, rows 1 and 20), on the stub host: the node
error names the input, what it looks like and what STAR needs, before any network runs."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent / "comfy_stub"))
import harness  # noqa: E402

from star_core.tiny_models import random_weights, write_tree  # noqa: E402
from test_foreign_weights import _image_vae, _meta, sd15_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def nodes(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("models")
    write_tree(root, ["star", "vae_tiny"])
    save_file(sd15_checkpoint(), str(root / "STAR" / "v1-5-pruned-emaonly.safetensors"))
    shapes = {k: tuple(v.shape) for k, v in _meta(_image_vae).items()}
    save_file(random_weights(shapes, 0), str(root / "vae" / "sd_image_vae.safetensors"))
    (root / "STAR" / "light_deg_partial.safetensors").write_bytes(b"")
    torch.save({"state_dict": {"out.2.bias": torch.zeros(4)}, "payload": Payload(root / "pwned.txt")},
               root / "STAR" / "heavy_deg_evil.pt")
    return harness.node_classes(harness.load_pack(root))


class Payload:
    """Unpickling this would create a file: proof that code from the checkpoint ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_model_loader_names_a_broken_file_and_refuses_code(nodes):
    import folder_paths

    with pytest.raises(ValueError, match=r"light_deg_partial\.safetensors is empty \(0 bytes\)"):
        harness.run(nodes["STARModelLoader"], ckpt_name="light_deg_partial.safetensors", weight_dtype="auto")
    with pytest.raises(ValueError, match=r"refusing to load .*heavy_deg_evil\.pt: unpickling it would call"):
        harness.run(nodes["STARModelLoader"], ckpt_name="heavy_deg_evil.pt", weight_dtype="auto")
    models_dir = Path(folder_paths.get_folder_paths("STAR")[0]).parent
    assert not (models_dir / "pwned.txt").exists()


def test_model_loader_names_another_checkpoint(nodes):
    with pytest.raises(ValueError, match=r"ckpt_name 'v1-5-pruned-emaonly\.safetensors' is not a STAR I2VGen-XL "
                                         r"checkpoint: it looks like a full Stable Diffusion 1\.x checkpoint \(UNet \+ "
                                         r"VAE \+ text encoder, ldm layout\).*STAR needs its own checkpoint, "
                                         r"light_deg\.pt or heavy_deg\.pt"):
        harness.run(nodes["STARModelLoader"], ckpt_name="v1-5-pruned-emaonly.safetensors", weight_dtype="auto")


def test_vae_loader_names_an_image_vae(nodes):
    with pytest.raises(ValueError, match=r"sd_image_vae\.safetensors is not the SVD temporal-decoder VAE: it looks "
                                         r"like an image VAE .*STAR needs the SVD temporal-decoder VAE"):
        harness.run(nodes["STARVAELoader"], vae_name="sd_image_vae.safetensors")


@pytest.mark.parametrize("width, encoder", [(768, r"a CLIP ViT-L/14 text encoder \(SD 1\.x\)"),
                                            (2048, r"the SDXL text encoders \(CLIP-L and OpenCLIP bigG, concatenated\)")])
def test_sampler_refuses_conditioning_of_another_text_encoder(nodes, width, encoder):
    import comfy.model_management as mm

    (model,) = harness.run(nodes["STARModelLoader"], ckpt_name="star_tiny.safetensors", weight_dtype="auto")
    (vae,) = harness.run(nodes["STARVAELoader"], vae_name="svd_vae_tiny.safetensors")
    (lr_latent, _, _) = harness.run(nodes["STARLREncode"], vae=vae, images=torch.rand(1, 12, 16, 3), video=None,
                                    fps=24.0, scale=2.0, target_width=0, target_height=0, padding="minimal",
                                    posterior="sample", seed=666, tile=0, tile_overlap=32)
    good = [[torch.zeros(1, 77, 1024), {}]]
    other = [[torch.zeros(1, 77, width), {}]]
    loaded_before = list(mm.loaded)
    with pytest.raises(ValueError, match=rf"positive conditioning is {width} wide, from {encoder}, but this STAR "
                                         r"model reads 1024-wide text context\. STAR needs the OpenCLIP ViT-H/14"):
        harness.run(nodes["STARSampler"], star_model=model, positive=other, negative=good, lr_latent=lr_latent,
                    solver_mode="fast", steps=15, cfg=7.5, rescale=0.2, denoise=1.0, chunk_length=32,
                    chunk_overlap=-1, fusion="official")
    assert mm.loaded == loaded_before  # refused before the network was loaded or run


class WideClip:
    """A core CLIP stand-in whose text encoder is 768 wide (SD 1.x's CLIP-L), not STAR's 1024."""

    def tokenize(self, text: str) -> dict:
        return {"l": [[(1, 1.0)] * 77]}

    def encode_from_tokens_scheduled(self, tokens: dict) -> list:
        return [[torch.zeros(1, 77, 768), {"pooled_output": None}]]


def test_upscale_refuses_another_text_encoder_before_reading_the_video(nodes, monkeypatch):
    import comfy.model_management as mm

    from star_pack_under_test.nodes import upscale

    (model,) = harness.run(nodes["STARModelLoader"], ckpt_name="star_tiny.safetensors", weight_dtype="auto")
    (vae,) = harness.run(nodes["STARVAELoader"], vae_name="svd_vae_tiny.safetensors")
    monkeypatch.setattr(upscale, "video_source", lambda video: pytest.fail("the video was read"))
    loaded_before = list(mm.loaded)
    with pytest.raises(ValueError, match=r"prompt conditioning is 768 wide, from a CLIP ViT-L/14 text encoder "
                                         r"\(SD 1\.x\), but this STAR model reads 1024-wide text context"):
        harness.run(nodes["STARUpscale"], star_model=model, vae=vae, clip=WideClip(), video=object(),
                    prompt="a cat", scale=2.0, padding="minimal", seed=5, vae_tile=0)
    assert mm.loaded == loaded_before
