"""The ComfyUI nodes on a stub host: registration, every node's execute path end to end, Cancel, error paths."""
from __future__ import annotations

import sys
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "comfy_stub"))
import harness  # noqa: E402

from star_core.tiny_models import write_tree  # noqa: E402

FRAMES, LR_H, LR_W = 2, 12, 16  # x2 → 24x32 target; minimal padding → 80x64 canvas, latent 10x8


class FakeCoreVAE:
    """A core `VAE` stand-in: ComfyUI keeps the SVD VAE's original-layout weights in `first_stage_model`."""

    def __init__(self, state_dict: dict):
        self.first_stage_model = SimpleNamespace(state_dict=lambda: dict(state_dict))


class FakeClip:
    """A core-CLIP stand-in: every prompt is two 77-token windows; the context depends on the text only."""

    def __init__(self):
        self.encoded: list[int] = []

    def tokenize(self, text: str) -> dict:
        return {"h": [[(len(text), 1.0)] * 77, [(0, 1.0)] * 77]}

    def encode_from_tokens_scheduled(self, tokens: dict) -> list:
        self.encoded.append(len(tokens["h"]))
        g = torch.Generator().manual_seed(tokens["h"][0][0][0])
        return [[torch.randn(1, 77 * len(tokens["h"]), 1024, generator=g), {"pooled_output": None}]]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_tree(root, ["star", "vae_tiny"])
    return root


@pytest.fixture(scope="module")
def pack(models):
    return harness.load_pack(models)


@pytest.fixture(scope="module")
def nodes(pack) -> dict:
    return harness.node_classes(pack)


@pytest.fixture(scope="module")
def lr_frames() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.rand(FRAMES, LR_H, LR_W, 3, generator=g)


@pytest.fixture(scope="module")
def lr_latent(nodes, loaded, lr_frames) -> dict:
    return encode(nodes, loaded.vae, images=lr_frames)[0]


@pytest.fixture(scope="module")
def loaded(nodes):
    (model,) = harness.run(nodes["STARModelLoader"], ckpt_name="star_tiny.safetensors", weight_dtype="auto")
    (vae,) = harness.run(nodes["STARVAELoader"], vae_name="svd_vae_tiny.safetensors")
    positive, negative = harness.run(nodes["STARTextEncode"], clip=FakeClip(), prompt="a good video",
                                     suffix="official", negative_prompt="blurry")
    return SimpleNamespace(model=model, vae=vae, positive=positive, negative=negative)


def encode(nodes, vae, images=None, video=None, **overrides):
    inputs = dict(vae=vae, images=images, video=video, fps=24.0, scale=2.0, target_width=0, target_height=0,
                  padding="minimal", posterior="sample", seed=666, tile=0, tile_overlap=32) | overrides
    return harness.run(nodes["STARLREncode"], **inputs)


def sample(nodes, loaded, lr_latent, **overrides):
    inputs = dict(star_model=loaded.model, positive=loaded.positive, negative=loaded.negative, lr_latent=lr_latent,
                  solver_mode="normal", steps=2, cfg=7.5, rescale=0.2, denoise=1.0, chunk_length=32,
                  chunk_overlap=-1, fusion="hann") | overrides
    return harness.run(nodes["STARSampler"], **inputs)


def test_entrypoint_registers_every_node_and_the_star_folder(pack, nodes, models):
    import folder_paths

    assert sorted(nodes) == sorted(["STARModelLoader", "STARVAELoader", "STARTextEncode", "STARUpscale",
                                    "STARVideoEncode", "STARLREncode", "STARSampler", "STARVideoDecode",
                                    "STARTiledVAEDecode", "STARColourFix"])
    assert folder_paths.get_folder_paths("STAR") == [str(models / "STAR")]
    assert folder_paths.get_filename_list("STAR") == ["star_tiny.safetensors"]


