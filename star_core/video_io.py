"""Video files in and out through PyAV (no ffmpeg binary needed), in windows of frames.

Reading yields uint8 RGB windows ``[T,H,W,3]`` so a caller never holds the whole clip. Writing encodes windows
as they come, remuxes the input's audio packets alongside (re-encoding to AAC only when the output container
cannot hold the original codec) and writes to a temporary file that is renamed into place on success, so a
failed run leaves no half-written output.
"""
from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import av
import numpy as np
import torch
from av.sidedata.sidedata import Type as SideDataType

from .frames import SourceInfo, to_uint8
from .host import LOG

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
# CRF range of the lossy codecs (x264/x265 8-bit); the lossless ones take no CRF.
CRF_RANGE = {"h264": (0, 51), "h265": (0, 51)}
# x265 works in 64-pixel coding tree units: smaller frames are refused, or (some sizes) corrupt its memory.
H265_MIN_SIDE = 64
# Codecs that keep an odd size only by storing full-resolution chroma (4:4:4), which many players cannot play.
YUV_CODECS = ("h264", "h265")


@dataclass(frozen=True)
class FrameTimes:
    """
    Presentation times of a video's frames, from the first frame: ``pts[i] * time_base`` seconds.

    Parameters:
        pts (`tuple[int, ...]`): strictly increasing integer times, ``pts[0] == 0``.
        time_base (`Fraction`): seconds per unit of ``pts``.
    """

    pts: tuple[int, ...]
    time_base: Fraction

    def is_constant(self, fps: Fraction) -> bool:
        """Whether every frame is within half a frame period of the constant-rate grid ``i / fps``."""
        tolerance = 1 / (2 * Fraction(fps))
        return all(abs(t * self.time_base - Fraction(i) / fps) <= tolerance for i, t in enumerate(self.pts))


@dataclass(frozen=True)
class VideoInfo:
    """What a video file holds.

    Parameters:
        path: the file.
        width, height: frame size in pixels, as stored (before any rotation a player applies).
        fps: average frame rate (exact fraction).
        frame_count: number of video frames present (counted from the packets when the header does not say, or
            when the file ends before the header's count).
        has_audio: whether the file has an audio stream (it is copied to the output).
        truncation: how the file falls short of what its header promises (frames or duration), None when whole.
        display_matrix: the container's display matrix (9 integers, FFmpeg's layout) when it asks players to
            rotate or flip the picture, else None.
        rotation: counter-clockwise rotation in degrees a player applies (0 without a display matrix).
        pixel_format: the decoder's pixel format (e.g. ``yuv420p10le``); frames are always read as 8-bit RGB.
        time_base: seconds per unit of the video stream's timestamps.
        alpha: the video has an alpha channel (in its pixel format, or VP8/VP9's separate alpha plane).
    """

    path: Path
    width: int
    height: int
    fps: Fraction
    frame_count: int
    has_audio: bool
    truncation: str | None = None
    display_matrix: tuple[int, ...] | None = None
    rotation: float = 0.0
    pixel_format: str | None = None
    time_base: Fraction | None = None
    alpha: bool = False

    def notes(self) -> list[str]:
        """One line per thing the upscale changes or cannot keep about this input (for the user's log)."""
        notes = []
        if self.truncation is not None:
            notes.append(f"the file is truncated ({self.truncation}): upscaling the {self.frame_count} frames "
                         "that decode")
        fmt = _pixel_format(self.pixel_format)
        if self.alpha or (fmt is not None and any(c.is_alpha for c in fmt.components)):
            notes.append("its alpha channel is dropped: STAR upscales RGB and the output has no alpha")
        if fmt is not None and max(c.bits for c in fmt.components) > 8:
            notes.append(f"{self.pixel_format} is read as 8-bit RGB (the model and the output are 8-bit)")
        return notes


def _pixel_format(name: str | None) -> av.VideoFormat | None:
    try:
        return av.VideoFormat(name) if name else None
    except (ValueError, av.error.FFmpegError):
        return None


def _open_input(path: Path) -> av.container.InputContainer:
    if not path.is_file():
        raise FileNotFoundError(f"input video {path} does not exist: check the path")
    try:
        return av.open(str(path))
    except av.error.FFmpegError as exc:
        raise ValueError(f"cannot read {path} as a video ({exc}): it is not a video, or it is damaged or incomplete "
                         "(e.g. an interrupted download or recording); pass a video file such as .mp4/.mkv/.mov"
                         ) from exc


