"""PyAV video IO: windows, exact frame count / fps / size, audio remux, lossless codecs, atomic writes."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from star_core.video_io import VideoWriter, probe_video, read_frames, write_synthetic_clip


def _audio(path: Path) -> tuple[str, int]:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        return stream.codec_context.name, sum(1 for packet in container.demux(stream) if packet.size)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_synthetic_clip(tmp_path_factory.mktemp("clip") / "in.mp4", frames=11, width=40, height=24, fps=30)


def test_probe_and_windows(clip: Path) -> None:
    info = probe_video(clip)
    assert (info.width, info.height, info.fps, info.frame_count, info.has_audio) == (40, 24, Fraction(30), 11, True)
    windows = list(read_frames(clip, 4))
    assert [w.shape for w in windows] == [(4, 24, 40, 3), (4, 24, 40, 3), (3, 24, 40, 3)]
    assert all(w.dtype == np.uint8 for w in windows)


@pytest.mark.parametrize(("name", "codec"), [("out.mkv", "ffv1"), ("out.mp4", "h264-lossless")])
def test_lossless_round_trip_keeps_every_pixel_and_the_audio_packets(clip: Path, tmp_path: Path, name: str,
                                                                     codec: str) -> None:
    frames = np.concatenate(list(read_frames(clip, 5)))
    with VideoWriter(tmp_path / name, 40, 24, Fraction(30), codec=codec, audio_from=clip) as writer:
        for start in range(0, len(frames), 3):
            writer.write(frames[start:start + 3])
    back = np.concatenate(list(read_frames(tmp_path / name, 5)))
    assert np.array_equal(back, frames)
    info = probe_video(tmp_path / name)
    assert (info.frame_count, info.fps, info.has_audio) == (11, Fraction(30), True)
    assert _audio(tmp_path / name) == _audio(clip)  # remuxed: same codec, same packet count


def test_default_h264_is_high_quality_and_odd_sizes_work(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (1, 7, 9, 3)).repeat(8, 1).repeat(8, 2)[:, :53, :71]
    frames = np.repeat(base, 4, 0).astype(np.uint8)
    with VideoWriter(tmp_path / "odd.mp4", 71, 53, 24) as writer:
        writer.write(frames)
    back = np.concatenate(list(read_frames(tmp_path / "odd.mp4", 8)))
    assert back.shape == (4, 53, 71, 3)
    assert np.abs(back.astype(float) - frames).mean() < 4.0


def test_pcm_audio_is_reencoded_for_mp4_and_copied_for_mkv(tmp_path: Path) -> None:
    source = tmp_path / "pcm.mkv"
    with av.open(str(source), "w") as out:
        video = out.add_stream("libx264", rate=24)
        video.width, video.height, video.pix_fmt = 16, 16, "yuv420p"
        audio = out.add_stream("pcm_s16le", rate=48000, layout="stereo")
        for _ in range(3):
            out.mux(video.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")))
        out.mux(video.encode(None))
        for start in range(0, 6000, 1000):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 2000), np.int16), format="s16", layout="stereo")
            frame.sample_rate, frame.pts = 48000, start
            out.mux(audio.encode(frame))
    frames = np.concatenate(list(read_frames(source, 8)))
    for name, codec in (("a.mp4", "aac"), ("a.mkv", "pcm_s16le")):
        with VideoWriter(tmp_path / name, 16, 16, 24, audio_from=source) as writer:
            writer.write(frames)
        assert _audio(tmp_path / name)[0] == codec
        assert probe_video(tmp_path / name).frame_count == 3


def test_failed_write_leaves_no_file(clip: Path, tmp_path: Path) -> None:
    target = tmp_path / "never.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(target, 40, 24, 30, audio_from=clip) as writer:
            writer.write(np.zeros((2, 24, 40, 3), np.uint8))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"frames must be uint8 \[T,24,40,3\]"):
        with VideoWriter(target, 40, 24, 30) as writer:
            writer.write(np.zeros((2, 24, 41, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_give_clear_errors(tmp_path: Path) -> None:
    empty = write_synthetic_clip(tmp_path / "empty.mp4", frames=0, width=16, height=16, audio=False)
    with pytest.raises(ValueError, match="no video frames"):
        probe_video(empty)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video" * 50)
    with pytest.raises(ValueError, match="cannot read .*garbage.mp4 as a video"):
        probe_video(garbage)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        probe_video(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match="unknown codec 'vp7'"):
        VideoWriter(tmp_path / "x.mp4", 16, 16, 24, codec="vp7")
    with pytest.raises(ValueError, match="use .mkv"):
        VideoWriter(tmp_path / "x.webm", 16, 16, 24, codec="h264")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.mp4", "garbage.mp4"]
