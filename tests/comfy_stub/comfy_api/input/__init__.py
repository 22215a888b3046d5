"""Stub of `comfy_api.input`: the abstract VIDEO type (the members both supported ComfyUI versions have)."""
from __future__ import annotations

import io
from abc import ABC, abstractmethod


class VideoInput(ABC):
    @abstractmethod
    def get_components(self):
        ...

    @abstractmethod
    def save_to(self, path, format="auto", codec="auto", metadata=None):
        ...

    def get_stream_source(self):
        buffer = io.BytesIO()
        self.save_to(buffer)
        buffer.seek(0)
        return buffer

    def get_dimensions(self) -> tuple[int, int]:
        images = self.get_components().images
        return images.shape[2], images.shape[1]
