"""ComfyUI's VIDEO on both sides of a STAR run, streamed: a VIDEO read window by window as a `FrameSource`, and
`STARVideo`, a lazy VIDEO whose frames are decoded from the STAR latent window by window while it is saved.

SaveVideo calls ``get_dimensions()`` and then ``save_to(path, format, codec, metadata, ...)``: STARVideo decodes,
colour-fixes and encodes one window at a time inside ``save_to`` (``pipeline.decode_to_sink`` into a
``VideoFileSink``), so the whole output never exists in memory; the latent is the only whole-clip tensor.
``get_components()`` (GetVideoComponents, nodes that want frames) decodes everything into one IMAGE batch and says
so in the log.
"""
from __future__ import annotations

import io as _io
import json
import logging
import os
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path

import torch
from comfy_api.input import VideoInput
from comfy_api.input_impl import VideoFromComponents, VideoFromFile
from comfy_api.util import VideoComponents

from star_core import pipeline
from star_core.frames import FrameSource, TensorSink, TensorSource
from star_core.geometry import Geometry
from star_core.spec import RunSpec
from star_core.video_io import FileSource, VideoFileSink

from . import host

LOG = logging.getLogger("star_vsr")
# ComfyUI's container/codec names → star_core's writer codec. Both hosts pass the combo strings (0.3.x) or their
# str enums (0.33), which compare equal to the strings.
CODECS = {"auto": "h264", "h264": "h264"}
CONTAINERS = {"auto": ".mp4", "mp4": ".mp4", "mkv": ".mkv"}


def _stream_path(video) -> str | None:
    """The file behind a core VIDEO loaded from disk (untrimmed), else None."""
    if not isinstance(video, VideoFromFile):
        return None
    trim = getattr(video, "get_active_trim_window", lambda: (0.0, 0.0))()
    source = video.get_stream_source()
    if tuple(trim) != (0.0, 0.0) or not isinstance(source, (str, os.PathLike)):
        return None
    return os.fspath(source)


def video_source(video, name: str = "video") -> tuple[FrameSource, str | None]:
    """
    A ComfyUI VIDEO as a re-readable `FrameSource`, and the file to copy its audio from.

    A VIDEO loaded from a file (core LoadVideo) is decoded window by window from that file; any other VIDEO
    (CreateVideo's frames, a trimmed video) is taken as the frames it already holds.

    Parameters:
        video: a ComfyUI `VideoInput`.
        name (`str`): the input's name for messages.
    """
    if not isinstance(video, VideoInput):
        raise ValueError(f"{name}: expected a VIDEO (Load Video, Create Video), got {type(video).__name__}")
    path = _stream_path(video)
    if path is not None:
        source = FileSource(path)
        for note in source.video.notes():  # truncated file, alpha dropped, >8-bit read as 8-bit
            LOG.info("STAR video: %s: %s", source.info.name, note)
        return source, path
    components = video.get_components()
    return TensorSource(components.images, components.frame_rate, name=name), None


