"""Checkpoint loading: accepted layouts and dtypes, key checks, refusal of unsafe or broken files, conversion."""
from __future__ import annotations

import logging
import pickle
import re
import struct
import zipfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from star_core.checkpoint import (
    VENHANCER_EXTRA_KEYS, check_star_checkpoint, check_star_keys, load_star_model, load_state_dict_file,
)
from star_core.convert import main as convert_main
from star_core.model import config_from_state_dict


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_sd(fixtures_dir) -> dict[str, torch.Tensor]:
    return load_file(str(fixtures_dir / "tiny_state_dict.safetensors"))


def _assert_weights(model, sd, dtype):
    loaded = model.state_dict()
    assert set(loaded) == set(sd)
    for key, value in sd.items():
        assert loaded[key].dtype == dtype, key
        assert torch.equal(loaded[key], value.to(dtype)), key


def test_plain_pt(tmp_path, tiny_sd):
    path = tmp_path / "plain.pt"
    torch.save(tiny_sd, path)
    model = load_star_model(path)
    _assert_weights(model, tiny_sd, torch.float32)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_wrapped_ckpt(tmp_path, tiny_sd):
    path = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": tiny_sd, "epoch": 3}, path)
    assert set(load_state_dict_file(path)) == set(tiny_sd)
    _assert_weights(load_star_model(path), tiny_sd, torch.float32)


def test_safetensors_and_dtype_choice(fixtures_dir, tiny_sd):
    path = fixtures_dir / "tiny_state_dict.safetensors"
    _assert_weights(load_star_model(path, dtype=torch.bfloat16), tiny_sd, torch.bfloat16)


def test_fp16_stored(tmp_path, tiny_sd):
    half = {k: v.half() for k, v in tiny_sd.items()}
    path = tmp_path / "half.pth"
    torch.save(half, path)
    _assert_weights(load_star_model(path), half, torch.float16)  # default: keep the stored dtype
    _assert_weights(load_star_model(path, dtype=torch.float32), half, torch.float32)


def test_venhancer_extras_dropped(tmp_path, tiny_sd, caplog):
    sd = dict(tiny_sd)
    for key in VENHANCER_EXTRA_KEYS:
        sd[key] = torch.zeros(3)
    path = tmp_path / "venhancer_derived.pt"
    torch.save(sd, path)
    with caplog.at_level(logging.INFO, logger="star_core.checkpoint"):
        model = load_star_model(path)
    assert "dropping 6 VEnhancer-only tensors" in caplog.text
    assert not set(VENHANCER_EXTRA_KEYS) & set(model.state_dict())
    _assert_weights(model, tiny_sd, torch.float32)


def test_wrong_model_is_described(fixtures_dir):
    with pytest.raises(ValueError, match=r"vae_tiny\.safetensors is not a STAR I2VGen-XL checkpoint: it looks like "
                                         r"the SVD temporal-decoder VAE \(diffusers layout\) \(2247 of 2247 expected "
                                         r"keys missing, e\.g\. .*STAR needs its own checkpoint, light_deg\.pt"):
        load_star_model(fixtures_dir / "vae_tiny.safetensors")


def test_missing_and_unexpected_keys(tiny_sd):
    config = config_from_state_dict(tiny_sd)
    sd = {k: v for k, v in tiny_sd.items() if "local2" not in k}
    with pytest.raises(ValueError, match=r"the state dict is an incomplete or modified STAR checkpoint: "
                                         r"12 of 1086 expected keys missing, "
                                         r"e\.g\. \['input_blocks\.0\.1\.transformer_blocks\.0\.local2"):
        check_star_keys(sd, config)
    prefixed = {f"module.{k}": v for k, v in tiny_sd.items()}
    with pytest.raises(ValueError, match=r"every key carries the extra prefix 'module\.' \(a STAR checkpoint saved "
                                         r"from a wrapper\); remove that prefix from the keys \(1086 of 1086 expected"):
        check_star_keys(prefixed, config)
    with pytest.raises(ValueError, match=r"1 unexpected keys, e\.g\. \['module\.extra'\]"):
        check_star_keys({**tiny_sd, "module.extra": torch.zeros(1)}, config)
    bad = {**tiny_sd, "out.2.bias": torch.zeros(5)}
    with pytest.raises(ValueError, match=r"does not match the STAR architecture .*out\.2\.bias \(5,\) \(expected \(4,\)\)"):
        check_star_keys(bad, config)


def test_truncated_files(tmp_path, fixtures_dir, tiny_sd):
    full = tmp_path / "full.pt"
    torch.save(tiny_sd, full)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*cut\.pt \(truncated or corrupt\?\)"):
        load_star_model(cut)
    blob = (fixtures_dir / "tiny_state_dict.safetensors").read_bytes()
    cut_st = tmp_path / "cut.safetensors"
    cut_st.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"cannot read .*cut\.safetensors as safetensors \(truncated"):
        load_star_model(cut_st)


def _safetensors_header(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


BROKEN_FILES = {
    "empty.pt": (b"", r"is empty \(0 bytes\): the download or copy did not finish"),
    "empty.safetensors": (b"", r"is empty \(0 bytes\)"),
    "error_page.pt": (b"<!DOCTYPE html><html><body>403 Forbidden</body></html>",
                      r"is not a torch checkpoint: it starts with b'<!DOCTYPE ht' \(an HTML/XML page"),
    "notes.ckpt": (b"these are not weights\n" * 4, r"is not a torch checkpoint: .*\(text\)"),
    "noise.pth": (bytes(range(7, 250)) * 8, r"is not a torch checkpoint: .*\(unknown binary data\)"),
    "not_torch.pt": (None, r"cannot read checkpoint .* \(truncated or corrupt\?\)"),
    "bad_json.safetensors": (_safetensors_header(b'{"w": {"dtype": "F32", "shape": [2]'),
                             r"as safetensors \(truncated, corrupt header .*invalid JSON"),
    "huge_header.safetensors": (struct.pack("<Q", 10**12) + b"{}", r"as safetensors .*header too large"),
    "short_data.safetensors": (_safetensors_header(b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}',
                                                   b"\0" * 8), r"as safetensors .*not fully covered"),
}


