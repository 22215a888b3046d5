"""Find the model files a STAR run needs: explicit paths, a ComfyUI models folder, a cache, or a download.

Every component is resolved in that order. Downloads go through huggingface_hub into a staging folder
``<cache>/.staging/<repo_id>/`` (a dropped connection is resumed with a range request within the run), are checked
against the pinned size/SHA-256 when known here, else against the size and LFS SHA-256 the hub reports, and only
then moved to ``<cache>/<repo_id>/<path in repo>``: a file at its final name is always complete and verified, so a
run that was interrupted, ran out of disk or was killed during the hash never leaves a file a later run would
trust. Free space is checked before a transfer starts. When anything is missing (offline, no network, gated
repo, full disk, read-only cache), one `ModelsMissingError` lists every missing file, its expected size, where to
put it and why it is missing.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

HF_SITE = "https://huggingface.co"
STAGING = ".staging"  # under the cache: downloads in progress or not yet verified


@dataclass(frozen=True)
class ModelFile:
    """One downloadable file.

    Parameters:
        label: what it is, for messages.
        repo_id: Hugging Face repository.
        filename: path inside the repository.
        size: expected size in bytes, or None when it is not known here (then the hub's figure is used).
        sha256: expected SHA-256 hex digest, or None when not known here (then the hub's LFS hash is used).
        approx: a human size hint for messages when ``size`` is None.
        note: extra advice for messages (e.g. the repository is gated).
    """

    label: str
    repo_id: str
    filename: str
    size: int | None = None
    sha256: str | None = None
    approx: str = ""
    note: str = ""

    @property
    def url(self) -> str:
        return f"{HF_SITE}/{self.repo_id}/blob/main/{self.filename}"

    def cache_path(self, cache_dir: Path) -> Path:
        return cache_dir / self.repo_id / self.filename

    def size_text(self) -> str:
        if self.size is not None:
            return f"{self.size:,} bytes"
        return f"size not known here ({self.approx})" if self.approx else "size not known here"


# Sizes of the public files could not be checked from where this was written (STAR_REFERENCE.md §2), so they
# are None and the hub's own size/LFS hash is what a download is verified against.
STAR_CHECKPOINTS = {
    "light": ModelFile("STAR checkpoint, light degradation", "SherryX/STAR", "I2VGen-XL-based/light_deg.pt",
                       approx="about 4.1 GB if stored fp16, 8.2 GB if fp32"),
    "heavy": ModelFile("STAR checkpoint, heavy degradation", "SherryX/STAR", "I2VGen-XL-based/heavy_deg.pt",
                       approx="about 4.1 GB if stored fp16, 8.2 GB if fp32"),
}
_CLIP_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
TEXT_ENCODER = ModelFile("OpenCLIP ViT-H-14 text encoder (open_clip layout)", _CLIP_REPO,
                         "open_clip_pytorch_model.bin", approx="about 3.9 GB")
TOKENIZER_FILES = (
    ModelFile("CLIP tokenizer vocabulary", _CLIP_REPO, "vocab.json", approx="about 0.9 MB"),
    ModelFile("CLIP tokenizer merges", _CLIP_REPO, "merges.txt", approx="about 0.5 MB"),
)
_SVD_REPO = "stabilityai/stable-video-diffusion-img2vid"
_GATED = "gated repository: accept its licence on the model page and log in (`hf auth login` or HF_TOKEN)"
VAE_FILES = (
    ModelFile("SVD temporal VAE config", _SVD_REPO, "vae/config.json", approx="about 1 kB", note=_GATED),
    ModelFile("SVD temporal VAE weights (fp16)", _SVD_REPO, "vae/diffusion_pytorch_model.fp16.safetensors",
              approx="about 196 MB", note=_GATED),
)

# Where each component may sit in a ComfyUI models folder (patterns are matched case-insensitively).
COMFY_STAR = ("STAR",)
COMFY_VAE = ("vae",)
COMFY_TEXT = ("text_encoders", "clip")
_WEIGHT_EXT = (".pt", ".pth", ".ckpt", ".safetensors", ".bin")
_VAE_NAMES = ("*svd*", "*stable*video*", "*video*vae*", "*temporal*")
_TEXT_NAMES = ("open_clip_pytorch_model*", "*vit-h*", "*vit_h*", "*clip_h*", "*clip-h*", "*sd2*", "*sd21*")


@dataclass(frozen=True)
class ResolvedModels:
    """Local paths of everything a run loads.

    Parameters:
        star: the STAR checkpoint file.
        vae: a diffusers VAE folder or a single SVD-layout .safetensors.
        text_encoder: the CLIP-H text encoder file or folder.
        tokenizer: a folder with vocab.json + merges.txt, or None to let the text module find its vocabulary.
    """

    star: Path
    vae: Path
    text_encoder: Path
    tokenizer: Path | None


class ModelsMissingError(RuntimeError):
    """Raised with one message that lists every missing file and where it goes."""


def default_cache_dir() -> Path:
    """``$STAR_VSR_CACHE`` or ``~/.cache/star_vsr``: where downloads land (one folder per repository)."""
    return Path(os.environ.get("STAR_VSR_CACHE", Path.home() / ".cache" / "star_vsr"))


def sha256_of(path: Path) -> str:
    """SHA-256 hex digest of a file, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _matches(path: Path, patterns: tuple[str, ...]) -> bool:
    name = path.name.lower()
    return any(fnmatch(name, pattern) for pattern in patterns)


def _comfy_candidates(models_dir: Path, subdirs: tuple[str, ...]) -> list[Path]:
    found: list[Path] = []
    for sub in subdirs:
        folder = models_dir / sub
        if folder.is_dir():
            found.extend(sorted(folder.iterdir()))
    return found


def find_comfy_star(models_dir: Path, model: str) -> Path | None:
    """The STAR checkpoint for ``model`` ("light"/"heavy") in ``models_dir/STAR``: the file whose name holds it."""
    files = [p for p in _comfy_candidates(models_dir, COMFY_STAR) if p.is_file() and p.suffix.lower() in _WEIGHT_EXT]
    named = [p for p in files if model in p.name.lower()]
    return named[0] if named else None


def find_misplaced_star(models_dir: Path, model: str) -> list[Path]:
    """STAR checkpoints for ``model`` put in another folder of a ComfyUI models folder (e.g. ``checkpoints/``):
    weight files named like the released ones (``light_deg.pt``) or holding both "star" and ``model``."""
    def is_star(path: Path) -> bool:
        name = path.name.lower()
        return path.is_file() and path.suffix.lower() in _WEIGHT_EXT and (
            f"{model}_deg" in name or ("star" in name and model in name))

    others = [p for p in sorted(models_dir.iterdir()) if p.is_dir() and p.name not in COMFY_STAR]
    return [path for folder in others for path in sorted(folder.iterdir()) if is_star(path)]


def folder_listing(folder: Path, limit: int = 20) -> str:
    """What a folder holds, for an error message: ``F holds 'a.pt', 'b.pt'`` (``limit`` names at most), ``F is
    empty`` or ``F does not exist``."""
    if not folder.is_dir():
        return f"{folder} does not exist"
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    if not names:
        return f"{folder} is empty"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{folder} holds " + ", ".join(f"'{n}'" for n in names[:limit]) + more


def find_comfy_vae(models_dir: Path) -> Path | None:
    """An SVD temporal VAE in ``models_dir/vae``: a diffusers folder or a .safetensors whose name says SVD/video."""
    for path in _comfy_candidates(models_dir, COMFY_VAE):
        if not _matches(path, _VAE_NAMES):
            continue
        if path.is_dir() and (path / "config.json").is_file():
            return path
        if path.is_file() and path.suffix.lower() == ".safetensors":
            return path
    return None


def find_comfy_text_encoder(models_dir: Path) -> Path | None:
    """An SD2 / OpenCLIP ViT-H-14 text encoder in ``models_dir/text_encoders`` or ``models_dir/clip``."""
    for path in _comfy_candidates(models_dir, COMFY_TEXT):
        if _matches(path, _TEXT_NAMES) and (path.is_dir() or path.suffix.lower() in _WEIGHT_EXT):
            return path
    return None


def find_comfy_tokenizer(models_dir: Path) -> Path | None:
    """A folder with vocab.json + merges.txt next to the text encoders (e.g. ``text_encoders/tokenizer``)."""
    for path in _comfy_candidates(models_dir, COMFY_TEXT):
        if path.is_dir() and (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return path
    return None


def _cached_openclip_vocab(cache_dir: Path) -> Path | None:
    """open_clip's BPE vocab when the text module has already cached it (the same tokenizer as the HF files)."""
    from .text.vocab import find_openclip_vocab

    return find_openclip_vocab(cache_dir)


def _hub_expectation(spec: ModelFile, endpoint: str | None, token: str | bool | None) -> tuple[int | None, str | None]:
    """Size and SHA-256 to check a download against: pinned values, else what the hub reports for the file."""
    if spec.size is not None or spec.sha256 is not None:
        return spec.size, spec.sha256
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    meta = get_hf_file_metadata(hf_hub_url(spec.repo_id, spec.filename, endpoint=endpoint), token=token,
                                endpoint=endpoint)
    etag = (meta.etag or "").strip('"').lower()
    # LFS files carry their SHA-256 as etag; small git files carry a git blob SHA-1 (40 hex), not checkable here
    return meta.size, etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None


def verify_file(path: Path, size: int | None, sha256: str | None) -> None:
    """Raise ValueError when ``path`` does not have the expected size / SHA-256 (each check only when given)."""
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise ValueError(f"{path} is {actual:,} bytes but {size:,} were expected: the file is incomplete or a "
                         "different file")
    if sha256 is not None and sha256_of(path) != sha256.lower():
        raise ValueError(f"{path} does not have the expected SHA-256 {sha256}: the file is corrupt or a different file")


def _free_bytes(folder: Path) -> int:
    """Free space on the disk that holds ``folder`` (or its nearest existing parent)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def download_file(spec: ModelFile, cache_dir: Path, *, endpoint: str | None = None,
                  token: str | bool | None = None) -> Path:
    """Download ``spec`` into ``cache_dir`` (resuming a dropped connection), verify it, then give it its name.

    Parameters:
        spec: the file.
        cache_dir: cache root; the file lands at ``cache_dir/<repo_id>/<filename>``.
        endpoint: hub URL (default: ``$HF_ENDPOINT`` or huggingface.co); tests point it at a local server.
        token: Hugging Face token for gated repositories (default: the logged-in token / ``$HF_TOKEN``).

    Returns:
        The verified local path, ``spec.cache_path(cache_dir)``. A file that fails verification is deleted and
        ValueError is raised; OSError (full disk, read-only cache) propagates with no file at the final name.
    """
    from huggingface_hub import hf_hub_download

    size, sha256 = _hub_expectation(spec, endpoint, token)
    staging = cache_dir / STAGING / spec.repo_id
    if size is not None and _free_bytes(cache_dir) < size:
        raise OSError(errno.ENOSPC, f"{size:,} bytes needed but only {_free_bytes(cache_dir):,} free", str(cache_dir))
    staged = Path(hf_hub_download(spec.repo_id, spec.filename, local_dir=staging, endpoint=endpoint, token=token))
    try:
        verify_file(staged, size, sha256)
    except ValueError:
        staged.unlink(missing_ok=True)
        raise
    final = spec.cache_path(cache_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, final)
    return final


def _cached_or_downloaded(spec: ModelFile, cache_dir: Path, offline: bool, endpoint: str | None,
                          problems: list[tuple[ModelFile, str]]) -> Path | None:
    cached = spec.cache_path(cache_dir)
    try:
        if cached.is_file():
            verify_file(cached, spec.size, None)  # a full hash of a multi-GB file on every run is too slow
            return cached
        if offline:
            problems.append((spec, "offline (HF_HUB_OFFLINE=1 or --offline), so nothing was downloaded"))
            return None
        return download_file(spec, cache_dir, endpoint=endpoint)
    except Exception as exc:  # network down, gated repository, full disk, failed verification: reported together
        problems.append((spec, _short_reason(exc, spec, cache_dir)))
        return None


def _short_reason(exc: Exception, spec: ModelFile, cache_dir: Path) -> str:
    name = type(exc).__name__
    if name == "GatedRepoError":
        return _GATED
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return (f"the disk holding {cache_dir} is full ({exc.strerror}); free {spec.size_text()} there, or pass "
                f"--cache-dir (or set STAR_VSR_CACHE) to a folder on a larger disk")
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"cannot write in the cache folder {cache_dir} ({exc.strerror}: {exc.filename}); pass "
                f"--cache-dir (or set STAR_VSR_CACHE) to a writable folder, or put the file there yourself")
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{name}: {first_line[:160]}" if first_line else name


def _missing_message(problems: list[tuple[ModelFile, str]], cache_dir: Path, comfy: Path | None,
                     notes: list[str] = ()) -> str:
    lines = ["Some model files are missing and could not be downloaded. Put each file at the path shown "
             "(or pass it explicitly, see --help), then run again:"]
    for spec, reason in problems:
        where = spec.cache_path(cache_dir)
        lines.append(f"  - {spec.label}: {spec.url}")
        lines.append(f"      expected size: {spec.size_text()}")
        lines.append(f"      put it at: {where}")
        lines.append(f"      why missing: {reason}")
        if spec.note and spec.note != reason:
            lines.append(f"      note: {spec.note}")
    if comfy is not None:
        lines.append(f"A ComfyUI models folder was searched too ({comfy}): STAR checkpoints go in STAR/ "
                     "(name containing 'light' or 'heavy'), the SVD VAE in vae/ (a diffusers folder or "
                     ".safetensors with 'svd' in its name), the CLIP-H text encoder in text_encoders/ or clip/.")
    lines.extend(notes)
    return "\n".join(lines)


def resolve_models(model: str = "light", *, vae: str | Path | None = None,
                   text_encoder: str | Path | None = None, tokenizer: str | Path | None = None,
                   comfy_models: str | Path | None = None, cache_dir: str | Path | None = None,
                   offline: bool = False, endpoint: str | None = None) -> ResolvedModels:
    """Resolve every model file of a run, downloading what is missing unless ``offline``.

    Parameters:
        model: "light", "heavy" or a path to a STAR checkpoint.
        vae, text_encoder, tokenizer: explicit paths (must exist), or None to search.
        comfy_models: a ComfyUI ``models`` folder to search first.
        cache_dir: download cache (default `default_cache_dir()`).
        offline: never touch the network (also implied by ``HF_HUB_OFFLINE=1``).
        endpoint: hub URL override (tests use a local fake hub).

    Returns:
        A `ResolvedModels`. Raises FileNotFoundError for an explicit path that does not exist, and
        `ModelsMissingError` (listing every missing file) when something could not be found or downloaded.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    comfy = Path(comfy_models) if comfy_models is not None else None
    if comfy is not None and not comfy.is_dir():
        raise FileNotFoundError(f"--comfy-models {comfy} is not a folder: pass ComfyUI's models directory")
    offline = offline or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    problems: list[tuple[ModelFile, str]] = []

    def explicit(value: str | Path | None, flag: str) -> Path | None:
        if value is None:
            return None
        path = Path(value)
        if not path.exists():
            raise FileNotFoundError(f"{flag} {path} does not exist: check the path ({folder_listing(path.parent)})")
        return path

    notes: list[str] = []
    if model in STAR_CHECKPOINTS:
        star = comfy and find_comfy_star(comfy, model)
        star = star or _cached_or_downloaded(STAR_CHECKPOINTS[model], cache, offline, endpoint, problems)
        if not star and comfy is not None:
            folder = comfy / COMFY_STAR[0]
            notes.append(f"No '{model}' checkpoint in the ComfyUI STAR folder: {folder_listing(folder)}.")
            notes.extend(f"'{path.name}' is in {path.parent} (the '{path.parent.name}' folder): move it to "
                         f"{folder}." for path in find_misplaced_star(comfy, model))
    else:
        star = explicit(model, "--model")

    vae_path = explicit(vae, "--vae") or (comfy and find_comfy_vae(comfy))
    if not vae_path:
        parts = [_cached_or_downloaded(spec, cache, offline, endpoint, problems) for spec in VAE_FILES]
        vae_path = parts[0].parent if all(parts) else None

    text_path = explicit(text_encoder, "--text-encoder") or (comfy and find_comfy_text_encoder(comfy))
    text_path = text_path or _cached_or_downloaded(TEXT_ENCODER, cache, offline, endpoint, problems)

    tok_path = explicit(tokenizer, "--tokenizer") or (comfy and find_comfy_tokenizer(comfy)) \
        or _cached_openclip_vocab(cache)
    if not tok_path:
        parts = [_cached_or_downloaded(spec, cache, offline, endpoint, problems) for spec in TOKENIZER_FILES]
        tok_path = parts[0].parent if all(parts) else None

    if problems:
        raise ModelsMissingError(_missing_message(problems, cache, comfy, notes))
    return ResolvedModels(star, vae_path, text_path, tok_path)
