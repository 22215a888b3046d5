"""Runs the streaming node path (STAR Encode Video → STAR Sampler → STAR Decode Video → save_to, as Save Video
calls it) on the host stub in this process and prints its peak RSS: ``python stream_run.py MODELS CLIP OUT``.
Used by the streaming test in a fresh process per clip length."""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

STUB = Path(__file__).resolve().parent
sys.path[:0] = [str(STUB.parents[1]), str(STUB)]

import torch  # noqa: E402

import harness  # noqa: E402


def run_node_path(nodes, models: dict, clip: str, out: str, *, scale: float = 2.0, seed: int = 666) -> object:
    """The core streaming workflow's STAR part on `clip`; returns the VIDEO after saving it to `out`."""
    from comfy_api.input_impl import VideoFromFile

    (lr,) = harness.run(nodes["STARVideoEncode"], vae=models["vae"], video=VideoFromFile(clip), scale=scale,
                        target_width=0, target_height=0, padding="minimal", posterior="sample", seed=seed, tile=0,
                        tile_overlap=64)
    (latent,) = harness.run(nodes["STARSampler"], star_model=models["model"], positive=models["positive"],
                            negative=models["negative"], lr_latent=lr, solver_mode="normal", steps=2, cfg=7.5,
                            rescale=0.2, denoise=1.0, chunk_length=8, chunk_overlap=-1, fusion="linear")
    (video,) = harness.run(nodes["STARVideoDecode"], samples=latent, vae=models["vae"], tile=0, tile_overlap=64,
                           temporal_window=3, temporal_overlap=0, method="adain", strength=1.0)
    video.save_to(out, format="auto", codec="auto", metadata={"prompt": {"run": "test"}})
    return video


def load_models(nodes) -> dict:
    """The tiny STAR model and VAE, and a text context that depends on nothing but a seed."""
    (model,) = harness.run(nodes["STARModelLoader"], ckpt_name="star_tiny.safetensors", weight_dtype="auto")
    (vae,) = harness.run(nodes["STARVAELoader"], vae_name="svd_vae_tiny.safetensors")
    g = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 77, 1024, generator=g), {}]]
    negative = [[torch.randn(1, 77, 1024, generator=g), {}]]
    return {"model": model, "vae": vae, "positive": positive, "negative": negative}


if __name__ == "__main__":
    torch.set_num_threads(1)
    models_dir, clip, out = sys.argv[1:4]
    nodes = harness.node_classes(harness.load_pack(Path(models_dir)))
    run_node_path(nodes, load_models(nodes), clip, out)
    print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
