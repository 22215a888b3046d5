"""Stub of `comfy.model_management`: CPU devices, recorded loads and a settable interrupt flag."""
from __future__ import annotations

import torch


class InterruptProcessingException(Exception):
    pass


OOM_EXCEPTION = torch.cuda.OutOfMemoryError
loaded: list = []          # every ModelPatcher passed to load_models_gpu, in order
_interrupt = False


def get_torch_device() -> torch.device:
    return torch.device("cpu")


def unet_offload_device() -> torch.device:
    return torch.device("cpu")


def intermediate_device() -> torch.device:
    return torch.device("cpu")


def vae_device() -> torch.device:
    return torch.device("cpu")


def vae_offload_device() -> torch.device:
    return torch.device("cpu")


def text_encoder_device() -> torch.device:
    return torch.device("cpu")


def unet_dtype(device=None, model_params=0, supported_dtypes=(torch.float16, torch.bfloat16, torch.float32), weight_dtype=None):
    return torch.float32


def supports_fp8_compute(device=None) -> bool:
    return False


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None, force_full_load=False):
    for m in models:
        loaded.append(m)
        m.model.to(m.load_device)


def get_free_memory(dev=None, torch_free_too=False) -> int:
    return 8 << 30


def soft_empty_cache(force: bool = False) -> None:
    pass


def interrupt_current_processing(value: bool = True) -> None:
    global _interrupt
    _interrupt = value


def processing_interrupted() -> bool:
    return _interrupt


def throw_exception_if_processing_interrupted() -> None:
    global _interrupt
    if _interrupt:
        _interrupt = False
        raise InterruptProcessingException()


def unet_manual_cast(weight_dtype, inference_device, supported_dtypes=(torch.float16, torch.bfloat16, torch.float32)):
    return None if weight_dtype == torch.float32 else torch.float32
