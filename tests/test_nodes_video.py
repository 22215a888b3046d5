"""The streaming VIDEO path of the nodes on the host stub: the same frames as pipeline.run on the same file,
the input read window by window, the output decoded window by window inside save_to, previews, errors, and peak
memory that does not grow with the clip's length."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "comfy_stub"))
import harness  # noqa: E402
import stream_run  # noqa: E402

from star_core.tiny_models import write_tree  # noqa: E402
from star_core.video_io import write_synthetic_clip  # noqa: E402

FRAMES, WIDTH, HEIGHT = 7, 32, 24  # x2 → 64x48 output


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_tree(root, ["star", "vae_tiny"])
    return root


@pytest.fixture(scope="module")
def nodes(models_dir) -> dict:
    return harness.node_classes(harness.load_pack(models_dir))


@pytest.fixture(scope="module")
def models(nodes) -> dict:
    return stream_run.load_models(nodes)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    return str(write_synthetic_clip(tmp_path_factory.mktemp("clip") / "in.mp4", frames=FRAMES, width=WIDTH,
                                    height=HEIGHT, fps=24))


def decoded_frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_node_path_gives_the_frames_of_pipeline_run(nodes, models, clip, tmp_path, monkeypatch):
    from comfy_api import input_impl

    from star_core import pipeline
    from star_core.spec import DEFAULTS
    from star_core.video_io import FileSource, VideoFileSink

    writes = []
    original_write = VideoFileSink.write
    monkeypatch.setattr(VideoFileSink, "write", lambda self, frames: (writes.append(frames.shape[0]),
                                                                      original_write(self, frames)))
    input_impl.decoded.clear()
    video = stream_run.run_node_path(nodes, models, clip, str(tmp_path / "node.mp4"))
    # streamed: the input file was never decoded whole, the output left in decoder windows (3 frames)
    assert input_impl.decoded == []
    assert max(writes) <= 3 and sum(writes) == FRAMES
    spec = DEFAULTS.with_options({"output.scale": 2.0, "output.padding": "minimal", "seed": 666,
                                  "sampler.mode": "normal", "sampler.steps": 2, "sampler.chunk_len": 8,
                                  "sampler.fusion": "linear"})
    vae = models["vae"]
    components = pipeline.Components(models["model"].model, vae, models["positive"][0][0],
                                     models["negative"][0][0])
    pipeline.run(FileSource(clip), VideoFileSink(tmp_path / "run.mp4", audio_from=clip), spec, components)
    assert np.array_equal(decoded_frames(tmp_path / "node.mp4"), decoded_frames(tmp_path / "run.mp4"))
    assert decoded_frames(tmp_path / "node.mp4").shape == (FRAMES, 2 * HEIGHT, 2 * WIDTH, 3)
    # what Save Video asks before saving costs no decode; the file keeps the input's audio, fps and the metadata
    assert video.get_dimensions() == (2 * WIDTH, 2 * HEIGHT) and video.get_frame_count() == FRAMES
    with av.open(str(tmp_path / "node.mp4")) as container:
        assert container.streams.audio and container.streams.video[0].average_rate == 24
        assert json.loads(container.metadata["prompt"]) == {"run": "test"}


def test_upscale_node_is_the_whole_run(nodes, models, clip, tmp_path):
    from comfy_api.input_impl import VideoFromFile
    from test_nodes import FakeClip

    from star_core import pipeline
    from star_core.frames import TensorSink
    from star_core.spec import DEFAULTS, default
    from star_core.video_io import FileSource

    fake_clip = FakeClip()
    (video,) = harness.run(nodes["STARUpscale"], star_model=models["model"], vae=models["vae"], clip=fake_clip,
                           video=VideoFromFile(clip), prompt="a cat", scale=2.0, padding="minimal", seed=5,
                           vae_tile=0)
    node_sink = TensorSink()
    video.write_to(node_sink)
    positive, negative = harness.run(nodes["STARTextEncode"], clip=fake_clip, prompt="a cat", suffix="official",
                                     negative_prompt=default("prompt.negative_prompt"))
    spec = DEFAULTS.with_options({"output.scale": 2.0, "output.padding": "minimal", "seed": 5})
    run_sink = TensorSink()
    pipeline.run(FileSource(clip), run_sink, spec,
                 pipeline.Components(models["model"].model, models["vae"], positive[0][0], negative[0][0]))
    assert torch.equal(node_sink.frames, run_sink.frames)


def test_frames_on_request_previews_and_errors(nodes, models, clip, tmp_path, caplog):
    import comfy.utils
    import latent_preview
    from comfy_api.input_impl import VideoFromComponents, VideoFromFile

    comfy.utils.previews.clear()
    latent_preview.shown.clear()
    video = stream_run.run_node_path(nodes, models, clip, str(tmp_path / "out.mp4"))
    # the sampler's x0 after every solver step becomes the progress bar's preview (first frame, [1,4,h,w])
    assert len(comfy.utils.previews) == 2 and comfy.utils.previews[0][0] == "JPEG"
    latent_h, latent_w = video.geometry.latent_size
    assert [tuple(x.shape) for x in latent_preview.shown] == [(1, 4, latent_h, latent_w)] * 2
    components = video.get_components()
    assert components.images.shape == (FRAMES, 2 * HEIGHT, 2 * WIDTH, 3)
    assert "decoding all 7 frames of 64x48 into memory" in caplog.text
    trimmed = video.as_trimmed(0.0, 2 / 24)
    assert trimmed.get_components().images.shape[0] == 2
    # previews off (--preview-method none): no preview, same run
    latent_preview.enabled = False
    try:
        comfy.utils.previews.clear()
        stream_run.run_node_path(nodes, models, clip, str(tmp_path / "quiet.mp4"))
        assert comfy.utils.previews == []
    finally:
        latent_preview.enabled = True
    with pytest.raises(ValueError, match="does not remember its video; make it with STAR Encode Video"):
        harness.run(nodes["STARVideoDecode"], samples={"samples": torch.zeros(1, 4, 1, 8, 8),
                                                       "star_geometry": video.geometry.to_dict()},
                    vae=models["vae"], tile=0, tile_overlap=64, temporal_window=3, temporal_overlap=0,
                    method="adain", strength=1.0)
    with pytest.raises(ValueError, match="video: expected a VIDEO"):
        harness.run(nodes["STARVideoEncode"], vae=models["vae"], video=torch.zeros(1, 8, 8, 3), scale=2.0,
                    target_width=0, target_height=0, padding="minimal", posterior="sample", seed=1, tile=0,
                    tile_overlap=64)
    with pytest.raises(ValueError, match="save as format auto/mp4/mkv with codec auto/h264"):
        video.save_to(str(tmp_path / "x.webm"), format="webm", codec="av1")
    # a VIDEO made from frames (Create Video) is read from those frames
    frames = VideoFromFile(clip).get_components()
    (lr,) = harness.run(nodes["STARVideoEncode"], vae=models["vae"], video=VideoFromComponents(frames), scale=2.0,
                        target_width=0, target_height=0, padding="minimal", posterior="sample", seed=1, tile=0,
                        tile_overlap=64)
    assert lr["samples"].shape[2] == FRAMES and lr["star_source"][1] is None


def test_cli_pipeline_run_and_node_path_give_identical_frames(tmp_path):
    """One seed, one clip, the same model files: the command line, pipeline.run on a file source and the
    ComfyUI node path (host stub, contexts from the CLI's own text encoder) write the same frames."""
    from star_core import cli, pipeline
    from star_core.text.vocab import fetch_openclip_vocab
    from star_core.video_io import FileSource, VideoFileSink

    models = tmp_path / "models"
    cli.write_demo_models(models)
    clip = write_synthetic_clip(tmp_path / "in.mp4", frames=5, width=WIDTH, height=HEIGHT, fps=24)
    options = ["upscale", str(clip), "-o", str(tmp_path / "cli.mp4"), "--quiet", "--offline", "--comfy-models",
               str(models), "--model", str(models / "STAR" / "star_tiny.safetensors"), "--tokenizer",
               str(fetch_openclip_vocab()), "--scale", "2", "--padding", "minimal", "--solver-mode", "normal",
               "--steps", "2", "--chunk-len", "8", "--seed", "666", "--threads", "1"]
    assert cli.main(options) == 0
    args = cli.build_parser().parse_args(options)
    spec = cli.spec_from_args(args)
    components = cli.load_components(args, spec, torch.device("cpu"))
    pipeline.run(FileSource(str(clip)), VideoFileSink(tmp_path / "run.mp4", audio_from=clip), spec, components)
    nodes = harness.node_classes(harness.load_pack(models))
    node_models = stream_run.load_models(nodes) | {"positive": [[components.positive, {}]],
                                                    "negative": [[components.negative, {}]]}
    stream_run.run_node_path(nodes, node_models, str(clip), str(tmp_path / "node.mp4"))
    cli_frames = decoded_frames(tmp_path / "cli.mp4")
    assert cli_frames.shape == (5, 2 * HEIGHT, 2 * WIDTH, 3)
    assert np.array_equal(decoded_frames(tmp_path / "run.mp4"), cli_frames)
    assert np.array_equal(decoded_frames(tmp_path / "node.mp4"), cli_frames)


def _peak_rss(models_dir: Path, clip: Path, out: Path) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "comfy_stub" / "stream_run.py"),
                           str(models_dir), str(clip), str(out)], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).parents[1], timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_bytes"]


def test_node_path_memory_does_not_grow_with_length(models_dir, tmp_path):
    """Peak RSS of the whole node path (fresh process each) for a 16- and a 128-frame clip: within 20 %."""
    peaks = {}
    for frames in (16, 128):
        clip = write_synthetic_clip(tmp_path / f"in{frames}.mp4", frames=frames, width=64, height=48, fps=24)
        peaks[frames] = _peak_rss(models_dir, clip, tmp_path / f"out{frames}.mp4")
        assert decoded_frames(tmp_path / f"out{frames}.mp4").shape == (frames, 96, 128, 3)
    assert peaks[128] < 1.2 * peaks[16], peaks
