"""Stub of `comfy_api.latest`: `ComfyExtension` and the V3 `io` schema classes."""
from __future__ import annotations

from . import io

__all__ = ["ComfyExtension", "io"]


class ComfyExtension:
    async def on_load(self) -> None:
        pass

    async def get_node_list(self) -> list:
        raise NotImplementedError
