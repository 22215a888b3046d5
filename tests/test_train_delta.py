"""Fine-tunes stored as delta checkpoints: save, detection, merge onto the base, errors, the Model Loader node."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from star_core.checkpoint import load_star_model, load_state_dict_file, read_delta_metadata, save_delta
from star_core.convert import convert_checkpoint
from star_core.tiny_models import FILES, write_tree
from star_core.train.network import is_trainable

sys.path.insert(0, str(Path(__file__).parent / "comfy_stub"))
import harness  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def models(tmp_path) -> Path:
    write_tree(tmp_path / "models", ["star"])
    return tmp_path / "models"


def _finetuned(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A stand-in fine-tune: every ControlNet / LIEM tensor shifted (what training changes)."""
    g = torch.Generator().manual_seed(5)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items() if is_trainable(k)}


def _forward(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, hint = torch.randn(1, 4, 2, 10, 8, generator=g), torch.randn(1, 4, 2, 10, 8, generator=g)
    with torch.inference_mode():
        return model(x, torch.tensor([500]), torch.randn(1, 77, 1024, generator=g), hint)


def test_delta_round_trip_through_checkpoint(models, tmp_path):
    base_path = models / FILES["star"]
    base = load_state_dict_file(base_path)
    delta = _finetuned(base)
    out = save_delta(models / "STAR" / "my_finetune.safetensors", delta, base_path, {"star_train": "{}"})
    meta = read_delta_metadata(out)
    assert meta["star_base_name"] == base_path.name and int(meta["star_base_size"]) == base_path.stat().st_size
    with safe_open(str(out), "pt") as f:
        assert sorted(f.keys()) == sorted(delta) and len(delta) < len(base)
    assert read_delta_metadata(base_path) is None
    merged = load_state_dict_file(out)
    assert set(merged) == set(base)
    assert all(torch.equal(merged[k], delta[k] if k in delta else base[k]) for k in base)
    assert not torch.allclose(_forward(load_star_model(out)), _forward(load_star_model(base_path)), atol=1e-3)
    # --merge: the delta written out as a full checkpoint
    full = convert_checkpoint(out, tmp_path / "merged.safetensors", torch.float32)
    assert full["source"] == out.name
    assert torch.equal(load_state_dict_file(tmp_path / "merged.safetensors")["out.2.weight"], base["out.2.weight"])


def test_delta_base_missing_or_different(models, tmp_path):
    base_path = models / FILES["star"]
    base = load_state_dict_file(base_path)
    moved = tmp_path / "elsewhere" / "finetune.safetensors"
    save_delta(moved, _finetuned(base), base_path)
    assert load_state_dict_file(moved)  # found through the recorded path
    hidden = tmp_path / "hidden.safetensors"
    base_path.rename(hidden)
    with pytest.raises(FileNotFoundError, match=r"finetune\.safetensors is a STAR fine-tune stored as a delta of "
                                                r"'star_tiny\.safetensors' .* put star_tiny\.safetensors next to"):
        load_state_dict_file(moved)
    assert load_state_dict_file(moved, base=hidden)  # an explicit base
    other = tmp_path / "elsewhere" / "star_tiny.safetensors"
    write_tree(tmp_path / "other", ["star"], seed=9)
    (tmp_path / "other" / FILES["star"]).rename(other)
    with pytest.raises(ValueError, match=r"is not the base checkpoint finetune\.safetensors was trained from"):
        load_state_dict_file(moved)
    with pytest.raises(ValueError, match="would overwrite its base"):
        save_delta(hidden, {}, hidden)


def test_model_loader_node_reads_a_delta(models):
    base_path = models / FILES["star"]
    delta = _finetuned(load_state_dict_file(base_path))
    save_delta(models / "STAR" / "finetune.safetensors", delta, base_path)
    pack = harness.load_pack(models)
    nodes = harness.node_classes(pack)
    import folder_paths

    assert folder_paths.get_filename_list("STAR") == ["finetune.safetensors", "star_tiny.safetensors"]
    loader = nodes["STARModelLoader"]
    assert loader.validate_inputs(ckpt_name="finetune.safetensors") is True
    (tuned,) = harness.run(loader, ckpt_name="finetune.safetensors", weight_dtype="fp32")
    (plain,) = harness.run(loader, ckpt_name="star_tiny.safetensors", weight_dtype="fp32")
    weights = tuned.model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in delta.items())
    assert not torch.allclose(_forward(tuned.model), _forward(plain.model), atol=1e-3)
