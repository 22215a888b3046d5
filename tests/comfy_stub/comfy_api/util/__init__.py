"""Stub of `comfy_api.util`: the VIDEO parts (frames [T,H,W,3] 0..1, audio dict or None, frame rate)."""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch


@dataclass
class VideoComponents:
    images: torch.Tensor
    audio: Any = None
    frame_rate: Fraction = Fraction(24)
    metadata: Any = None
