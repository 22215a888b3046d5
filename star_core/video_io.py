"""Video files in and out through PyAV (no ffmpeg binary needed), in windows of frames.

Reading yields uint8 RGB windows ``[T,H,W,3]`` so a caller never holds the whole clip. Writing encodes windows
as they come, remuxes the input's audio packets alongside (re-encoding to AAC only when the output container
cannot hold the original codec) and writes to a temporary file that is renamed into place on success, so a
failed run leaves no half-written output.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import torch

from .frames import SourceInfo, to_uint8

# file extensions treated as videos when a folder is scanned
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".gif")
# name -> (encoder, options, pixel format for even sizes, pixel format for odd sizes)
CODECS: dict[str, tuple[str, dict[str, str], str, str]] = {
    "h264": ("libx264", {"preset": "slow"}, "yuv420p", "yuv444p"),
    "h264-lossless": ("libx264rgb", {"preset": "medium", "crf": "0"}, "rgb24", "rgb24"),
    "h265": ("libx265", {"preset": "medium", "x265-params": "log-level=error"}, "yuv420p", "yuv444p"),
    "ffv1": ("ffv1", {}, "bgr0", "bgr0"),
}
DEFAULT_CRF = {"h264": 16, "h265": 20}
NAMED_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}
# MP4 muxing accepts more codecs on paper than players (and its own trailer writer) handle; copy only these.
MP4_AUDIO_COPY = {"aac", "mp3", "ac3", "eac3", "opus", "flac", "alac"}


@dataclass(frozen=True)
class VideoInfo:
    """What a video file holds.

    Parameters:
        path: the file.
        width, height: frame size in pixels.
        fps: average frame rate (exact fraction).
        frame_count: number of video frames (counted from the packets when the header does not say).
        has_audio: whether the file has an audio stream (it is copied to the output).
    """

    path: Path
    width: int
    height: int
    fps: Fraction
    frame_count: int
    has_audio: bool


def _open_input(path: Path) -> av.container.InputContainer:
    if not path.is_file():
        raise FileNotFoundError(f"input video {path} does not exist: check the path")
    try:
        return av.open(str(path))
    except av.error.FFmpegError as exc:
        raise ValueError(f"cannot read {path} as a video ({exc}): pass a video file such as .mp4/.mkv/.mov") from exc


def probe_video(path: str | Path) -> VideoInfo:
    """Read the size, frame rate, frame count and audio presence of a video file.

    Parameters:
        path: the video file.

    Returns:
        A `VideoInfo`. Raises FileNotFoundError for a missing file and ValueError for a file that is not a
        readable video or that holds no video frames.
    """
    path = Path(path)
    with _open_input(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path} holds no video frames (no video stream): pass a video with at least one frame")
        stream = container.streams.video[0]
        fps = stream.average_rate or stream.guessed_rate or Fraction(25)
        has_audio = bool(container.streams.audio)
        width, height = stream.codec_context.width, stream.codec_context.height
        frame_count = stream.frames
        if frame_count <= 0:
            try:
                frame_count = sum(1 for packet in container.demux(stream) if packet.size > 0)
            except av.error.FFmpegError as exc:
                raise ValueError(f"cannot read the frames of {path} ({exc}): the file looks damaged") from exc
    if frame_count <= 0 or width <= 0 or height <= 0:
        raise ValueError(f"{path} holds no video frames (0 frames): pass a video with at least one frame")
    return VideoInfo(path, width, height, Fraction(fps), frame_count, has_audio)


def read_frames(path: str | Path, window: int) -> Iterator[np.ndarray]:
    """Decode a video as uint8 RGB windows ``[T,H,W,3]`` of ``window`` frames (the last may be shorter).

    Parameters:
        path: the video file.
        window: frames per yielded array (>= 1); memory held is one window plus the decoder's own buffers.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1 frame, got {window}")
    path = Path(path)
    with _open_input(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path} holds no video frames (no video stream): pass a video with at least one frame")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        batch: list[np.ndarray] = []
        try:
            for frame in container.decode(stream):
                batch.append(frame.to_ndarray(format="rgb24"))
                if len(batch) == window:
                    yield np.stack(batch)
                    batch = []
        except av.error.FFmpegError as exc:
            raise ValueError(f"cannot decode {path} ({exc}): the file looks damaged") from exc
        if batch:
            yield np.stack(batch)


