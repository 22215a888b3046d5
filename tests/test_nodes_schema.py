"""Node schemas: rendered by the host stub, compared with the pack's /object_info entries recorded from a real
ComfyUI (0.3.64), plus the rules ComfyUI's validation applies to them."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "comfy_stub"))
import harness  # noqa: E402

RECORDED = json.loads((Path(__file__).parent / "comfy_stub" / "object_info_star.json").read_text())
# Combos listing model files: their options are the models folder's content, not part of the schema.
FILE_COMBOS = {("STARModelLoader", "ckpt_name"): "STAR", ("STARVAELoader", "vae_name"): "vae"}


@pytest.fixture(scope="module")
def schemas(tmp_path_factory) -> dict:
    models = tmp_path_factory.mktemp("models")
    for name in ("STAR/b.pt", "STAR/a.safetensors", "STAR/notes.txt", "vae/svd/diffusion_pytorch_model.safetensors"):
        (models / name).parent.mkdir(parents=True, exist_ok=True)
        (models / name).write_bytes(b"")
    nodes = harness.node_classes(harness.load_pack(models))
    return {node_id: cls.define_schema().v1_info() for node_id, cls in nodes.items()}


def _inputs(info: dict) -> dict:
    return {name: spec for group in ("required", "optional") for name, spec in info["input"].get(group, {}).items()}


def test_every_recorded_node_is_registered(schemas):
    assert sorted(schemas) == sorted(RECORDED)


@pytest.mark.parametrize("node_id", sorted(RECORDED))
def test_schema_matches_the_real_host(schemas, node_id):
    ours, real = schemas[node_id], RECORDED[node_id]
    for key in ("input_order", "output", "output_name", "output_is_list", "name", "display_name", "description",
                "category", "output_node"):
        assert ours[key] == real[key], key
    for name, (io_type, options) in _inputs(real).items():
        our_type, our_options = _inputs(ours)[name]
        assert our_type == io_type, name
        if (node_id, name) in FILE_COMBOS:
            options = {k: v for k, v in options.items() if k != "options"}
            our_options = {k: v for k, v in our_options.items() if k != "options"}
        assert our_options == options, name


def test_model_combos_list_the_folders_weight_files(schemas):
    assert _inputs(schemas["STARModelLoader"])["ckpt_name"][1]["options"] == ["a.safetensors", "b.pt"]
    assert _inputs(schemas["STARVAELoader"])["vae_name"][1]["options"] == ["svd/diffusion_pytorch_model.safetensors"]


@pytest.mark.parametrize("node_id", sorted(RECORDED))
def test_inputs_have_tooltips_and_valid_defaults(node_id):
    for name, (io_type, options) in _inputs(RECORDED[node_id]).items():
        assert len(options.get("tooltip", "")) > 20, f"{node_id}.{name} needs a tooltip"
        if "default" not in options:
            continue
        default = options["default"]
        if io_type == "COMBO":
            assert default in options["options"], name
        if io_type in ("INT", "FLOAT"):
            assert options["min"] <= default <= options["max"], name


def test_category_and_official_defaults():
    assert {info["category"] for info in RECORDED.values()} == {"STAR"}
    sampler = _inputs(RECORDED["STARSampler"])
    official = {"solver_mode": "fast", "steps": 15, "cfg": 7.5, "rescale": 0.2, "denoise": 1.0}
    assert {k: sampler[k][1]["default"] for k in official} == official
    # the sizes default to auto (0): the official 32-frame chunks and whole frames when they fit the free memory
    assert {k: sampler[k][1]["default"] for k in ("chunk_length", "diffusion_tile")} == {"chunk_length": 0,
                                                                                        "diffusion_tile": 0}
    # one seed per run, on the node that starts it (LR Encode, Encode Video, or the one-node Upscale), with the
    # frontend's randomize/fixed control; the sampler reads it from the latent
    seeds = sorted((node, name) for node, info in RECORDED.items() for name in _inputs(info) if "seed" in name)
    assert seeds == [("STARLREncode", "seed"), ("STARUpscale", "seed"), ("STARVideoEncode", "seed")]
    for node, name in seeds:
        assert _inputs(RECORDED[node])[name][1] | {"tooltip": ""} == {
            "default": 666, "min": 0, "max": 2**64 - 1, "control_after_generate": True, "tooltip": ""}
    lr_encode = _inputs(RECORDED["STARLREncode"])
    assert lr_encode["fps"][1]["default"] == 30.0 and lr_encode["fps"][1]["min"] > 0
    assert _inputs(RECORDED["STARLREncode"])["vae"][0] == "VAE,STAR_VAE"
    assert _inputs(RECORDED["STARTextEncode"])["suffix"][1]["default"] == "official"
    assert _inputs(RECORDED["STARColourFix"])["method"][1]["default"] == "adain"


WORKFLOWS_API = sorted((Path(__file__).parent / "workflows_api").glob("*.json"))


@pytest.mark.parametrize("path", WORKFLOWS_API, ids=lambda p: p.stem)
def test_api_twins_give_every_star_node_valid_inputs(path):
    graph = json.loads(path.read_text())
    star = {nid: node for nid, node in graph.items() if node["class_type"] in RECORDED}
    assert "STARModelLoader" in {n["class_type"] for n in star.values()}
    for nid, node in star.items():
        spec = _inputs(RECORDED[node["class_type"]])
        required = set(RECORDED[node["class_type"]]["input"]["required"])
        assert required <= set(node["inputs"]) <= set(spec), (nid, node["class_type"])
        for name, value in node["inputs"].items():
            io_type, options = spec[name]
            if isinstance(value, list):  # a link: the source node exists
                assert value[0] in graph, (nid, name)
            elif io_type == "COMBO" and (node["class_type"], name) not in FILE_COMBOS:
                assert value in options["options"], (nid, name, value)
            elif io_type in ("INT", "FLOAT"):
                assert options["min"] <= value <= options["max"], (nid, name, value)
