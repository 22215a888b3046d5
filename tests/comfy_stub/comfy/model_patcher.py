"""Stub of `comfy.model_patcher.ModelPatcher`: holds the module and its devices like the real one."""
from __future__ import annotations

import torch


class ModelPatcher:
    def __init__(self, model: torch.nn.Module, load_device, offload_device, size: int = 0, weight_inplace_update: bool = False):
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device
        self.size = size

    def model_size(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def model_dtype(self):
        return next(self.model.parameters()).dtype
