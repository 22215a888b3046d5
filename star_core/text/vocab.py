"""Obtaining open_clip's CLIP BPE vocab file offline-friendly: a local cache, filled from the open_clip wheel.

The vocab ships inside the ``open_clip_torch`` wheel on PyPI. ``fetch_openclip_vocab`` downloads that wheel with
pip (no install, no dependencies), extracts the one file, checks its hash and keeps it in the cache directory.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .tokenizer import OPENCLIP_VOCAB_NAME

OPENCLIP_WHEEL_REQUIREMENT = "open_clip_torch==2.20.0"
_WHEEL_MEMBER = f"open_clip/{OPENCLIP_VOCAB_NAME}"
# sha256 of bpe_simple_vocab_16e6.txt.gz as shipped in open_clip_torch 2.20.0 (same file as OpenAI CLIP's).
OPENCLIP_VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def default_cache_dir() -> Path:
    """``$STAR_VSR_CACHE`` if set, else ``~/.cache/star_vsr``."""
    return Path(os.environ.get("STAR_VSR_CACHE", Path.home() / ".cache" / "star_vsr"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def find_openclip_vocab(cache_dir: str | Path | None = None) -> Path | None:
    """Path of the cached, hash-checked vocab file, or None when it has not been fetched."""
    path = Path(cache_dir or default_cache_dir()) / OPENCLIP_VOCAB_NAME
    return path if path.is_file() and _sha256(path) == OPENCLIP_VOCAB_SHA256 else None


def fetch_openclip_vocab(cache_dir: str | Path | None = None, timeout_s: float = 300.0) -> Path:
    """Returns the cached vocab file, downloading the open_clip wheel with pip to get it when needed.

    Parameters:
        cache_dir (`str` or `Path`, *optional*): where to keep the file; defaults to `default_cache_dir()`.
        timeout_s (`float`, defaults to 300): limit for the pip download.

    Raises:
        `RuntimeError`: when the wheel cannot be downloaded or does not hold the expected file.
    """
    cache = Path(cache_dir or default_cache_dir())
    found = find_openclip_vocab(cache)
    if found:
        return found
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               OPENCLIP_WHEEL_REQUIREMENT, "-d", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            failure = None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        except (OSError, subprocess.TimeoutExpired) as exc:
            failure = str(exc)
        if failure:
            raise RuntimeError(f"could not download {OPENCLIP_WHEEL_REQUIREMENT} to get the CLIP vocab ({failure}); "
                               f"copy {OPENCLIP_VOCAB_NAME} into {cache} by hand, or give a tokenizer folder")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip downloaded no wheel for {OPENCLIP_WHEEL_REQUIREMENT} into {tmp}")
        staged = Path(tmp) / OPENCLIP_VOCAB_NAME
        with zipfile.ZipFile(wheels[0]) as wheel:
            if _WHEEL_MEMBER not in wheel.namelist():
                raise RuntimeError(f"{wheels[0].name} has no {_WHEEL_MEMBER}")
            staged.write_bytes(wheel.read(_WHEEL_MEMBER))
        if _sha256(staged) != OPENCLIP_VOCAB_SHA256:
            raise RuntimeError(f"{_WHEEL_MEMBER} from {wheels[0].name} does not have the expected sha256")
        target = cache / OPENCLIP_VOCAB_NAME
        os.replace(staged, target)
    return target
