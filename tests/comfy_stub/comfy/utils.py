"""Stub of `comfy.utils`: a ProgressBar that records updates and checks the interrupt flag like the server hook."""
from __future__ import annotations

from . import model_management

updates: list[tuple[int, int]] = []   # (value, total) of every update, in order
previews: list = []                    # the preview of every update that had one


class ProgressBar:
    def __init__(self, total: int, node_id=None):
        self.total = total
        self.current = 0

    def update_absolute(self, value: int, total: int | None = None, preview=None) -> None:
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        updates.append((self.current, self.total))
        if preview is not None:
            previews.append(preview)
        model_management.throw_exception_if_processing_interrupted()

    def update(self, value: int) -> None:
        self.update_absolute(self.current + value)