def test_star_folder_keeps_paths_from_extra_model_paths(models, tmp_path):
    import folder_paths

    folder_paths.set_models_dir(str(models))
    folder_paths.add_model_folder_path("STAR", str(tmp_path))  # what extra_model_paths.yaml does first
    harness.load_pack(models, reset=False)
    assert folder_paths.get_folder_paths("STAR") == [str(tmp_path), str(models / "STAR")]
    harness.load_pack(models)  # restore the module-level state for the other tests


def test_full_graph_gives_target_size_and_frame_count(nodes, loaded, lr_frames):
    import comfy.model_management as mm
    import comfy.utils

    comfy.utils.updates.clear()
    lr_latent, lr_images, fps = encode(nodes, loaded.vae, images=lr_frames)
    assert lr_latent["samples"].shape == (1, 4, FRAMES, 10, 8)
    # IMAGE frames carry no frame rate: the fps input is passed on (never 0, which CreateVideo would take)
    assert torch.equal(lr_images, lr_frames) and fps == 24.0 and lr_latent["star_geometry"]["fps"] == 24.0
    # the VAE and the STAR network both go through ComfyUI's memory manager; ComfyUI logs "Requested to load
    # <class name>", so the VAE's holder has a name a user recognises
    assert getattr(mm.loaded[-1].model, "vae", None) is loaded.vae.model
    assert type(mm.loaded[-1].model).__name__ == "SVD_VAE"
    (latent,) = sample(nodes, loaded, lr_latent)
    assert latent["samples"].shape == lr_latent["samples"].shape
    assert mm.loaded[-1] is loaded.model
    (images,) = harness.run(nodes["STARTiledVAEDecode"], samples=latent, vae=loaded.vae, tile=0, tile_overlap=64,
                            temporal_window=3, temporal_overlap=0)
    assert images.shape == (FRAMES, 2 * LR_H, 2 * LR_W, 3)
    assert images.dtype == torch.float32 and 0 <= images.min() and images.max() <= 1
    (fixed,) = harness.run(nodes["STARColourFix"], images=images, lr_images=lr_images, method="adain",
                           strength=1.0)
    assert fixed.shape == images.shape
    # per-frame statistics now follow the LR frames (AdaIN): means match to float precision
    assert torch.allclose(fixed.mean(dim=(1, 2)), lr_frames.mean(dim=(1, 2)), atol=2e-2)
    # progress: encoded frames; the sampler's calls done before each network call (2 steps × cond/uncond) and
    # after each solver step; then decode up to done
    assert comfy.utils.updates[:8] == [(1, 2), (2, 2), (0, 4), (1, 4), (2, 4), (2, 4), (3, 4), (4, 4)]
    assert len(comfy.utils.updates) > 8 and comfy.utils.updates[-1][0] == comfy.utils.updates[-1][1]


def test_text_encode_cuts_to_one_window_and_builds_the_caption(nodes):
    from star_core.text.prompts import POSITIVE_SUFFIX

    clip = FakeClip()
    positive, negative = harness.run(nodes["STARTextEncode"], clip=clip, prompt="a cat", suffix="official",
                                     negative_prompt="bad")
    assert clip.encoded == [1, 1]
    assert positive[0][0].shape == (1, 77, 1024)
    expected = FakeClip().encode_from_tokens_scheduled({"h": [[(len("a cat" + POSITIVE_SUFFIX), 1.0)]]})
    assert torch.equal(positive[0][0], expected[0][0])
    (none_pos, _) = harness.run(nodes["STARTextEncode"], clip=clip, prompt="a cat", suffix="none",
                                negative_prompt="bad")
    assert not torch.equal(none_pos[0][0], positive[0][0])


