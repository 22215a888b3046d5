"""The API twins are what the shipped UI workflows execute: generated from them through the recorded node
definitions, with the frontend's conversion rules, checked against the real frontends' own conversions."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("workflow_twins", REPO / "scripts" / "workflow_twins.py")
wt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wt)

UI_WORKFLOWS = sorted(wt.UI_DIR.glob("*.json"))
FRONTEND_RECORDINGS = sorted((wt.API_DIR / "frontend").glob("*.json"))
HOST_VERSIONS = sorted(p.stem.removeprefix("comfyui-") for p in wt.OBJECT_INFO_DIR.glob("comfyui-*.json"))


def test_every_ui_workflow_has_its_generated_twin():
    assert wt.main(["check"]) == 0, "run: python scripts/workflow_twins.py write"
    assert sorted(p.name for p in wt.API_DIR.glob("*.json")) == [p.name for p in UI_WORKFLOWS]
    assert wt.REFERENCE_VERSION in HOST_VERSIONS and len(HOST_VERSIONS) >= 2


# Widgets a pack's frontend script adds that are not node inputs (the server ignores them): VideoHelperSuite's
# Meta Batch Manager gets a dummy "count" widget from VHS.core.js, which the 0.3.64 frontend queues.
FRONTEND_ONLY = {("VHS_BatchManager", "count")}


@pytest.mark.parametrize("path", FRONTEND_RECORDINGS, ids=lambda p: p.stem)
def test_conversion_matches_the_real_frontend(path):
    """What the real frontend (ComfyUI 0.3.64 / 0.33.0, headless Chromium) queued for a workflow, recorded with
    the node definitions it had then: the converter gives exactly that prompt."""
    recording = json.loads(path.read_text())
    queued = recording["prompt"]
    for node in queued.values():
        node["inputs"] = {k: v for k, v in node["inputs"].items() if (node["class_type"], k) not in FRONTEND_ONLY}
    assert wt.ui_to_api(recording["workflow"], recording["object_info"]) == queued


def test_recordings_include_the_seed_control_shift():
    """The recorded frontends read a seed-named INT's next saved value as its control mode (the shipped LR Encode
    lost its tile settings that way), and the converter reproduces it."""
    recording = json.loads((wt.API_DIR / "frontend" / "STAR_upscale_core_video.comfyui-0.33.0.f0b1368.json").read_text())
    lr_encode = next(n for n in recording["workflow"]["nodes"] if n["type"] == "STARLREncode")
    assert lr_encode["widgets_values"][5:] == [666, 0, 32]
    assert {k: recording["prompt"]["7"]["inputs"][k] for k in ("seed", "tile", "tile_overlap")} == {
        "seed": 666, "tile": 32, "tile_overlap": 32}


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_ui_workflows_save_what_the_frontend_lays_out(path):
    """Every saved node holds exactly the values the frontend lays out for the current node definitions (control
    and upload values included), so nothing shifts when a user loads it."""
    info = wt.load_object_info()
    ui = json.loads(path.read_text())
    for node in ui["nodes"]:
        values = node.get("widgets_values")
        if isinstance(values, list) and node["type"] in info:
            read = wt._read_list_widgets(info[node["type"]], values)
            assert wt.widgets_values(info[node["type"]], read) == values, (node["id"], node["type"])
    link_ids = {link[0] for link in ui["links"]}
    assert all(i["link"] in link_ids for n in ui["nodes"] for i in n.get("inputs", []) if i["link"] is not None)


@pytest.mark.parametrize("version", HOST_VERSIONS)
@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_twins_mean_the_same_on_every_recorded_host(path, version):
    """Converted with another host version's node definitions, a workflow gives the twin's inputs unchanged
    (a newer host may add inputs of its own, e.g. SaveVideo's format.codec), and every twin input exists there."""
    twin = json.loads((wt.API_DIR / path.name).read_text())
    info = wt.load_object_info(version)
    converted = wt.ui_to_api(json.loads(path.read_text()), info)
    for node_id, node in twin.items():
        assert converted[node_id]["class_type"] == node["class_type"]
        there = converted[node_id]["inputs"]
        assert set(node["inputs"]) <= set(there), (node_id, "inputs this host does not have")
        assert {k: there[k] for k in node["inputs"]} == node["inputs"], node_id


@pytest.mark.parametrize("path", sorted(wt.API_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_tiny_model_runs_replace_every_model_file(path):
    from star_core.tiny_models import FILES

    tiny = wt.tiny_models(json.loads(path.read_text()), input_file="clip.mp4")
    tiny_names = {Path(f).name for f in FILES.values()}
    loaders = {node for node, _ in wt.TINY_MODELS}
    for node in tiny.values():
        if node["class_type"] in loaders:
            names = [v for (t, n), _ in wt.TINY_MODELS.items() if t == node["class_type"]
                     for k, v in node["inputs"].items() if k == n]
            assert names and set(names) <= tiny_names, node
        if node["class_type"] in ("LoadVideo", "VHS_LoadVideo"):
            assert "clip.mp4" in node["inputs"].values()
        if node["class_type"] in wt.TINY_GEOMETRY_NODES:
            assert (node["inputs"]["scale"], node["inputs"]["padding"]) == (2.0, "minimal")
    with pytest.raises(wt.WorkflowError, match="'mystery.pt', which has no tiny stand-in"):
        wt.tiny_models({"1": {"class_type": "STARModelLoader", "inputs": {"ckpt_name": "mystery.pt"}}})


INFO = {
    "Seeded": {"display_name": "Seeded", "input": {"required": {
        "image": ["IMAGE", {}], "seed": ["INT", {"default": 1}], "mode": [["a", "b"], {}],
        "strength": ["FLOAT", {"default": 0.5}], "fmt": ["COMFY_DYNAMICCOMBO_V3", {"options": [
            {"key": "x", "inputs": {"required": {"level": ["INT", {"default": 3}]}}},
            {"key": "y", "inputs": {"required": {}}}]}]},
        "optional": {"extra": ["STRING", {"default": "e"}]}},
        "input_order": {"required": ["image", "seed", "mode", "strength", "fmt"], "optional": ["extra"]}},
    "Source": {"display_name": "Source", "input": {"required": {}}, "input_order": {"required": []}},
    "Named": {"input": {"required": {"n": ["INT", {"default": 2}], "image": ["IMAGE", {}]}},
              "input_order": {"required": ["n", "image"]}},
}


def _node(node_id, node_type, values=None, inputs=(), mode=0):
    return {"id": node_id, "type": node_type, "mode": mode, "widgets_values": values,
            "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs]}


def test_conversion_rules_on_a_small_graph():
    ui = {"nodes": [
        _node(1, "Source"),
        _node(2, "Reroute", inputs=[("", "*", 1)]),
        _node(3, "Named", {"n": 5, "videopreview": {}}, inputs=[("image", "IMAGE", 2)], mode=4),  # bypassed
        _node(4, "PrimitiveNode", [0.25]),
        _node(5, "Seeded", [7, "randomize", "b", 0.9, "x", 11], inputs=[("image", "IMAGE", 3),
                                                                        ("strength", "FLOAT", 4)]),
        _node(6, "Note", ["text"]),
        _node(7, "Source", mode=2),  # muted: what only it feeds loses the link
        _node(8, "Named", {"n": 6}, inputs=[("image", "IMAGE", 5)]),
    ], "links": [[1, 1, 0, 2, 0, "*"], [2, 2, 0, 3, 1, "IMAGE"], [3, 3, 0, 5, 0, "IMAGE"],
                 [4, 4, 0, 5, 3, "FLOAT"], [5, 7, 0, 8, 1, "IMAGE"]]}
    assert wt.ui_to_api(ui, INFO) == {
        "1": {"inputs": {}, "class_type": "Source", "_meta": {"title": "Source"}},
        "5": {"inputs": {"seed": 7, "mode": "b", "fmt": "x", "fmt.level": 11, "extra": "e", "image": ["1", 0],
                         "strength": 0.25}, "class_type": "Seeded", "_meta": {"title": "Seeded"}},
        "8": {"inputs": {"n": 6}, "class_type": "Named", "_meta": {"title": "Named"}},
    }
    assert wt.widgets_values(INFO["Seeded"], {"seed": 7, "mode": "b", "fmt": "x", "fmt.level": 11}) == [
        7, "fixed", "b", 0.5, "x", 11, "e"]
    with pytest.raises(wt.WorkflowError, match="node 9 has type 'Lost'"):
        wt.ui_to_api({"nodes": [_node(9, "Lost", [])], "links": []}, INFO)
    with pytest.raises(wt.WorkflowError, match="subgraphs are not supported"):
        wt.ui_to_api({"nodes": [], "links": [], "definitions": {"subgraphs": [{"id": "s"}]}}, INFO)