class STARVideo(VideoInput):
    """
    The restored video of a STAR run, decoded from its latent only when the video is saved or its frames are asked
    for.

    Parameters:
        latent (`torch.Tensor`): the sampled latent [1,4,F,h,w].
        geometry (`Geometry`): the run's geometry (output size, frame count, fps).
        vae: the node's VAE input (a core VAE holding the SVD VAE, or a STAR VAE).
        spec (`RunSpec`): the decode and colour options.
        source (`FrameSource`): the LR frames the latent came from (read again for the colour fix).
        audio_from (`str`, *optional*): a file whose audio is copied into the output.
    """

    def __init__(self, latent: torch.Tensor, geometry: Geometry, vae, spec: RunSpec, source: FrameSource,
                 audio_from: str | None = None) -> None:
        self.latent, self.geometry, self.vae, self.spec = latent, geometry, vae, spec
        self.source, self.audio_from = source, audio_from

    # What SaveVideo and the frontend ask before saving: all from the geometry, nothing decoded.
    def get_dimensions(self) -> tuple[int, int]:
        height, width = self.geometry.target_size
        return width, height

    def get_frame_rate(self) -> Fraction:
        return Fraction(self.geometry.fps or 24).limit_denominator(1_000_000)

    def get_frame_count(self) -> int:
        return self.geometry.frames

    def get_duration(self) -> float:
        return float(self.geometry.frames / self.get_frame_rate())

    def get_container_format(self) -> str:
        return "mp4"

    def get_bit_depth(self) -> int:
        return 8

    def get_color_space(self) -> str:
        return "sRGB"

    def write_to(self, sink) -> None:
        """Decodes, colour-fixes and hands the frames to a `FrameSink`, one window at a time."""
        video = host.video_vae(self.vae)
        ctx = host.context(video.model)
        with ctx.scope():
            pipeline.decode_to_sink(video, self.latent, self.geometry, self.source, sink, self.spec, host=ctx)

    def save_to(self, path, format="auto", codec="auto", metadata: dict | None = None, bit_depth=None, crf=None,
                color_space=None) -> None:
        """
        Encodes the video into `path` (a file path or a writable binary buffer) while decoding it window by window.

        Parameters:
            path (`str` or binary file): where to write.
            format (`str`): ComfyUI's container: "auto"/"mp4" (MP4) or "mkv".
            codec (`str`): "auto" or "h264".
            metadata (`dict`, *optional*): stored as JSON strings (ComfyUI puts the prompt and workflow here).
            bit_depth, crf, color_space: ComfyUI 0.33's encoding options; 8-bit sRGB only, crf as given.
        """
        container, writer_codec = CONTAINERS.get(str(getattr(format, "value", format))), \
            CODECS.get(str(getattr(codec, "value", codec)))
        if container is None or writer_codec is None:
            raise ValueError(f"STAR video: save as format auto/mp4/mkv with codec auto/h264 (got format {format!s}, "
                             f"codec {codec!s}); for other formats save an MP4 and convert it")
        if (bit_depth not in (None, 8)) or (color_space not in (None, "auto", "sRGB")):
            raise ValueError("STAR video: only 8-bit sRGB output is supported (set bit depth 8 / color space sRGB)")
        tags = {key: json.dumps(value) for key, value in (metadata or {}).items()}  # as core SaveVideo stores them
        # a file source also gives its rotation (display matrix) and variable-frame-rate timestamps to the output
        options = dict(crf=None if crf is None else int(round(crf)), audio_from=self.audio_from, metadata=tags,
                       source=self.source if isinstance(self.source, FileSource) else None,
                       log=lambda message: LOG.info("STAR video: %s", message))
        if isinstance(path, (str, os.PathLike)):
            self.write_to(VideoFileSink(Path(path), codec=writer_codec, **options))
            return
        with tempfile.TemporaryDirectory(prefix="star_video_") as folder:  # a buffer: write a file, copy it in
            file = Path(folder) / f"video{container}"
            self.write_to(VideoFileSink(file, codec=writer_codec, **options))
            with open(file, "rb") as data:
                shutil.copyfileobj(data, path)

    def get_stream_source(self) -> _io.BytesIO:
        buffer = _io.BytesIO()
        self.save_to(buffer)
        buffer.seek(0)
        return buffer

    def get_components(self) -> VideoComponents:
        """Every frame as one IMAGE batch [T,H,W,3] (this holds the whole video in memory)."""
        height, width = self.geometry.target_size
        LOG.warning("STAR video: decoding all %d frames of %dx%d into memory for a node that wants them as "
                    "images; connect Save Video directly to the STAR node to stream instead",
                    self.geometry.frames, width, height)
        sink = TensorSink()
        self.write_to(sink)
        return VideoComponents(images=sink.frames, audio=None, frame_rate=self.get_frame_rate())

    def as_trimmed(self, start_time: float | None = None, duration: float | None = None,
                   strict_duration: bool = False):
        """A trimmed copy (ComfyUI 0.33's Video Slice): the frames are decoded, then trimmed by the host."""
        return VideoFromComponents(self.get_components()).as_trimmed(start_time, duration, strict_duration)

