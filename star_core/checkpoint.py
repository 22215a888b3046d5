"""Safe loading of STAR checkpoints (light_deg.pt / heavy_deg.pt / converted safetensors) into `STARUNet`.

A fine-tune can be stored as a *delta*: a ``.safetensors`` file with only the tensors training changed and
metadata naming its base checkpoint (file name, size, SHA-256). `load_state_dict_file` recognises it by that
metadata and returns the base with the delta's tensors put in, so everything that reads a STAR checkpoint (the
Model Loader node, ``--model``) reads a delta as well.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Mapping

import torch
from torch import nn

from .identify import STAR_NEEDS, describe_weights
from .model import STARConfig, STARUNet, cast_ops, config_from_state_dict

log = logging.getLogger(__name__)

# safetensors metadata of a delta checkpoint (all values are strings)
DELTA_MARKER = "star_delta"  # format version, "1"
DELTA_BASE_NAME, DELTA_BASE_SIZE, DELTA_BASE_SHA256 = "star_base_name", "star_base_size", "star_base_sha256"
DELTA_BASE_PATH = "star_base_path"  # where the base was when the delta was written (a hint, not required)
_HASHES: dict[tuple[str, int, int], str] = {}  # (resolved path, size, mtime_ns) -> SHA-256, for this process

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
# How a torch.save file starts: a zip archive (current format) or a pickle with protocol >= 2 (legacy format).
ZIP_MAGIC, PICKLE_PROTOCOL = b"PK\x03\x04", b"\x80"
# Tensors of VEnhancer's ControlNet that STAR removed; a checkpoint derived from VEnhancer may still carry them.
VENHANCER_EXTRA_KEYS = (
    "VideoControlNet.hint_time_zero_linear.weight", "VideoControlNet.hint_time_zero_linear.bias",
    "VideoControlNet.scale_cond.0.weight", "VideoControlNet.scale_cond.0.bias",
    "VideoControlNet.scale_cond.2.weight", "VideoControlNet.scale_cond.2.bias",
)


def load_state_dict_file(path: str | Path, *, base: str | Path | None = None) -> dict[str, torch.Tensor]:
    """
    Reads a state dict without ever executing code from the file.

    ``.safetensors`` goes through safetensors; ``.pt/.pth/.ckpt/.bin`` through ``torch.load(weights_only=True)``
    (memory-mapped when the file is in the zip format). A ``{'state_dict': ...}`` wrapper is unwrapped; key names
    are returned unchanged. A delta checkpoint (see `save_delta`) comes back merged onto its base.

    Parameters:
        path (`str` or `Path`): checkpoint file.
        base (`str` or `Path`, *optional*): the base checkpoint of a delta file (default: the file of the recorded
            name next to the delta, else the recorded path). Ignored for full checkpoints.

    Returns:
        `dict[str, torch.Tensor]`: the tensors, on CPU.

    Raises:
        FileNotFoundError: the file (or a delta's base) does not exist.
        ValueError: an empty, truncated or non-checkpoint file, a pickle that would run code (refused before
            anything of it runs), no state dict inside, or a delta whose base has another size or SHA-256 than
            recorded. The message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found: pass the path of light_deg.pt / heavy_deg.pt "
                                f"(or a converted .safetensors file)")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): the download or copy did not finish; fetch the "
                         f"file again")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            obj: object = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"cannot read {path} as safetensors (truncated, corrupt header or not a safetensors "
                             f"file): {err}") from err
        metadata = read_delta_metadata(path)
        if metadata is not None:
            return _merge_delta(path, obj, metadata, base)
    elif path.suffix in PICKLE_SUFFIXES:
        _check_torch_file_start(path)
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