@pytest.mark.parametrize("name", sorted(BROKEN_FILES))
def test_broken_files_name_the_file_and_load_nothing(tmp_path, name):
    content, message = BROKEN_FILES[name]
    path = tmp_path / name
    if content is None:  # a zip archive that is not a torch.save archive
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("readme.txt", "hello")
    else:
        path.write_bytes(content)
    for load in (load_star_model, check_star_checkpoint, load_state_dict_file):
        with pytest.raises(ValueError, match=message) as info:
            load(path)
        assert str(path) in str(info.value)


class _Payload:
    """Unpickling this would create a file: proof that code from the checkpoint ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("writer", ["torch_save", "raw_pickle"])
def test_malicious_pickle_refused(tmp_path, tiny_sd, writer):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    obj = {"state_dict": {"out.2.bias": tiny_sd["out.2.bias"]}, "payload": _Payload(marker)}
    if writer == "torch_save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(ValueError, match=r"refusing to load .*evil\.pt: unpickling it would call [\w.]+, "
                                         r"i\.e\. run code from the file .*nothing of it was run"):
        load_star_model(path)
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"refusing to load"):  # the node and converter read files the same way
        load_state_dict_file(path)
    assert not marker.exists()


def test_protocol_0_pickle_is_refused_unrun(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "old.pt"
    path.write_bytes(pickle.dumps(_Payload(marker), protocol=0))
    with pytest.raises(ValueError, match=r"old\.pt is not a torch checkpoint"):
        load_star_model(path)
    assert not marker.exists()


def test_missing_and_unsupported_files(tmp_path, tiny_sd):
    with pytest.raises(FileNotFoundError, match="light_deg.pt"):
        load_state_dict_file(tmp_path / "nope.pt")
    other = tmp_path / "weights.npz"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"unsupported file type '\.npz'"):
        load_state_dict_file(other)
    with pytest.raises(ValueError, match="dtype must be"):
        load_star_model(tiny_sd, dtype=torch.int8)


@pytest.mark.parametrize("flag, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_convert_round_trip(tmp_path, tiny_sd, flag, dtype, capsys):
    src = tmp_path / "light_deg.pt"
    sd = dict(tiny_sd, **{k: torch.zeros(2) for k in VENHANCER_EXTRA_KEYS})
    torch.save({"state_dict": sd}, src)
    dst = tmp_path / "star.safetensors"
    assert convert_main([str(src), str(dst), "--dtype", flag]) == 0
    assert "wrote" in capsys.readouterr().out
    with safe_open(str(dst), "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(tiny_sd)
    assert meta["dtype"] == str(dtype).removeprefix("torch.") and meta["source"] == "light_deg.pt"
    assert '"dim": 32' in meta["star_config"]
    _assert_weights(load_star_model(dst), tiny_sd, dtype)
    assert not (tmp_path / "star.safetensors.partial").exists()


def test_convert_errors(tmp_path, fixtures_dir, capsys):
    assert convert_main([str(fixtures_dir / "vae_tiny.safetensors"), str(tmp_path / "o.safetensors")]) == 2
    assert "not a STAR I2VGen-XL checkpoint" in capsys.readouterr().err
    assert convert_main([str(tmp_path / "missing.pt"), str(tmp_path / "o.safetensors")]) == 2
    assert not (tmp_path / "o.safetensors").exists()
    src = tmp_path / "a.safetensors"
    save_file({"x": torch.zeros(1)}, str(src))
    assert convert_main([str(src), str(tmp_path / "o.pt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err


# Relative max|Δ| of the tiny forward against the official fp32 output, measured 2.4e-3 / 1.2e-3 (fp16 stored,
# computed in fp16 / fp32) and 2.3e-2 / 1.1e-2 (bf16); the bounds leave about 2x headroom.
HALF_TOLERANCES = {(torch.float16, None): 1e-2, (torch.float16, torch.float32): 5e-3,
                   (torch.bfloat16, None): 5e-2, (torch.bfloat16, torch.float32): 3e-2}


@pytest.mark.parametrize("stored, dtype", sorted(HALF_TOLERANCES, key=str))
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_half_stored_checkpoints_load_and_match_fp32(tmp_path, fixtures_dir, tiny_sd, stored, dtype, suffix):
    from star_core.verify.forward import fixture_config

    path = tmp_path / f"half{suffix}"
    half = {k: v.to(stored) for k, v in tiny_sd.items()}
    save_file(half, str(path)) if suffix == ".safetensors" else torch.save(half, path)
    model = load_star_model(path, dtype=dtype, config=fixture_config(fixtures_dir, tiny_sd))
    assert model.dtype == (dtype or stored)
    data = load_file(str(fixtures_dir / "tiny_forward.safetensors"))
    with torch.inference_mode():
        out = model(data["x_t"], data["t"], data["y"], data["hint"]).float()
    assert torch.isfinite(out).all()
    rel = ((out - data["out"]).abs().max() / data["out"].abs().max()).item()
    assert rel <= HALF_TOLERANCES[(stored, dtype)], rel