def _video_stream(container: av.container.InputContainer, path: Path) -> av.video.stream.VideoStream:
    if not container.streams.video:
        if container.streams.audio:
            raise ValueError(f"{path} has no video stream (audio only): pass a video with at least one frame")
        raise ValueError(f"{path} holds no video frames (no video stream): pass a video with at least one frame")
    return container.streams.video[0]


def _stated_duration(stream: av.video.stream.VideoStream) -> Fraction | None:
    """The video stream's duration as its header states it (MP4: the track, Matroska: the DURATION tag)."""
    if stream.duration and stream.time_base:
        return stream.duration * stream.time_base
    tag = stream.metadata.get("DURATION") or stream.metadata.get("duration")
    try:
        hours, minutes, seconds = tag.split(":")
        return Fraction(int(hours) * 3600 + int(minutes) * 60) + Fraction(seconds)
    except (AttributeError, ValueError):
        return None


def _count_packets(container: av.container.InputContainer, stream) -> tuple[int, Fraction | None]:
    """Video packets up to the end of the file (or to where a damaged file stops demuxing), and the time their
    last frame ends, in seconds (None when the packets carry no timestamps)."""
    count, end = 0, None
    try:
        for packet in container.demux(stream):
            if packet.size > 0:
                count += 1
                if packet.pts is not None and packet.time_base is not None:
                    stop = (packet.pts + (packet.duration or 0)) * packet.time_base
                    end = stop if end is None else max(end, stop)
    except av.error.FFmpegError:
        pass  # a truncated/damaged tail: the frames before it are still usable
    return count, end


def _present_frames(container, stream, path: Path, fps: Fraction) -> tuple[int, str | None]:
    """
    Frames present in the file and, when it is cut short, how: the header's count is trusted when its index lies
    wholly inside the file; otherwise the packets are counted, and compared with the header's count or the
    stated duration.
    """
    header = stream.frames
    entries = getattr(stream, "index_entries", None)
    if header > 0 and entries is not None and len(entries) == header:
        size = path.stat().st_size
        if all(entry.pos + entry.size <= size for entry in entries):
            return header, None
    count, end = _count_packets(container, stream)
    stated = _stated_duration(stream)
    if 0 < count < header:
        truncation = f"its header promises {header} frames"
    elif stated is not None and end is not None and end + Fraction(3, 2) / fps < stated:
        truncation = f"it stops at {float(end):.2f} s of its stated {float(stated):.2f} s"
    else:
        return count, None
    # frames whose reference frames were cut off do not decode: count what does (only for a truncated file)
    container.seek(0)
    return _decodable_frames(container, stream), truncation


def _decodable_frames(container: av.container.InputContainer, stream) -> int:
    """Frames that decode, up to the first decoding error."""
    count = 0
    try:
        for _ in container.decode(stream):
            count += 1
    except av.error.FFmpegError:
        pass
    return count


def _first_frame_matrix(container, stream, path: Path) -> tuple[tuple[int, ...] | None, float]:
    """Decodes the first frame: (display matrix, rotation) it carries; raises ValueError when none decodes."""
    try:
        frame = next(container.decode(stream), None)
    except av.error.FFmpegError as exc:
        raise ValueError(f"cannot decode the first frame of {path} ({exc}): the file looks damaged") from exc
    if frame is None:
        raise ValueError(f"{path} holds no video frames (0 frames decode): pass a video with at least one frame")
    side = getattr(frame, "side_data", None)
    data = side.get(SideDataType.DISPLAYMATRIX) if side is not None else None
    if data is None:
        return None, 0.0
    matrix = struct.unpack("=9i", bytes(data))
    if matrix == (1 << 16, 0, 0, 0, 1 << 16, 0, 0, 0, 1 << 30):  # identity: nothing to keep
        return None, 0.0
    return matrix, float(getattr(frame, "rotation", 0) or 0)


def probe_video(path: str | Path) -> VideoInfo:
    """Read the size, frame rate, frame count, audio presence and display rotation of a video file.

    The frame count is what the file really holds: a header count is checked against the file's size (a file cut
    short, e.g. by an interrupted download, keeps the full count in its header), and the first frame is decoded.

    Parameters:
        path: the video file.

    Returns:
        A `VideoInfo`. Raises FileNotFoundError for a missing file and ValueError for a file that is not a
        readable video or that holds no video frames.
    """
    path = Path(path)
    with _open_input(path) as container:
        stream = _video_stream(container, path)
        fps = Fraction(stream.average_rate or stream.guessed_rate or Fraction(25))
        has_audio = bool(container.streams.audio)
        width, height = stream.codec_context.width, stream.codec_context.height
        pixel_format = stream.codec_context.format.name if stream.codec_context.format is not None else None
        time_base = stream.time_base
        alpha = stream.metadata.get("alpha_mode") == "1"  # WebM's VP8/VP9 alpha, decoded separately (not here)
        frame_count, truncation = _present_frames(container, stream, path, fps)
    if frame_count <= 0 or width <= 0 or height <= 0:
        raise ValueError(f"{path} holds no video frames (0 frames): pass a video with at least one frame")
    with _open_input(path) as container:
        matrix, rotation = _first_frame_matrix(container, _video_stream(container, path), path)
    return VideoInfo(path, width, height, fps, frame_count, has_audio, truncation, matrix, rotation, pixel_format,
                     time_base, alpha)


