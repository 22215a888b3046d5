"""Where a run's frames come from and go to: a :class:`FrameSource` read more than once, a :class:`FrameSink`
receiving finished frame windows in order.

The pipeline reads the LR video twice (once to encode, once for the colour fix while decoding), so a source must
be re-readable from the first frame; it never asks for more than a window at a time, and a sink never receives the
whole video at once. In-memory forms are here; files are in :mod:`star_core.video_io`; ComfyUI's VIDEO in ``nodes``.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

import torch

from .geometry import Geometry


@dataclass(frozen=True)
class SourceInfo:
    """
    What a source holds.

    Parameters:
        frames (`int`): number of frames (≥ 1).
        height (`int`), width (`int`): frame size in pixels.
        fps (`Fraction` or `float`, *optional*): frame rate, when known.
        name (`str`): a label for messages (file name, "IMAGE input", ...).
    """

    frames: int
    height: int
    width: int
    fps: Fraction | float | None = None
    name: str = "input"


class FrameSource(Protocol):
    """Re-readable frames: ``windows(size)`` starts at frame 0 on every call."""

    info: SourceInfo

    def windows(self, size: int) -> Iterator[torch.Tensor]:
        """Consecutive windows ``[t,H,W,3]`` float32 in 0..1 of at most ``size`` frames, covering the video."""
        ...


class FrameSink(Protocol):
    """Receives the output frames window by window, in order."""

    def begin(self, geometry: Geometry, fps: Fraction | float | None) -> None:
        """Called once before the first window with the run's geometry (output size, frame count)."""
        ...

    def write(self, frames: torch.Tensor) -> None:
        """Finished frames ``[t,H,W,3]`` float32 in 0..1, in order."""
        ...

    def finish(self) -> None:
        """Called once after the last window (e.g. to finalise a file)."""
        ...

    def abort(self) -> None:
        """Called instead of :meth:`finish` when the run fails or is cancelled: leave nothing half-written."""
        ...


def to_float_frames(frames: torch.Tensor, name: str = "frames") -> torch.Tensor:
    """``[T,H,W,3]`` uint8 (0..255) or float (0..1) frames as float32 in 0..1; errors name ``name``."""
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"{name} must be a [T,H,W,3] RGB tensor (ComfyUI IMAGE layout), got {shape}")
    if frames.dtype == torch.uint8:
        return frames.to(torch.float32).div_(255)
    if not frames.is_floating_point():
        raise ValueError(f"{name} must be float in 0..1 or uint8, got {frames.dtype}")
    return frames.to(torch.float32)


class TensorSource:
    """
    Frames already in memory.

    Parameters:
        frames (`torch.Tensor`): ``[T,H,W,3]`` float in 0..1 (ComfyUI IMAGE) or uint8.
        fps (`float`, *optional*): frame rate to carry along.
        name (`str`): label for messages.
    """

    def __init__(self, frames: torch.Tensor, fps: Fraction | float | None = None, name: str = "IMAGE input") -> None:
        to_float_frames(frames[:0] if isinstance(frames, torch.Tensor) else frames, name)  # shape and dtype check
        if frames.shape[0] < 1 or frames.shape[1] < 1 or frames.shape[2] < 1:
            raise ValueError(f"{name} is empty ({tuple(frames.shape)}): give at least one frame of at least 1x1")
        self.frames = frames
        self.info = SourceInfo(frames.shape[0], frames.shape[1], frames.shape[2], fps, name)

    def windows(self, size: int) -> Iterator[torch.Tensor]:
        for start in range(0, self.info.frames, size):
            yield to_float_frames(self.frames[start:start + size])


class TensorSink:
    """Collects the output into one ``[T,H,W,3]`` float32 tensor on the CPU (:attr:`frames` after the run)."""

    def __init__(self) -> None:
        self.frames: torch.Tensor | None = None
        self._written = 0

    def begin(self, geometry: Geometry, fps: Fraction | float | None) -> None:
        self.frames = torch.empty(geometry.frames, *geometry.target_size, 3)
        self._written = 0

    def write(self, frames: torch.Tensor) -> None:
        assert self.frames is not None, "begin() first"
        self.frames[self._written:self._written + frames.shape[0]] = frames
        self._written += frames.shape[0]

    def finish(self) -> None:
        assert self.frames is not None and self._written == self.frames.shape[0], "not every frame was written"

    def abort(self) -> None:
        self.frames = None


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """
    The official writer conversion: 0..1 frames × 255 **truncated** (numpy ``astype('uint8')``), not rounded.

    Parameters:
        frames (`torch.Tensor`): [T,H,W,C] float in 0..1.
    """
    return (frames.clamp(0, 1) * 255).to(torch.uint8)
