"""Model resolution and downloads, against a local fake Hugging Face hub (no internet)."""
from __future__ import annotations

import hashlib
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from star_core import download
from star_core.download import ModelFile, ModelsMissingError, resolve_models

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Serves ``/{repo}/resolve/{rev}/{path}`` with the headers huggingface_hub reads (LFS etag = SHA-256).

    ``cut_first_get`` closes the connection halfway through the first GET of each file, to exercise resume;
    ``advertised`` overrides the SHA-256 announced for a file (a corrupt transfer).
    """

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[tuple[str, str, str | None]] = []
        self.cut_first_get = False
        self.advertised: dict[str, str] = {}
        self._cut_done: set[str] = set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def _lookup(self) -> tuple[str, bytes] | None:
                parts = self.path.split("?")[0].lstrip("/").split("/")
                if "resolve" not in parts:
                    return None
                i = parts.index("resolve")
                key = "/".join(parts[:i]) + ":" + "/".join(parts[i + 2:])
                return (key, hub.files[key]) if key in hub.files else None

            def _headers(self, key: str, body: bytes, status: int, length: int) -> None:
                self.send_response(status)
                sha = hub.advertised.get(key, hashlib.sha256(body).hexdigest())
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{sha}"')
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(body)))
                self.send_header("Content-Length", str(length))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

            def do_HEAD(self) -> None:
                hub.requests.append(("HEAD", self.path, None))
                found = self._lookup()
                if found is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._headers(found[0], found[1], 200, len(found[1]))

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                hub.requests.append(("GET", self.path, rng))
                found = self._lookup()
                if found is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                key, body = found
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                part = body[start:]
                self._headers(key, body, 206 if rng else 200, len(part))
                if hub.cut_first_get and key not in hub._cut_done:
                    hub._cut_done.add(key)
                    self.wfile.write(part[: len(part) // 2])
                    self.wfile.flush()
                    self.connection.close()
                    return
                self.wfile.write(part)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def _all_files() -> dict[str, bytes]:
    specs = [download.STAR_CHECKPOINTS["light"], download.TEXT_ENCODER, *download.TOKENIZER_FILES,
             *download.VAE_FILES]
    return {f"{s.repo_id}:{s.filename}": (s.filename.encode() * 5000) for s in specs}


@pytest.fixture()
def hub():
    server = FakeHub(_all_files())
    yield server
    server.close()


def test_download_all_from_fake_hub_verifies_and_lays_out_cache(hub: FakeHub, tmp_path: Path) -> None:
    models = resolve_models("light", cache_dir=tmp_path, endpoint=hub.endpoint)
    light = download.STAR_CHECKPOINTS["light"]
    assert models.star == tmp_path / "SherryX/STAR/I2VGen-XL-based/light_deg.pt"
    assert models.star.read_bytes() == hub.files[f"{light.repo_id}:{light.filename}"]
    assert models.vae == tmp_path / "stabilityai/stable-video-diffusion-img2vid/vae"
    assert (models.vae / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert models.text_encoder.name == "open_clip_pytorch_model.bin"
    assert (models.tokenizer / "vocab.json").is_file() and (models.tokenizer / "merges.txt").is_file()
    gets = [r for r in hub.requests if r[0] == "GET"]
    assert len(gets) == 6
    # a second run is served from the cache without any request
    hub.requests.clear()
    assert resolve_models("light", cache_dir=tmp_path, offline=True) == models
    assert hub.requests == []


def test_interrupted_download_resumes_with_range_request(hub: FakeHub, tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    # small read blocks so the bytes received before the cut are kept (real files are far above 10 MiB)
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    hub.cut_first_get = True
    spec = download.STAR_CHECKPOINTS["light"]
    path = download.download_file(spec, tmp_path, endpoint=hub.endpoint)
    body = hub.files[f"{spec.repo_id}:{spec.filename}"]
    assert path.read_bytes() == body
    ranges = [r[2] for r in hub.requests if r[0] == "GET"]
    assert ranges[0] is None and ranges[1] is not None
    resumed_from = int(ranges[1].split("=")[1].split("-")[0])
    assert 0 < resumed_from < len(body)


def test_corrupt_download_is_deleted_and_reported(hub: FakeHub, tmp_path: Path) -> None:
    spec = download.STAR_CHECKPOINTS["light"]
    hub.advertised[f"{spec.repo_id}:{spec.filename}"] = "ab" * 32
    with pytest.raises(ValueError, match="expected SHA-256"):
        download.download_file(spec, tmp_path, endpoint=hub.endpoint)
    assert not spec.cache_path(tmp_path).exists()


def test_pinned_size_mismatch_is_refused(hub: FakeHub, tmp_path: Path) -> None:
    real = download.STAR_CHECKPOINTS["light"]
    pinned = ModelFile(real.label, real.repo_id, real.filename, size=123)
    with pytest.raises(ValueError, match="123 were expected"):
        download.download_file(pinned, tmp_path, endpoint=hub.endpoint)
    assert not pinned.cache_path(tmp_path).exists()


def test_offline_lists_every_missing_file_with_size_and_place(tmp_path: Path) -> None:
    with pytest.raises(ModelsMissingError) as info:
        resolve_models("heavy", cache_dir=tmp_path, offline=True)
    text = str(info.value)
    for spec in (download.STAR_CHECKPOINTS["heavy"], download.TEXT_ENCODER, *download.TOKENIZER_FILES,
                 *download.VAE_FILES):
        assert spec.url in text and str(spec.cache_path(tmp_path)) in text
    assert text.count("expected size: size not known here") == 6
    assert "offline" in text
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_unreachable_hub_gives_the_same_single_message(tmp_path: Path) -> None:
    with pytest.raises(ModelsMissingError, match="light_deg.pt") as info:
        resolve_models("light", cache_dir=tmp_path, endpoint="http://127.0.0.1:9")
    assert str(info.value).count("why missing") == 6


def test_comfy_models_folder_is_used_before_downloading(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "STAR").mkdir(parents=True)
    (models / "STAR" / "star_light_deg.safetensors").write_bytes(b"x")
    (models / "vae" / "svd_vae").mkdir(parents=True)
    (models / "vae" / "svd_vae" / "config.json").write_text("{}")
    (models / "text_encoders" / "tokenizer").mkdir(parents=True)
    (models / "text_encoders" / "tokenizer" / "vocab.json").write_text("{}")
    (models / "text_encoders" / "tokenizer" / "merges.txt").write_text("")
    (models / "text_encoders" / "sd2_clip_h.safetensors").write_bytes(b"x")
    found = resolve_models("light", comfy_models=models, cache_dir=tmp_path / "cache", offline=True)
    assert found.star == models / "STAR" / "star_light_deg.safetensors"
    assert found.vae == models / "vae" / "svd_vae"
    assert found.text_encoder == models / "text_encoders" / "sd2_clip_h.safetensors"
    assert found.tokenizer == models / "text_encoders" / "tokenizer"
    with pytest.raises(ModelsMissingError, match="heavy_deg.pt"):
        resolve_models("heavy", comfy_models=models, cache_dir=tmp_path / "cache", offline=True)


def test_explicit_paths_must_exist(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--model .*does not exist"):
        resolve_models(str(tmp_path / "nope.pt"), offline=True, cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="--comfy-models"):
        resolve_models("light", comfy_models=tmp_path / "nothing", cache_dir=tmp_path)


# --- faults: full disk, read-only cache, interruption (issue #11, row 21) ------------------------------------------

def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _final_files(root: Path) -> list[Path]:
    """Files at a final cache name (outside the staging folder and huggingface_hub's own bookkeeping)."""
    return [p for p in _files(root) if download.STAGING not in p.parts and ".cache" not in p.parts]


def _cut_transfer(monkeypatch, exc: BaseException) -> list[int]:
    """Make every transfer write half of the file, then fail with ``exc`` (as a full disk or Ctrl-C would)."""
    import huggingface_hub.file_download as fd

    real = fd.http_get
    written: list[int] = []

    def failing_http_get(url, temp_file, **kwargs):
        class HalfThenFail:
            def __init__(self, inner, limit):
                self.inner, self.limit, self.count = inner, limit, 0

            def write(self, chunk):
                if self.count + len(chunk) > self.limit:
                    written.append(self.count)
                    raise exc
                self.count += len(chunk)
                return self.inner.write(chunk)

            def __getattr__(self, name):
                return getattr(self.inner, name)

        return real(url, HalfThenFail(temp_file, (kwargs.get("expected_size") or 2) // 2), **kwargs)

    monkeypatch.setattr(fd, "http_get", failing_http_get)
    return written


def test_disk_full_during_download_is_reported_and_leaves_no_file(hub: FakeHub, tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    written = _cut_transfer(monkeypatch, OSError(28, "No space left on device"))
    with pytest.raises(ModelsMissingError) as info:
        resolve_models("light", cache_dir=tmp_path, endpoint=hub.endpoint)
    text = str(info.value)
    assert written and text.count(f"the disk holding {tmp_path} is full (No space left on device)") == 6
    assert "pass --cache-dir (or set STAR_VSR_CACHE) to a folder on a larger disk" in text
    assert _final_files(tmp_path) == [] and not [p for p in _files(tmp_path) if p.suffix == ".incomplete"]
    monkeypatch.undo()  # space freed: the next run downloads and verifies everything
    models = resolve_models("light", cache_dir=tmp_path, endpoint=hub.endpoint)
    spec = download.STAR_CHECKPOINTS["light"]
    assert models.star.read_bytes() == hub.files[f"{spec.repo_id}:{spec.filename}"]


def test_too_little_free_space_is_refused_before_downloading(hub: FakeHub, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000, total=10**9, used=0))
    with pytest.raises(ModelsMissingError, match=r"is full \(.*bytes needed but only 1,000 free"):
        resolve_models("light", cache_dir=tmp_path, endpoint=hub.endpoint)
    assert not [r for r in hub.requests if r[0] == "GET"] and _files(tmp_path) == []


@pytest.fixture()
def read_only(monkeypatch):
    """Makes a folder read-only: chmod, and (as root, where chmod does not stop writes) refusing the writes."""
    import builtins
    import io

    def apply(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        if os.geteuid() != 0:
            return
        inside = lambda path: str(Path(path).absolute()).startswith(str(folder))  # noqa: E731
        denied = lambda path: PermissionError(13, "Permission denied", str(path))  # noqa: E731

        def guard(real, is_write):
            def wrapper(path, *args, **kwargs):
                if isinstance(path, (str, os.PathLike)) and inside(path) and is_write(args, kwargs):
                    raise denied(path)
                return real(path, *args, **kwargs)
            return wrapper

        writes_mode = lambda args, kw: any(c in (args[0] if args else kw.get("mode", "r")) for c in "wax+")  # noqa: E731
        writes_flags = lambda args, kw: bool((args[0] if args else kw.get("flags", 0)) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))  # noqa: E731
        monkeypatch.setattr(builtins, "open", guard(builtins.open, writes_mode))
        monkeypatch.setattr(io, "open", guard(io.open, writes_mode))
        monkeypatch.setattr(os, "open", guard(os.open, writes_flags))
        monkeypatch.setattr(os, "mkdir", guard(os.mkdir, lambda args, kw: True))

    yield apply


def test_read_only_cache_is_reported_and_nothing_is_written(hub: FakeHub, tmp_path: Path, read_only) -> None:
    cache = tmp_path / "cache"
    read_only(cache)
    try:
        with pytest.raises(ModelsMissingError) as info:
            resolve_models("light", cache_dir=cache, endpoint=hub.endpoint)
    finally:
        cache.chmod(0o755)
    text = str(info.value)
    assert text.count(f"cannot write in the cache folder {cache} (Permission denied") == 6, text
    assert "pass --cache-dir (or set STAR_VSR_CACHE) to a writable folder" in text
    assert _files(cache) == []


def test_interrupted_download_leaves_nothing_a_later_run_trusts(hub: FakeHub, tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    spec = download.STAR_CHECKPOINTS["light"]
    _cut_transfer(monkeypatch, KeyboardInterrupt())  # Ctrl-C halfway through the transfer
    with pytest.raises(KeyboardInterrupt):
        download.download_file(spec, tmp_path, endpoint=hub.endpoint)
    assert _final_files(tmp_path) == []
    monkeypatch.undo()
    with pytest.raises(ModelsMissingError, match="light_deg.pt"):  # offline, the half file is not taken for a model
        resolve_models("light", cache_dir=tmp_path, offline=True)
    assert download.download_file(spec, tmp_path, endpoint=hub.endpoint).read_bytes() == \
        hub.files[f"{spec.repo_id}:{spec.filename}"]


def test_killed_during_verification_leaves_no_trusted_file(hub: FakeHub, tmp_path: Path, monkeypatch) -> None:
    spec = download.STAR_CHECKPOINTS["light"]
    real = download.sha256_of

    def killed(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(download, "sha256_of", killed)  # the multi-GB hash takes a while: Ctrl-C lands there
    with pytest.raises(KeyboardInterrupt):
        download.download_file(spec, tmp_path, endpoint=hub.endpoint)
    assert not spec.cache_path(tmp_path).exists()
    with pytest.raises(ModelsMissingError):
        resolve_models("light", cache_dir=tmp_path, offline=True)
    monkeypatch.setattr(download, "sha256_of", real)
    hub.requests.clear()
    path = download.download_file(spec, tmp_path, endpoint=hub.endpoint)  # verifies the complete staged file
    assert path == spec.cache_path(tmp_path) and path.read_bytes() == hub.files[f"{spec.repo_id}:{spec.filename}"]
    assert not [r for r in hub.requests if r[0] == "GET"]  # nothing downloaded twice