class VideoWriter:
    """Encode uint8 RGB windows into a video file, copying the audio of another file alongside.

    Use as a context manager: on a clean exit the file is finalised and moved to ``path``; on an exception the
    temporary file is deleted and ``path`` is left untouched.

    Parameters:
        path: output file; the container follows its extension (.mp4, .mkv, .mov, ...).
        width, height: frame size.
        fps: frame rate (kept exactly as a fraction).
        codec: one of `CODECS`: "h264" (default, visually lossless CRF 16), "h264-lossless" (exact RGB, libx264rgb),
            "h265", "ffv1" (lossless; .mkv plays it most widely).
        crf: quality for h264/h265 (lower is better; None = codec default in `DEFAULT_CRF`).
        audio_from: a file whose first audio stream is remuxed (re-encoded to AAC only if the container
            cannot hold its codec), or None for no audio.
        metadata: container tags (key → text), e.g. ComfyUI's prompt and workflow; MP4/MOV keep custom keys.
    """

    def __init__(self, path: str | Path, width: int, height: int, fps: Fraction | float, *, codec: str = "h264",
                 crf: int | None = None, audio_from: str | Path | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r}: choose one of {', '.join(CODECS)}")
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix}")
        self.width, self.height, self.frames_written = width, height, 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        custom_tags = {"movflags": "use_metadata_tags"} if metadata and self.path.suffix.lower() in (".mp4", ".mov") \
            else {}
        self._out = av.open(str(self._tmp), "w", options=custom_tags)
        try:
            for key, value in (metadata or {}).items():
                self._out.metadata[key] = value
            self._video = self._add_video_stream(codec, crf, Fraction(fps).limit_denominator(1_000_000))
            self._audio_in, self._audio_packets, self._audio_out, self._audio_encoder = None, None, None, None
            if audio_from is not None:
                self._add_audio(Path(audio_from))
        except BaseException:
            self.abort()
            raise

    def _add_video_stream(self, codec: str, crf: int | None, fps: Fraction) -> av.video.stream.VideoStream:
        encoder, options, pix_even, pix_odd = CODECS[codec]
        if encoder not in self._out.supported_codecs:
            raise ValueError(f"codec {codec!r} cannot be stored in a {self.path.suffix} file: use .mkv or another "
                             "codec")
        stream = self._out.add_stream(encoder, rate=fps)
        stream.width, stream.height = self.width, self.height
        stream.pix_fmt = pix_even if self.width % 2 == 0 and self.height % 2 == 0 else pix_odd
        options = dict(options)
        if codec in DEFAULT_CRF:
            options["crf"] = str(DEFAULT_CRF[codec] if crf is None else crf)
        stream.options = options
        stream.time_base = 1 / fps
        return stream

    def _add_audio(self, source: Path) -> None:
        container = av.open(str(source))
        if not container.streams.audio:
            container.close()
            return
        self._audio_in = container
        in_stream = container.streams.audio[0]
        name = in_stream.codec_context.name
        copyable = name in MP4_AUDIO_COPY if self.path.suffix.lower() in (".mp4", ".m4v", ".mov") \
            else name in self._out.supported_codecs
        if copyable:
            self._audio_out = self._out.add_stream_from_template(in_stream)
        else:  # e.g. PCM in .mp4: the container cannot hold it, so encode AAC
            in_stream.codec_context.thread_type = "AUTO"
            self._audio_out = self._out.add_stream("aac", rate=in_stream.codec_context.sample_rate)
            # AAC needs a named channel order; an unnamed "N channels" layout gets the standard one for N
            self._audio_out.layout = NAMED_LAYOUTS.get(in_stream.codec_context.channels, "stereo")
            self._audio_out.format = "fltp"
            self._audio_encoder = in_stream
        self._audio_packets = container.demux(in_stream)

    def _mux_audio_until(self, seconds: float | None) -> None:
        """Copy audio packets whose time is before ``seconds`` (all remaining when None), keeping interleaving."""
        if self._audio_packets is None:
            return
        for packet in self._audio_packets:
            if packet.dts is None:
                continue
            if self._audio_encoder is not None:
                for frame in packet.decode():
                    self._out.mux(self._audio_out.encode(frame))
            else:
                packet.stream = self._audio_out
                self._out.mux(packet)
            if seconds is not None and packet.time_base is not None and packet.pts is not None \
                    and float(packet.pts * packet.time_base) >= seconds:
                return
        self._audio_packets = None

    def write(self, frames: np.ndarray) -> None:
        """Encode a window of uint8 RGB frames ``[T,H,W,3]`` of the writer's size."""
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"frames must be uint8 [T,{self.height},{self.width},3], got {frames.dtype} "
                             f"{list(frames.shape)}")
        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = self.frames_written
            self.frames_written += 1
            self._out.mux(self._video.encode(frame))
        self._mux_audio_until(float(self.frames_written * self._video.time_base))

    def close(self) -> None:
        """Flush the encoders, finish the file and move it to its final name."""
        self._out.mux(self._video.encode(None))
        self._mux_audio_until(None)
        if self._audio_encoder is not None:
            self._out.mux(self._audio_out.encode(None))
        self._out.close()
        if self._audio_in is not None:
            self._audio_in.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Close everything and delete the temporary file (``path`` is left untouched)."""
        for container in (self._out, getattr(self, "_audio_in", None)):
            if container is not None:
                try:
                    container.close()
                except av.error.FFmpegError:
                    pass  # the file is deleted below anyway
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:
            self.abort()
            raise


def write_synthetic_clip(path: str | Path, *, frames: int, width: int, height: int, fps: int = 24,
                         audio: bool = True, codec: str = "h264") -> Path:
    """Write a short generated clip (moving colour gradients, optionally a 440 Hz AAC tone) for demos and tests.

    Parameters:
        path: output file.
        frames: number of frames (>= 0; 0 writes a file with an empty video stream).
        width, height: frame size.
        fps: frame rate.
        audio: add a stereo AAC tone as long as the video.
        codec: video codec name from `CODECS`.
    """
    path = Path(path)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    with av.open(str(path), "w") as out:
        encoder, options, pix_even, pix_odd = CODECS[codec]
        video = out.add_stream(encoder, rate=fps)
        video.width, video.height = width, height
        video.pix_fmt = pix_even if width % 2 == 0 and height % 2 == 0 else pix_odd
        video.options = dict(options)
        tone = out.add_stream("aac", rate=48000, layout="stereo") if audio else None
        out.start_encoding()  # writes the header even when no frame follows (a valid 0-frame file)
        for i in range(frames):
            phase = 2 * np.pi * i / max(frames, 1)
            image = np.stack([np.sin(x / 7 + phase), np.cos(y / 5 - phase), np.sin((x + y) / 11 + 2 * phase)], -1)
            frame = av.VideoFrame.from_ndarray(((image * 0.45 + 0.5) * 255).astype(np.uint8), format="rgb24")
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        if tone is not None:
            samples = int(48000 * frames / fps)
            t = np.arange(samples, dtype=np.float32) / 48000
            wave = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            chunk = 1024
            for start in range(0, samples, chunk):
                piece = np.stack([wave[start:start + chunk]] * 2)
                frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout="stereo")
                frame.sample_rate, frame.pts = 48000, start
                out.mux(tone.encode(frame))
            out.mux(tone.encode(None))
    return path


class FileSource:
    """
    A video file as a re-readable :class:`star_core.frames.FrameSource` (decoded window by window with PyAV).

    Parameters:
        path: the video file (probed at once: a missing or unreadable file raises here).
    """

    def __init__(self, path: str | Path) -> None:
        self.video = probe_video(path)
        self.info = SourceInfo(self.video.frame_count, self.video.height, self.video.width, self.video.fps,
                               self.video.path.name)

    def windows(self, size: int) -> Iterator[torch.Tensor]:
        for window in read_frames(self.video.path, size):
            yield torch.from_numpy(window).to(torch.float32).div_(255)


class VideoFileSink:
    """
    A :class:`star_core.frames.FrameSink` that encodes the frames into a video file with `VideoWriter` (official
    uint8 truncation, audio remuxed, written atomically: an aborted run leaves no file).

    Parameters:
        path: output file.
        codec, crf, metadata: see `VideoWriter`.
        audio_from: a file whose audio is copied alongside, or None.
    """

    def __init__(self, path: str | Path, *, codec: str = "h264", crf: int | None = None,
                 audio_from: str | Path | None = None, metadata: dict[str, str] | None = None) -> None:
        self.path, self.codec, self.crf, self.audio_from = Path(path), codec, crf, audio_from
        self.metadata = metadata
        self._writer: VideoWriter | None = None

    def begin(self, geometry, fps) -> None:
        height, width = geometry.target_size
        self._writer = VideoWriter(self.path, width, height, fps or 24, codec=self.codec, crf=self.crf,
                                   audio_from=self.audio_from, metadata=self.metadata)

    def write(self, frames) -> None:
        assert self._writer is not None, "begin() first"
        self._writer.write(to_uint8(frames).cpu().numpy())

    def finish(self) -> None:
        assert self._writer is not None, "begin() first"
        writer, self._writer = self._writer, None
        try:
            writer.close()
        except BaseException:
            writer.abort()
            raise

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
