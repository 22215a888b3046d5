"""Stub of `comfy_api.input_impl`: a VIDEO from a file (decoded with PyAV on request) and one from frames; records
every full decode in `decoded` so tests can tell streaming from materialising."""
from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import torch

from comfy_api.input import VideoInput
from comfy_api.util import VideoComponents

decoded: list[str] = []


class VideoFromFile(VideoInput):
    def __init__(self, file):
        self._file = file

    def get_stream_source(self):
        return self._file

    def get_components(self) -> VideoComponents:
        decoded.append(str(self._file))
        with av.open(self._file) as container:
            stream = container.streams.video[0]
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            rate = Fraction(stream.average_rate)
        images = torch.from_numpy(np.stack(frames)).float() / 255
        return VideoComponents(images=images, audio=None, frame_rate=rate)

    def save_to(self, path, format="auto", codec="auto", metadata=None):
        raise NotImplementedError


class VideoFromComponents(VideoInput):
    def __init__(self, components: VideoComponents):
        self._components = components

    def get_components(self) -> VideoComponents:
        return self._components

    def save_to(self, path, format="auto", codec="auto", metadata=None):
        raise NotImplementedError

    def as_trimmed(self, start_time=None, duration=None, strict_duration=False):
        rate = float(self._components.frame_rate)
        first = int(round((start_time or 0) * rate))
        count = int(round(duration * rate)) if duration else None
        images = self._components.images[first:None if count is None else first + count]
        return VideoFromComponents(VideoComponents(images, self._components.audio, self._components.frame_rate))