def test_seed_decides_the_result_and_nodes_match_the_pipeline(nodes, loaded, lr_frames, lr_latent):
    from star_core import pipeline
    from star_core.diffusion.star_sampling import SamplerSettings
    from star_core.seeds import RunNoise

    a = sample(nodes, loaded, lr_latent, cfg=1.0)[0]["samples"]
    c = sample(nodes, loaded, encode(nodes, loaded.vae, images=lr_frames, seed=7)[0], cfg=1.0)[0]["samples"]
    assert not torch.equal(a, c)
    # the nodes add no math: the same run through star_core.pipeline directly gives the same latent
    pixels, geometry = pipeline.prepare_lr(lr_frames, scale=2.0, padding="minimal")
    ref_lr = pipeline.encode_lr(loaded.vae, pixels, geometry, RunNoise(666))
    assert torch.equal(ref_lr, lr_latent["samples"])
    settings = SamplerSettings(mode="normal", steps=2, cfg=1.0, chunk_len=32, fusion="hann")
    ref = pipeline.sample(loaded.model.model, ref_lr, loaded.positive[0][0], loaded.negative[0][0], settings,
                          RunNoise(666))
    assert torch.allclose(ref, a, atol=1e-6)


def test_one_seed_serves_the_whole_run(nodes, loaded, lr_frames):
    """LR Encode holds the run's seed; the sampler continues that stream: the same numbers as one RunNoise used
    for the posterior noise, then the start noise and the Brownian entropy (the documented draw order)."""
    from star_core import pipeline
    from star_core.diffusion.star_sampling import SamplerSettings
    from star_core.seeds import RunNoise

    lr_latent = encode(nodes, loaded.vae, images=lr_frames, seed=12345)[0]
    assert lr_latent["star_seed"] == 12345
    (latent,) = sample(nodes, loaded, lr_latent, cfg=1.0)
    assert latent["star_seed"] == 12345
    one_stream = RunNoise(12345)
    pixels, geometry = pipeline.prepare_lr(lr_frames, scale=2.0, padding="minimal")
    ref_lr = pipeline.encode_lr(loaded.vae, pixels, geometry, one_stream)
    settings = SamplerSettings(mode="normal", steps=2, cfg=1.0, chunk_len=32, fusion="hann")
    ref = pipeline.sample(loaded.model.model, ref_lr, loaded.positive[0][0], loaded.negative[0][0], settings,
                          one_stream)
    assert torch.equal(ref_lr, lr_latent["samples"])
    assert torch.allclose(ref, latent["samples"], atol=1e-6)
    with pytest.raises(ValueError, match="no STAR seed; make it with STAR LR Encode"):
        sample(nodes, loaded, {k: v for k, v in lr_latent.items() if k != "star_seed"})


@pytest.mark.parametrize("mode, steps, verdict", [
    ("fast", 15, True),
    ("normal", 40, True),
    ("fast", 40, "steps: 40 does nothing in solver_mode fast, which always runs STAR's fixed 15-step schedule; "
                 "set steps to 15, or solver_mode to normal to use 40 steps"),
    ("normal", 1, "steps: 1 is outside 2..1000"),
    ("quick", 15, "solver_mode: 'quick' is not one of fast, normal"),
])
def test_sampler_rejects_steps_that_fast_mode_would_ignore(nodes, mode, steps, verdict):
    assert nodes["STARSampler"].validate_inputs(solver_mode=mode, steps=steps) == verdict


def test_video_input_gives_frames_and_fps(nodes, loaded, lr_frames):
    video = SimpleNamespace(get_components=lambda: SimpleNamespace(images=lr_frames, frame_rate=Fraction(30000, 1001)))
    lr_latent, lr_images, fps = encode(nodes, loaded.vae, video=video)
    assert fps == pytest.approx(29.97002997) and lr_latent["star_geometry"]["fps"] == pytest.approx(fps)
    assert torch.equal(lr_images, lr_frames)


def test_target_size_and_official_padding(nodes, loaded, lr_frames):
    lr_latent = encode(nodes, loaded.vae, images=lr_frames[:1], target_width=40, target_height=20)[0]
    assert lr_latent["star_geometry"]["target_size"] in ([20, 40], (20, 40))
    (images,) = harness.run(nodes["STARTiledVAEDecode"], samples=lr_latent, vae=loaded.vae, tile=16, tile_overlap=8,
                            temporal_window=1, temporal_overlap=0)
    assert images.shape == (1, 20, 40, 3)