def _check_torch_file_start(path: Path) -> None:
    """A torch.save file starts as a zip archive (current format) or a pickle (legacy format); refuse anything
    else with what it looks like (an HTML error page saved by a failed download is a common case)."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head.startswith(ZIP_MAGIC) or head[:1] == PICKLE_PROTOCOL:
        return
    if head.lstrip().lower().startswith((b"<!doctype", b"<html", b"<?xml", b"<")):
        what = "an HTML/XML page, e.g. an error page saved by a failed download"
    elif all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        what = "text"
    else:
        what = "unknown binary data"
    raise ValueError(f"{path} is not a torch checkpoint: it starts with {head[:12]!r} ({what}), not with a "
                     f"torch.save zip archive or pickle; download the file again")


def _refusal(path: Path, err: pickle.UnpicklingError) -> ValueError:
    """The error for a pickle that weights_only=True rejected: code it would run, or just not a checkpoint."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    if found:
        return ValueError(f"refusing to load {path}: unpickling it would call {found.group(1)}, i.e. run code from "
                          f"the file (only tensors and plain containers are accepted; nothing of it was run). "
                          f"Use the official release file or a .safetensors copy")
    return ValueError(f"cannot read checkpoint {path} (truncated or corrupt?): the pickle inside is not a state dict "
                      f"({str(err).strip().splitlines()[-1][:160]})")


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, remembered for this process while its size and modification time stay the same."""
    from .download import sha256_of

    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_of(path)
    return _HASHES[key]


def read_delta_metadata(path: str | Path) -> dict[str, str] | None:
    """The safetensors metadata of a delta checkpoint, or None for any other file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError):
        return None
    return metadata if DELTA_MARKER in metadata else None


def save_delta(path: str | Path, tensors: Mapping[str, torch.Tensor], base: str | Path,
               metadata: Mapping[str, str] | None = None) -> Path:
    """
    Writes a delta checkpoint: ``tensors`` (the changed ones, official key names) plus metadata naming the base
    checkpoint by file name, size and SHA-256. Written to a ``.partial`` file first, then renamed.

    Parameters:
        path (`str` or `Path`): output ``.safetensors`` file.
        tensors (`Mapping[str, torch.Tensor]`): the tensors that differ from the base.
        base (`str` or `Path`): the base checkpoint they apply to (hashed here, once per process).
        metadata (`Mapping[str, str]`, *optional*): extra metadata (e.g. the training settings).

    Returns:
        `Path`: the written file.
    """
    from safetensors.torch import save_file

    path, base = Path(path), Path(base)
    if path.suffix != ".safetensors":
        raise ValueError(f"delta checkpoint {path} must end in .safetensors")
    if path.resolve() == base.resolve():
        raise ValueError(f"delta checkpoint {path} would overwrite its base; choose another path")
    info = {**(metadata or {}), "format": "pt", DELTA_MARKER: "1", DELTA_BASE_NAME: base.name,
            DELTA_BASE_SIZE: str(base.stat().st_size), DELTA_BASE_SHA256: file_sha256(base),
            DELTA_BASE_PATH: str(base.resolve())}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=info)
    os.replace(tmp, path)
    return path


def delta_base(path: str | Path, metadata: Mapping[str, str], base: str | Path | None = None) -> Path:
    """
    Finds and checks the base checkpoint of a delta: ``base`` if given, else the recorded file name next to the
    delta, else the recorded path; its size and SHA-256 must be the recorded ones.

    Raises:
        FileNotFoundError: no candidate exists.
        ValueError: the base found has another size or SHA-256.
    """
    path = Path(path)
    name, size, sha = metadata[DELTA_BASE_NAME], int(metadata[DELTA_BASE_SIZE]), metadata[DELTA_BASE_SHA256]
    if base is not None:
        candidates = [Path(base)]
    else:
        candidates = [path.parent / name] + ([Path(metadata[DELTA_BASE_PATH])] if DELTA_BASE_PATH in metadata else [])
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"{path} is a STAR fine-tune stored as a delta of {name!r} ({size:,} bytes, SHA-256 "
                                f"{sha[:16]}…), which is not at {' nor '.join(map(str, candidates))}: put {name} "
                                f"next to {path.name} (or pass its path as the base), or merge the fine-tune into a "
                                f"full checkpoint where the base is available (python -m star_core train --merge-only)")
    if found.stat().st_size != size or file_sha256(found) != sha:
        raise ValueError(f"{found} is not the base checkpoint {path.name} was trained from: expected {name!r} with "
                         f"{size:,} bytes and SHA-256 {sha}, found {found.stat().st_size:,} bytes"
                         + ("" if found.stat().st_size != size else f" and SHA-256 {file_sha256(found)}")
                         + "; use the exact base file the fine-tune was made from")
    return found