def read_frames(path: str | Path, window: int, limit: int | None = None,
                times: list[int] | None = None) -> Iterator[np.ndarray]:
    """Decode a video as uint8 RGB windows ``[T,H,W,3]`` of ``window`` frames (the last may be shorter).

    Any pixel format is converted to 8-bit RGB (alpha dropped, gray replicated, 10-bit rounded); the pixels are
    the stored ones, before any rotation a player would apply.

    Parameters:
        path: the video file.
        window: frames per yielded array (>= 1); memory held is one window plus the decoder's own buffers.
        limit: stop after this many frames (None: all); a truncated file's damaged tail is never reached.
        times: a list that receives each frame's presentation time (in the stream's time base), when given.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1 frame, got {window}")
    path = Path(path)
    with _open_input(path) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        batch: list[np.ndarray] = []
        count = 0
        try:
            for frame in container.decode(stream):
                if limit is not None and count == limit:
                    break
                batch.append(frame.to_ndarray(format="rgb24"))
                if times is not None:
                    times.append(frame.pts)
                count += 1
                if len(batch) == window:
                    yield np.stack(batch)
                    batch = []
        except av.error.FFmpegError as exc:
            raise ValueError(f"cannot decode {path} ({exc}): the file looks damaged") from exc
        if batch:
            yield np.stack(batch)


def check_output(codec: str, crf: int | None = None, size: tuple[int, int] | None = None) -> None:
    """
    Raises ValueError when a codec cannot write what is asked; the message names the codec and what can.

    Parameters:
        codec (`str`): a key of `CODECS`.
        crf (`int`, *optional*): quality of a lossy codec (see `CRF_RANGE`).
        size (`tuple[int, int]`, *optional*): output (height, width) in pixels.
    """
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}: choose one of {', '.join(CODECS)}")
    if crf is not None:
        if codec not in CRF_RANGE:
            raise ValueError(f"crf applies to {' and '.join(CRF_RANGE)} only; {codec} is lossless (leave crf unset)")
        low, high = CRF_RANGE[codec]
        if isinstance(crf, bool) or not isinstance(crf, int) or not low <= crf <= high:
            raise ValueError(f"crf must be an integer in [{low}, {high}] for {codec}, got {crf!r}")
    if size is not None and codec == "h265" and min(size) < H265_MIN_SIDE:
        raise ValueError(f"codec h265 cannot encode {size[1]}x{size[0]} frames: x265 needs at least {H265_MIN_SIDE} "
                         "pixels per side (smaller frames fail or crash it); use codec h264, h264-lossless or ffv1")


def odd_size_note(codec: str, size: tuple[int, int]) -> str | None:
    """The user note for an odd output size with a 4:2:0 codec (kept exact, in 4:4:4), else None."""
    height, width = size
    if codec not in YUV_CODECS or (width % 2 == 0 and height % 2 == 0):
        return None
    return (f"the output size {width}x{height} is odd: {codec} keeps it exact by storing full-resolution colour "
            "(4:4:4), which some players (browsers, QuickTime, phones) cannot play; for a widely playable file give "
            "an even --target-size, for exact pixels use codec ffv1")


class VideoWriter:
    """Encode uint8 RGB windows into a video file, copying the audio of another file alongside.

    Use as a context manager: on a clean exit the file is finalised and moved to ``path``; on an exception the
    temporary file is deleted and ``path`` is left untouched.

    Parameters:
        path: output file; the container follows its extension (.mp4, .mkv, .mov, ...).
        width, height: frame size (odd sizes are kept exactly: 4:4:4 chroma for h264/h265, see `odd_size_note`).
        fps: frame rate (kept exactly as a fraction).
        codec: one of `CODECS`: "h264" (default, visually lossless CRF 16), "h264-lossless" (exact RGB, libx264rgb),
            "h265" (frames of at least 64x64), "ffv1" (lossless; .mkv plays it most widely).
        crf: quality for h264/h265 (lower is better; None = codec default in `DEFAULT_CRF`; range `CRF_RANGE`).
        audio_from: a file whose first audio stream is remuxed (re-encoded to AAC only if the container
            cannot hold its codec), or None for no audio.
        display_matrix: a display matrix (9 integers, see `VideoInfo.display_matrix`) players apply to rotate or
            flip the picture, or None.
        times: each frame's presentation time (variable frame rate), or None for a constant ``fps``.
        log: receives one-line notes for the user (what was kept or changed); None: the ``star_core`` logger.
        metadata: container tags (key → text), e.g. ComfyUI's prompt and workflow; MP4/MOV keep custom keys.
    """

    def __init__(self, path: str | Path, width: int, height: int, fps: Fraction | float, *, codec: str = "h264",
                 crf: int | None = None, audio_from: str | Path | None = None,
                 display_matrix: tuple[int, ...] | None = None, times: FrameTimes | None = None,
                 log: Callable[[str], None] | None = None, metadata: dict[str, str] | None = None) -> None:
        check_output(codec, crf, (height, width))
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix}")
        self.width, self.height, self.frames_written = width, height, 0
        self.log = LOG.info if log is None else log
        self._times = times
        self._out = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ValueError(f"cannot write {self.path}: a part of its folder {self.path.parent} is a file, not a "
                             "folder") from None
        except OSError as exc:
            raise ValueError(f"cannot create the folder {self.path.parent} ({exc.strerror})") from exc
        custom_tags = {"movflags": "use_metadata_tags"} if metadata and self.path.suffix.lower() in (".mp4", ".mov") \
            else {}
        with self._writing():
            self._out = av.open(str(self._tmp), "w", options=custom_tags)
        try:
            for key, value in (metadata or {}).items():
                self._out.metadata[key] = value
            self._video = self._add_video_stream(codec, crf, Fraction(fps).limit_denominator(1_000_000))
            self._last_dts: int | None = None
            if display_matrix is not None:
                self._set_display_matrix(display_matrix)
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
        # the encoder reads frame.pts in the codec's time base: one tick per frame, or the kept timestamps' base
        stream.codec_context.time_base = stream.time_base = 1 / fps if self._times is None else self._times.time_base
        return stream

    def _set_display_matrix(self, matrix: tuple[int, ...]) -> None:
        if not hasattr(self._video, "set_display_matrix"):  # PyAV < 18 cannot write stream side data
            self.log(f"the input's rotation/flip metadata is not kept: PyAV {av.__version__} cannot write it "
                     "(pip install -U av); the output shows the frames as stored, unrotated")
            return
        self._video.set_display_matrix(list(matrix))

    @property
    def seconds_written(self) -> float:
        """Presentation time of the end of the last frame written."""
        if self._times is None or self.frames_written == 0:
            return float(self.frames_written * self._video.time_base)
        return float(self._times.pts[self.frames_written - 1] * self._times.time_base)

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

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """File-system and encoder failures (disk full, no permission, an encoder refusing a frame) as one
        ValueError that names the file; the caller aborts, so nothing half-written stays."""
        try:
            yield
        except (av.error.FFmpegError, OSError) as exc:
            raise ValueError(f"writing {self.path} failed ({exc}): check the free disk space and that the folder "
                             "is writable") from exc

    def _mux_video(self, packets: list[av.Packet]) -> None:
        """Muxes encoded video packets, repairing a decode timestamp the encoder left invalid: libx265 (FFmpeg 8)
        sometimes gives the first packet of a 2-frame video an uninitialised dts (e.g. -9.6e15), which the MP4
        muxer refuses. A dts that is missing, after its pts, not after the previous one, or more than a minute
        before its pts becomes the pts (or the previous dts + 1); valid streams (B-frames included) are untouched."""
        for packet in packets:
            pts, dts = packet.pts, packet.dts
            if pts is not None and packet.time_base is not None:
                invalid = dts is None or dts > pts or (self._last_dts is not None and dts <= self._last_dts) \
                    or float((pts - dts) * packet.time_base) > 60
                if invalid:
                    packet.dts = pts if self._last_dts is None or pts > self._last_dts else self._last_dts + 1
            self._last_dts = packet.dts
            self._out.mux(packet)

    def write(self, frames: np.ndarray) -> None:
        """Encode a window of uint8 RGB frames ``[T,H,W,3]`` of the writer's size."""
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"frames must be uint8 [T,{self.height},{self.width},3], got {frames.dtype} "
                             f"{list(frames.shape)}")
        if self._times is not None and self.frames_written + len(frames) > len(self._times.pts):
            raise ValueError(f"more frames than the {len(self._times.pts)} timestamps the writer was given")
        with self._writing():
            for image in frames:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
                frame.pts = self.frames_written if self._times is None else self._times.pts[self.frames_written]
                self.frames_written += 1
                self._mux_video(self._video.encode(frame))
            self._mux_audio_until(self.seconds_written)

    def close(self) -> None:
        """Flush the encoders, finish the file and move it to its final name."""
        with self._writing():
            self._mux_video(self._video.encode(None))
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
        path: the video file (probed at once: a missing or unreadable file raises here). A truncated file gives
            the frames that are present (``video.notes()`` says so).
    """

    def __init__(self, path: str | Path) -> None:
        self.video = probe_video(path)
        self.info = SourceInfo(self.video.frame_count, self.video.height, self.video.width, self.video.fps,
                               self.video.path.name)
        self._times: list[int | None] | None = None

    def windows(self, size: int) -> Iterator[torch.Tensor]:
        times: list[int | None] = []
        for window in read_frames(self.video.path, size, limit=self.info.frames, times=times):
            yield torch.from_numpy(window).to(torch.float32).div_(255)
        self._times = times

    def frame_times(self) -> FrameTimes | None:
        """
        The frames' presentation times seen by the last complete read, from the first frame; None before a
        complete read, or when they are unusable (missing, not increasing, not one per frame).
        """
        times, base = self._times, self.video.time_base
        if times is None or base is None or len(times) != self.info.frames or any(t is None for t in times):
            return None
        pts = tuple(t - times[0] for t in times)
        if any(b <= a for a, b in zip(pts, pts[1:])):
            return None
        return FrameTimes(pts, Fraction(base))


class VideoFileSink:
    """
    A :class:`star_core.frames.FrameSink` that encodes the frames into a video file with `VideoWriter` (official
    uint8 truncation, audio remuxed, written atomically: an aborted run leaves no file).

    Parameters:
        path: output file (an existing file is replaced, atomically, once the new one is complete).
        codec, crf, metadata: see `VideoWriter`.
        audio_from: a file whose audio is copied alongside, or None.
        source: the `FileSource` being upscaled, or None: the output then keeps its rotation metadata and, when
            its frame rate is variable, its frame timestamps (read while it was encoded).
        log: receives one-line notes for the user (what was kept or changed); None: the ``star_core`` logger.
    """

    def __init__(self, path: str | Path, *, codec: str = "h264", crf: int | None = None,
                 audio_from: str | Path | None = None, source: FileSource | None = None,
                 log: Callable[[str], None] | None = None, metadata: dict[str, str] | None = None) -> None:
        self.path, self.codec, self.crf, self.audio_from = Path(path), codec, crf, audio_from
        self.source, self.log, self.metadata = source, LOG.info if log is None else log, metadata
        self._writer: VideoWriter | None = None

    def _timing(self, frames: int, fps: Fraction) -> FrameTimes | None:
        """The source's frame times when its frame rate is variable and they can be kept (else None, said why)."""
        times = self.source.frame_times() if self.source is not None else None
        if self.source is None or (times is not None and times.is_constant(fps)):
            return None
        if times is None or len(times.pts) != frames:
            self.log(f"the frame timestamps of {self.source.info.name} could not be read: written at a constant "
                     f"{float(fps):.3f} fps")
            return None
        span = float(times.pts[-1] * times.time_base)
        average = f"{(frames - 1) / span:.3f} fps on average" if span > 0 else "one frame"
        self.log(f"variable frame rate: the output keeps the input's {frames} frame timestamps ({average})")
        return times

    def begin(self, geometry, fps) -> None:
        height, width = geometry.target_size
        fps = Fraction(fps or 24).limit_denominator(1_000_000)
        matrix = self.source.video.display_matrix if self.source is not None else None
        if matrix is not None and hasattr(av.video.stream.VideoStream, "set_display_matrix"):
            self.log(f"the input is shown rotated by {self.source.video.rotation:g} degrees (display matrix): the "
                     "frames are upscaled as stored and the output keeps the same display matrix")
        note = odd_size_note(self.codec, geometry.target_size)
        if note is not None:
            self.log(note)
        self._writer = VideoWriter(self.path, width, height, fps, codec=self.codec, crf=self.crf,
                                   audio_from=self.audio_from, display_matrix=matrix,
                                   times=self._timing(geometry.frames, fps), log=self.log,
                                   metadata=self.metadata)

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