def test_core_vae_is_adapted_to_the_same_numbers(nodes, loaded, lr_frames, models):
    from safetensors.torch import load_file

    sgm = load_file(str(models / "vae" / "svd_vae_tiny.safetensors"))
    core_vae = FakeCoreVAE(sgm)
    via_core = encode(nodes, core_vae, images=lr_frames)[0]["samples"]
    via_star = encode(nodes, loaded.vae, images=lr_frames)[0]["samples"]
    assert torch.equal(via_core, via_star)


def test_cancel_stops_within_one_model_evaluation(nodes, loaded, lr_latent):
    import comfy.model_management as mm

    calls = []

    def interrupt_after_first(module, args, output):
        calls.append(1)
        mm.interrupt_current_processing(True)

    handle = loaded.model.model.register_forward_hook(interrupt_after_first)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            sample(nodes, loaded, lr_latent, steps=10, chunk_length=1)
    finally:
        handle.remove()
        mm.interrupt_current_processing(False)
    assert len(calls) == 1


def test_fp16_and_fp8_weights_keep_shapes(nodes, loaded, lr_latent):
    quick = dict(cfg=1.0)
    reference = sample(nodes, loaded, lr_latent, **quick)[0]["samples"]
    for dtype in ("fp16", "fp8_e4m3fn"):
        (model,) = harness.run(nodes["STARModelLoader"], ckpt_name="star_tiny.safetensors", weight_dtype=dtype)
        weights = {p.dtype for p in model.model.parameters()}
        assert (torch.float16 if dtype == "fp16" else torch.float8_e4m3fn) in weights
        out = sample(nodes, SimpleNamespace(**(vars(loaded) | {"model": model})), lr_latent, **quick)[0]["samples"]
        assert out.shape == reference.shape and torch.isfinite(out).all()
        # lower-precision weights, same model: close to the fp32 result, not equal
        assert 0 < (out - reference).abs().max() < 0.5 * reference.abs().max()


@pytest.mark.parametrize("inputs, message", [
    (dict(images=None), "connect images"),
    (dict(target_width=64), "set both target_width and target_height"),
])
def test_lr_encode_errors(nodes, loaded, lr_frames, inputs, message):
    merged = dict(images=lr_frames) | inputs
    with pytest.raises(ValueError, match=message):
        encode(nodes, loaded.vae, **merged)


def test_missing_model_file_validation_lists_what_is_available(nodes, models):
    assert nodes["STARModelLoader"].validate_inputs(ckpt_name="star_tiny.safetensors") is True
    message = nodes["STARModelLoader"].validate_inputs(ckpt_name="light_deg.pt")
    assert message == (f"ckpt_name: 'light_deg.pt' not found in {models / 'STAR'}. "
                       "Available: 'star_tiny.safetensors'.")
    message = nodes["STARVAELoader"].validate_inputs(vae_name="svd.safetensors")
    assert message.endswith("Available: 'svd_vae_tiny.safetensors'.")


def test_node_errors_name_the_input_and_fix(nodes, loaded, lr_frames, lr_latent):
    with pytest.raises(ValueError, match="no STAR geometry; make it with STAR LR Encode"):
        sample(nodes, loaded, {"samples": torch.zeros(1, 4, 3, 10, 8)})
    with pytest.raises(ValueError, match="clip is empty"):
        harness.run(nodes["STARTextEncode"], clip=None, prompt="x", suffix="official", negative_prompt="")
    with pytest.raises(ValueError, match="positive: expected CONDITIONING"):
        sample(nodes, loaded, lr_latent, positive=[])
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        harness.run(nodes["STARModelLoader"], ckpt_name="missing.safetensors", weight_dtype="auto")
    image_vae = FakeCoreVAE({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)})
    with pytest.raises(ValueError, match="not the SVD temporal-decoder VAE"):
        encode(nodes, image_vae, images=lr_frames)
    with pytest.raises(ValueError, match="temporal_overlap"):
        harness.run(nodes["STARTiledVAEDecode"], samples=lr_latent,
                    vae=loaded.vae, tile=0, tile_overlap=64, temporal_window=2, temporal_overlap=2)