def _merge_delta(path: Path, delta: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                 base: str | Path | None) -> dict[str, torch.Tensor]:
    base_path = delta_base(path, metadata, base)
    if read_delta_metadata(base_path) is not None:
        raise ValueError(f"the base of {path} ({base_path}) is itself a delta; merge it first")
    sd = load_state_dict_file(base_path)
    unknown = [k for k in delta if k not in sd]
    wrong = [k for k in delta if k in sd and delta[k].shape != sd[k].shape]
    if unknown or wrong:
        raise ValueError(f"{path} does not fit its base {base_path}: keys not in the base {unknown[:3]}, "
                         f"shape mismatches {wrong[:3]}")
    for key, value in delta.items():
        sd[key] = value.to(sd[key].dtype)
    log.info("merged %d fine-tuned tensors of %s onto %s", len(delta), path.name, base_path.name)
    return sd


def _torch_load(path: Path) -> object:
    for mmap in (True, False):  # the legacy (non-zip) torch.save format cannot be memory-mapped
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as err:
            raise _refusal(path, err) from err
        except RuntimeError as err:
            if mmap and "mmap" in str(err):
                continue
            raise ValueError(f"cannot read checkpoint {path} (truncated or corrupt?): {err}") from err
        except (EOFError, zipfile.BadZipFile, OSError, KeyError, ValueError, TypeError, IndexError,
                AttributeError) as err:  # what torch raises on damaged data (e.g. KeyError from a text file)
            raise ValueError(f"cannot read checkpoint {path} (truncated or corrupt?): "
                             f"{type(err).__name__}: {err}") from err
    raise AssertionError("unreachable")


def _describe(keys: list[str], sd: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> str:
    """A short description of what a foreign key set looks like (`star_core.identify`), or its key groups."""
    heads = Counter(k.split(".", 1)[0] for k in keys)
    if len(heads) == 1:
        prefix = next(iter(heads)) + "."
        if set(expected) <= {k.removeprefix(prefix) for k in keys}:
            return (f"every key carries the extra prefix {prefix!r} (a STAR checkpoint saved from a wrapper); "
                    f"remove that prefix from the keys")
    what = describe_weights(sd)
    if what is not None:
        return f"it looks like {what}"
    return "its top-level key groups are " + ", ".join(f"{name!r} ({n})" for name, n in heads.most_common(4))


def check_star_keys(sd: Mapping[str, torch.Tensor], config: STARConfig, name: str = "the state dict"
                    ) -> dict[str, torch.Tensor]:
    """
    Compares a state dict with what `STARUNet(config)` expects (names and shapes).

    The six VEnhancer-only tensors are dropped with an info log line; anything else missing, unexpected or of the
    wrong shape raises.

    Parameters:
        sd (`Mapping[str, torch.Tensor]`): the checkpoint's tensors.
        config (`STARConfig`): the architecture to check against.
        name (`str`): the file (or node input) the tensors came from, for messages.

    Returns:
        `dict[str, torch.Tensor]`: the tensors to load (``sd`` without the VEnhancer extras).

    Raises:
        ValueError: "<name> is not a STAR I2VGen-XL checkpoint: it looks like <other model> (…). STAR needs …"
            when keys are missing, else the unexpected keys or shape mismatches.
    """
    with torch.device("meta"):
        model = STARUNet(config)
    return _checked(sd, model, name)


def _checked(sd: Mapping[str, torch.Tensor], model: STARUNet, name: str) -> dict[str, torch.Tensor]:
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
        detail = (f"{len(missing)} of {len(expected)} expected keys missing, e.g. {missing[:3]}"
                  + (f"; unexpected keys e.g. {unexpected[:3]}" if unexpected else ""))
        if any(k.startswith("VideoControlNet.") for k in sd):
            raise ValueError(f"{name} is an incomplete or modified STAR checkpoint: {detail}. {STAR_NEEDS}")
        raise ValueError(f"{name} is not a STAR I2VGen-XL checkpoint: {_describe(list(sd), sd, expected)} "
                         f"({detail}). {STAR_NEEDS}")
    if unexpected:
        raise ValueError(f"{name} is not a STAR I2VGen-XL checkpoint: {len(unexpected)} unexpected keys, "
                         f"e.g. {unexpected[:3]}. {STAR_NEEDS}")
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {expected[k]})" for k in expected if tuple(sd[k].shape) != expected[k]]
    if wrong:
        raise ValueError(f"{name} does not match the STAR architecture {config}: {len(wrong)} tensors have the "
                         f"wrong shape, e.g. {wrong[:3]}")
    return sd


