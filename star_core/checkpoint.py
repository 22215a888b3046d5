"""Safe loading of STAR checkpoints (light_deg.pt / heavy_deg.pt / converted safetensors) into `STARUNet`."""
from __future__ import annotations

import logging
import pickle
import zipfile
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Mapping

import torch
from torch import nn

from .model import STARConfig, STARUNet, cast_ops, config_from_state_dict

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
# Tensors of VEnhancer's ControlNet that STAR removed; a checkpoint derived from VEnhancer may still carry them.
VENHANCER_EXTRA_KEYS = (
    "VideoControlNet.hint_time_zero_linear.weight", "VideoControlNet.hint_time_zero_linear.bias",
    "VideoControlNet.scale_cond.0.weight", "VideoControlNet.scale_cond.0.bias",
    "VideoControlNet.scale_cond.2.weight", "VideoControlNet.scale_cond.2.bias",
)
# Key prefixes of other models a user may point the loader at by mistake, and what they are.
_KNOWN_LAYOUTS = (
    (("model.diffusion_model.",), "a Stable-Diffusion-style (ldm) checkpoint"),
    (("down_blocks.", "up_blocks.", "mid_block."), "a diffusers UNet"),
    (("encoder.", "decoder.", "quant_conv.", "post_quant_conv."), "a VAE"),
    (("text_model.",), "a transformers CLIP text encoder"),
    (("transformer.resblocks.", "token_embedding.", "visual."), "an open_clip model"),
)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """
    Reads a state dict without ever executing code from the file.

    ``.safetensors`` goes through safetensors; ``.pt/.pth/.ckpt/.bin`` through ``torch.load(weights_only=True)``
    (memory-mapped when the file is in the zip format). A ``{'state_dict': ...}`` wrapper is unwrapped; key names
    are returned unchanged.

    Parameters:
        path (`str` or `Path`): checkpoint file.

    Returns:
        `dict[str, torch.Tensor]`: the tensors, on CPU.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unreadable/truncated file, a pickle that needs arbitrary code, or no state dict inside.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found: pass the path of light_deg.pt / heavy_deg.pt "
                                f"(or a converted .safetensors file)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            obj: object = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"cannot read {path} as safetensors (truncated or not a safetensors file): {err}") from err
    elif path.suffix in PICKLE_SUFFIXES:
        obj = _torch_load(path)
    else:
        raise ValueError(f"checkpoint {path}: unsupported file type {path.suffix!r}; "
                         f"expected .safetensors or one of {', '.join(PICKLE_SUFFIXES)}")
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ValueError(f"checkpoint {path} holds no tensors (top-level keys: {sorted(map(str, obj))[:8]})")
    return sd


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"refusing to load {path}: it contains objects other than tensors and plain containers, "
                         f"which could run code when unpickled (torch.load weights_only=True rejected it: "
                         f"{str(err).splitlines()[0]}). Use the official light_deg.pt / heavy_deg.pt or a "
                         f".safetensors file") from err
    except RuntimeError as err:
        if "mmap" not in str(err):  # legacy (non-zip) torch.save format cannot be memory-mapped
            raise ValueError(f"cannot read checkpoint {path} (truncated or corrupt?): {err}") from err
    except (EOFError, zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"cannot read checkpoint {path} (truncated or corrupt?): {err}") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"refusing to load {path}: it contains objects other than tensors (weights_only=True "
                         f"rejected it: {str(err).splitlines()[0]})") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"cannot read checkpoint {path} (truncated or corrupt?): {err}") from err


def _describe(keys: list[str], expected: Mapping[str, tuple[int, ...]]) -> str:
    """A short description of what a foreign key set looks like."""
    heads = Counter(k.split(".", 1)[0] for k in keys)
    if len(heads) == 1:
        prefix = next(iter(heads)) + "."
        if set(expected) <= {k.removeprefix(prefix) for k in keys}:
            return (f"every key carries the extra prefix {prefix!r} (a STAR checkpoint saved from a wrapper); "
                    f"remove that prefix from the keys")
    for prefixes, what in _KNOWN_LAYOUTS:
        if sum(k.startswith(prefixes) for k in keys) > len(keys) // 2:
            return f"it looks like {what} (keys start with {' / '.join(prefixes)})"
    return "its top-level key groups are " + ", ".join(f"{name!r} ({n})" for name, n in heads.most_common(4))


def check_star_keys(sd: Mapping[str, torch.Tensor], config: STARConfig) -> dict[str, torch.Tensor]:
    """
    Compares a state dict with what `STARUNet(config)` expects (names and shapes).

    The six VEnhancer-only tensors are dropped with an info log line; anything else missing, unexpected or of the
    wrong shape raises.

    Parameters:
        sd (`Mapping[str, torch.Tensor]`): the checkpoint's tensors.
        config (`STARConfig`): the architecture to check against.

    Returns:
        `dict[str, torch.Tensor]`: the tensors to load (``sd`` without the VEnhancer extras).

    Raises:
        ValueError: "not a STAR I2VGen-XL checkpoint: N of M expected keys missing, e.g. …" plus what the file
            looks like instead, or the unexpected keys / shape mismatches.
    """
    with torch.device("meta"):
        model = STARUNet(config)
    return _checked(sd, model)


def _checked(sd: Mapping[str, torch.Tensor], model: STARUNet) -> dict[str, torch.Tensor]:
    """`check_star_keys` against an already built model."""
    config = model.config
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    extras = [k for k in VENHANCER_EXTRA_KEYS if k in sd]
    if extras:
        log.info("dropping %d VEnhancer-only tensors STAR does not use: %s", len(extras), ", ".join(extras))
    sd = {k: v for k, v in sd.items() if k not in extras}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing:
        raise ValueError(f"not a STAR I2VGen-XL checkpoint: {len(missing)} of {len(expected)} expected keys missing, "
                         f"e.g. {missing[:3]}; the file has {len(sd)} keys and {_describe(list(sd), expected)}"
                         + (f"; unexpected keys e.g. {unexpected[:3]}" if unexpected else ""))
    if unexpected:
        raise ValueError(f"not a STAR I2VGen-XL checkpoint: {len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {expected[k]})" for k in expected if tuple(sd[k].shape) != expected[k]]
    if wrong:
        raise ValueError(f"not a STAR I2VGen-XL checkpoint for {config}: {len(wrong)} tensors have the wrong shape, "
                         f"e.g. {wrong[:3]}")
    return sd


def load_star_model(source: str | Path | Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", operations: ModuleType | None = None,
                    config: STARConfig | None = None, compute_dtype: torch.dtype | None = None) -> STARUNet:
    """
    Builds `STARUNet` on ``meta`` and materialises it straight from the checkpoint tensors (no second full copy).

    Parameters:
        source (`str`, `Path` or `Mapping`): checkpoint file, or an already loaded state dict.
        dtype (`torch.dtype`, *optional*): weight dtype (float32, float16, bfloat16), also the compute dtype unless
            ``compute_dtype`` is given; default: the checkpoint's floating dtype.
        device (`str` or `torch.device`): where the weights go.
        operations (`module`, *optional*): layer namespace (default ``torch.nn``).
        config (`STARConfig`, *optional*): architecture; default inferred from the tensor shapes. Head counts are
            not visible in shapes, so pass it for non-released configs whose head width is not the inferred one.
        compute_dtype (`torch.dtype`, *optional*): forward dtype when it differs from ``dtype`` (weights kept in
            ``dtype``); needs weight-casting ``operations`` and defaults to `star_core.model.cast_ops` then.

    Returns:
        `STARUNet`: in eval mode, parameters without gradients.
    """
    sd = load_state_dict_file(source) if isinstance(source, (str, Path)) else dict(source)
    if config is None:
        try:
            config = config_from_state_dict(sd)
        except ValueError:
            check_star_keys(sd, STARConfig())  # raises the descriptive "N of M expected keys missing" error
            raise
    if dtype is None:
        dtype = next((v.dtype for v in sd.values() if v.is_floating_point()), torch.float32)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    if operations is None:
        operations = cast_ops if compute_dtype not in (None, dtype) else nn
    model = STARUNet(config, operations=operations, device="meta", dtype=dtype, compute_dtype=compute_dtype)
    sd = _checked(sd, model)
    for key in list(sd):  # convert tensor by tensor, dropping each source reference as we go
        sd[key] = sd[key].to(device=device, dtype=dtype)
    model.load_state_dict(sd, strict=True, assign=True)
    del sd
    return model.eval().requires_grad_(False)