def load_star_model(source: str | Path | Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", operations: ModuleType | None = None,
                    config: STARConfig | None = None, compute_dtype: torch.dtype | None = None,
                    name: str | None = None) -> STARUNet:
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
        name (`str`, *optional*): what to call the source in errors (default: the path, or "the state dict").

    Returns:
        `STARUNet`: in eval mode, parameters without gradients.

    Raises:
        ValueError: the file is unreadable or not a STAR checkpoint; the message names it and, for another
            model's file, says what it looks like and what STAR needs.
    """
    if name is None:
        name = str(source) if isinstance(source, (str, Path)) else "the state dict"
    sd = load_state_dict_file(source) if isinstance(source, (str, Path)) else dict(source)
    if config is None:
        config = _inferred_config(sd, name)
    if dtype is None:
        dtype = next((v.dtype for v in sd.values() if v.is_floating_point()), torch.float32)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    if operations is None:
        operations = cast_ops if compute_dtype not in (None, dtype) else nn
    model = STARUNet(config, operations=operations, device="meta", dtype=dtype, compute_dtype=compute_dtype)
    sd = _checked(sd, model, name)
    for key in list(sd):  # convert tensor by tensor, dropping each source reference as we go
        sd[key] = sd[key].to(device=device, dtype=dtype)
    model.load_state_dict(sd, strict=True, assign=True)
    del sd
    return model.eval().requires_grad_(False)


def _inferred_config(sd: Mapping[str, torch.Tensor], name: str) -> STARConfig:
    """`config_from_state_dict`, with another model's file reported as what it looks like."""
    try:
        return config_from_state_dict(sd)
    except ValueError:
        check_star_keys(sd, STARConfig(), name)  # raises the descriptive "it looks like …" error
        raise


def check_star_checkpoint(path: str | Path) -> STARConfig:
    """
    Checks a STAR checkpoint file from its key names and shapes only (a ``.safetensors`` header or a
    memory-mapped ``.pt``), so a run can refuse a wrong file before spending time on anything else.

    Parameters:
        path (`str` or `Path`): the checkpoint.

    Returns:
        `STARConfig`: the architecture inferred from the shapes.

    Raises:
        FileNotFoundError, ValueError: as `load_star_model` would, naming the file.
    """
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file() and path.stat().st_size > 0:
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as handle:
                sd = {k: torch.empty(handle.get_slice(k).get_shape(), device="meta") for k in handle.keys()}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"cannot read {path} as safetensors (truncated, corrupt header or not a safetensors "
                             f"file): {err}") from err
    else:
        sd = load_state_dict_file(path)
    config = _inferred_config(sd, str(path))
    check_star_keys(sd, config, str(path))
    return config
