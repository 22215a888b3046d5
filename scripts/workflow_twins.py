"""The API twins of the shipped UI workflows: generated from ``workflows/*.json``, never edited by hand.

A UI workflow (what the ComfyUI frontend saves and users drag in) is not executable; ``POST /prompt`` takes the
API ("prompt") format. Each ``tests/workflows_api/<name>.json`` is the API form of ``workflows/<name>.json``,
converted here with the rules the frontend applies when it queues a graph, through the node definitions that a
real ComfyUI lists in ``/object_info`` (recorded as data: ``tests/comfy_stub/object_info_star.json`` for the
pack, ``tests/workflows_api/object_info/comfyui-<version>.json`` for the core and VideoHelperSuite nodes the
workflows use). CI regenerates the twins and fails when they differ from the committed ones.

The rules (checked against the real frontends of ComfyUI 0.3.64 and 0.33.0 by the recordings in
``tests/workflows_api/frontend/``):

* a list ``widgets_values`` is read position by position over the node's widget inputs in ``input_order``
  (required, then optional); widget inputs are INT, FLOAT, STRING, BOOLEAN, COMBO (or a list of options) and
  dynamic combos, unless ``forceInput``;
* an INT with ``control_after_generate`` — or, when the schema does not set it, one named ``seed`` or
  ``noise_seed`` — is followed by its control value (``fixed``/``randomize``/…), which is not an input;
* a combo with an upload flag (``image_upload``, ``video_upload``, …) is followed by the upload button's value;
* a dynamic combo (``COMFY_DYNAMICCOMBO_V3``) is followed by the widgets of the option it selects, named
  ``<combo>.<input>``;
* a dict ``widgets_values`` (VideoHelperSuite) is read by name; keys that are not inputs are dropped;
* a linked input takes the link, even when the widget still has a value; widgets without a value take their
  default (a combo without one its first option);
* Note/MarkdownNote nodes are dropped, links through Reroutes and bypassed nodes (mode 4) are followed to the
  real producer, muted nodes (mode 2) and what only they feed are dropped; PrimitiveNode values are inlined.

``tiny_models`` maps a twin to the tiny random models of ``python -m star_core.tiny_models`` (and a small, fast
geometry) for runs in a real host on a CPU; the twins themselves name the real model files, like the UI
workflows.

Usage::

    python scripts/workflow_twins.py check              # exit 1 when a committed twin is stale
    python scripts/workflow_twins.py write              # regenerate tests/workflows_api/*.json
    python scripts/workflow_twins.py tiny OUT [--input clip.mp4]   # run-ready prompts for the tiny models
    python scripts/workflow_twins.py record URL [--version V]      # re-record /object_info from a running host
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
UI_DIR = REPO / "workflows"
API_DIR = REPO / "tests" / "workflows_api"
OBJECT_INFO_DIR = API_DIR / "object_info"
STAR_OBJECT_INFO = REPO / "tests" / "comfy_stub" / "object_info_star.json"
# The host version whose node definitions define the twins (the oldest supported); the others must agree.
REFERENCE_VERSION = "0.3.64"

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
CONTROL_NAMES = {"seed", "noise_seed"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload", "audio_upload")
DROPPED_TYPES = {"Note", "MarkdownNote"}
MUTED, BYPASSED = 2, 4

# Real model file → tiny random stand-in (star_core.tiny_models.FILES), per loader input.
TINY_MODELS = {
    ("STARModelLoader", "ckpt_name"): {"light_deg.pt": "star_tiny.safetensors",
                                       "heavy_deg.pt": "star_tiny.safetensors"},
    ("CLIPLoader", "clip_name"): {"clip_h.safetensors": "clip_h_random.safetensors"},
    ("VAELoader", "vae_name"): {"svd_vae.safetensors": "svd_vae_random.safetensors"},
    ("STARVAELoader", "vae_name"): {"svd_vae/diffusion_pytorch_model.fp16.safetensors": "svd_vae_tiny.safetensors",
                                    "svd_vae.safetensors": "svd_vae_tiny.safetensors"},
}
# Input-file widgets (the clip a run reads).
INPUT_FILES = {("LoadVideo", "file"), ("VHS_LoadVideo", "video")}
# A geometry that samples in seconds on a CPU with the tiny models: x2, only the padding the network needs.
TINY_GEOMETRY = {"scale": 2.0, "padding": "minimal"}
TINY_GEOMETRY_NODES = {"STARLREncode", "STARVideoEncode", "STARUpscale"}
# Combos whose options are the host's files: recorded without them (they describe a machine, not a schema).
FILE_COMBOS = {("STARModelLoader", "ckpt_name"), ("STARVAELoader", "vae_name"), ("CLIPLoader", "clip_name"),
               ("VAELoader", "vae_name"), ("LoadVideo", "file"), ("VHS_LoadVideo", "video")}


class WorkflowError(ValueError):
    """A UI workflow that cannot be converted (unknown node type, subgraph, broken link)."""


def _input_spec(info: Mapping, name: str) -> tuple[Any, dict]:
    for group in ("required", "optional"):
        spec = info.get("input", {}).get(group, {}).get(name)
        if spec is not None:
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            return spec[0], options
    raise KeyError(name)


def _is_widget(io_type: Any, options: Mapping) -> bool:
    if options.get("forceInput"):
        return False
    return isinstance(io_type, list) or io_type in WIDGET_TYPES or io_type == DYNAMIC_COMBO


def _default(io_type: Any, options: Mapping) -> Any:
    if "default" in options:
        return options["default"]
    choices = io_type if isinstance(io_type, list) else options.get("options")
    if io_type == DYNAMIC_COMBO:
        choices = [o["key"] for o in options.get("options", [])]
    return choices[0] if choices else None


def _has_control(io_type: Any, name: str, options: Mapping) -> bool:
    if io_type != "INT":
        return False
    if options.get("control_after_generate") is not None:
        return bool(options["control_after_generate"])
    return name in CONTROL_NAMES


def _widget_names(info: Mapping) -> Iterator[tuple[str, Any, dict]]:
    """(name, type, options) of the node's widget inputs in the order the frontend lays them out."""
    order = info.get("input_order", {})
    for group in ("required", "optional"):
        for name in order.get(group, []):
            io_type, options = _input_spec(info, name)
            if _is_widget(io_type, options):
                yield name, io_type, options


def _children(name: str, io_type: Any, options: Mapping, value: Any) -> list[tuple[str, Any, dict]]:
    """The widgets a combo value adds right after the combo: a dynamic combo's selected option (named
    ``<combo>.<input>``), or VideoHelperSuite's per-format widgets (``options["formats"][value]``)."""
    if io_type == DYNAMIC_COMBO:
        for option in options.get("options", []):
            if option["key"] == value:
                inputs = option.get("inputs", {})
                return [(f"{name}.{child}", spec[0], spec[1] if len(spec) > 1 else {})
                        for group in ("required", "optional") for child, spec in inputs.get(group, {}).items()
                        if _is_widget(spec[0], spec[1] if len(spec) > 1 else {})]
        return []
    extra = options.get("formats", {}).get(value) if isinstance(options.get("formats"), Mapping) else None
    if isinstance(extra, list) and all(isinstance(spec, list) for spec in extra):
        return [(spec[0], spec[1], spec[2] if len(spec) > 2 else {}) for spec in extra]
    return []  # (VHS_LoadVideo's "formats" are loader presets, not widgets)


def _read_list_widgets(info: Mapping, values: list) -> dict[str, Any]:
    """Positional widgets_values → {input name: value}, following the frontend's extra control/upload values."""
    out: dict[str, Any] = {}
    queue = list(values)

    def take(name: str, io_type: Any, options: Mapping) -> None:
        value = queue.pop(0) if queue else _default(io_type, options)
        out[name] = value
        if _has_control(io_type, name.rsplit(".", 1)[-1], options) and queue:
            queue.pop(0)
        if any(options.get(flag) for flag in UPLOAD_FLAGS) and queue:
            queue.pop(0)
        for child in _children(name, io_type, options, value):
            take(*child)

    for name, io_type, options in _widget_names(info):
        take(name, io_type, options)
    return out


def widgets_values(info: Mapping, values: Mapping[str, Any], control: str = "fixed") -> list:
    """
    The list ``widgets_values`` the frontend saves for a node whose widgets hold `values` (missing ones: their
    defaults), with the control value after seed-like INTs and the upload value after upload combos — the
    inverse of reading a saved node. Used to write the shipped UI workflows.

    Parameters:
        info (`Mapping`): the node type's ``/object_info`` entry.
        values (`Mapping[str, Any]`): input name → value (dynamic-combo children as ``<combo>.<input>``).
        control (`str`): the saved control_after_generate mode ("fixed" keeps a shipped seed reproducible).
    """
    out: list = []

    def put(name: str, io_type: Any, options: Mapping) -> None:
        value = values.get(name, _default(io_type, options))
        out.append(value)
        if _has_control(io_type, name.rsplit(".", 1)[-1], options):
            out.append(control)
        if any(options.get(flag) for flag in UPLOAD_FLAGS):
            out.append("image")  # what the frontend saves for the upload button, whatever the media
        for child in _children(name, io_type, options, value):
            put(*child)

    for name, io_type, options in _widget_names(info):
        put(name, io_type, options)
    return out


def _read_dict_widgets(info: Mapping, values: Mapping) -> dict[str, Any]:
    """Named widgets_values → {input name: value}; keys that are not widgets (previews, buttons) are dropped."""
    out: dict[str, Any] = {}

    def take(name: str, io_type: Any, options: Mapping) -> None:
        out[name] = values[name] if name in values else _default(io_type, options)
        for child in _children(name, io_type, options, out[name]):
            take(*child)

    for name, io_type, options in _widget_names(info):
        take(name, io_type, options)
    return out


def _links(ui: Mapping) -> dict[int, tuple[int, int, Any]]:
    links = {}
    for link in ui.get("links", []):
        if isinstance(link, list):
            link_id, src, src_slot, _dst, _dst_slot, link_type = link[:6]
        else:
            link_id, src, src_slot, link_type = link["id"], link["origin_id"], link["origin_slot"], link.get("type")
        links[link_id] = (src, src_slot, link_type)
    return links


def ui_to_api(ui: Mapping, object_info: Mapping) -> dict[str, dict]:
    """
    Converts a UI-format workflow to the API prompt the frontend would queue.

    Parameters:
        ui (`Mapping`): the saved workflow (``nodes``, ``links``, …).
        object_info (`Mapping`): node type → its ``/object_info`` entry, for every type in the workflow.

    Returns:
        `dict[str, dict]`: ``{node id: {"inputs": {...}, "class_type": ..., "_meta": {"title": ...}}}``.

    Raises:
        WorkflowError: a node type missing from `object_info`, a subgraph, or a link to a missing node.
    """
    if ui.get("definitions", {}).get("subgraphs"):
        raise WorkflowError("subgraphs are not supported: convert them to plain nodes before saving")
    links = _links(ui)
    nodes = {n["id"]: n for n in ui["nodes"]}

    def producer(link_id: int) -> list | tuple | None:
        """[node id, slot] of the real producer of a link, ("value", v) for a PrimitiveNode, None if muted."""
        src, slot, link_type = links[link_id]
        for _ in range(len(nodes) + 1):
            node = nodes.get(src)
            if node is None:
                raise WorkflowError(f"link {link_id} comes from node {src}, which is not in the workflow")
            if node.get("mode") == MUTED:
                return None
            if node["type"] == "PrimitiveNode":
                return ("value", (node.get("widgets_values") or [None])[0])
            if node["type"] != "Reroute" and node.get("mode") != BYPASSED:
                return [str(src), slot]
            passes = [i for i in node.get("inputs", []) if i.get("link") is not None
                      and (node["type"] == "Reroute" or i.get("type") == link_type)]
            if not passes:
                return None
            src, slot, _ = links[passes[0]["link"]]
        raise WorkflowError(f"link {link_id} loops through reroutes or bypassed nodes")

    api: dict[str, dict] = {}
    for node_id, node in sorted(nodes.items()):
        node_type = node["type"]
        if node_type in DROPPED_TYPES | {"Reroute", "PrimitiveNode"} or node.get("mode") in (MUTED, BYPASSED):
            continue
        info = object_info.get(node_type)
        if info is None:
            raise WorkflowError(f"node {node_id} has type {node_type!r}, which is not in the recorded object_info "
                                "(a missing pack, a group node, or a node to record)")
        values = node.get("widgets_values")
        if isinstance(values, Mapping):
            inputs = _read_dict_widgets(info, values)
        else:
            inputs = _read_list_widgets(info, list(values or []))
        for slot in node.get("inputs", []):
            if slot.get("link") is None:
                continue
            source = producer(slot["link"])
            if source is None:
                inputs.pop(slot["name"], None)
            elif isinstance(source, tuple):
                inputs[slot["name"]] = source[1]
            else:
                inputs.pop(slot["name"], None)  # the link goes after the widgets, like the frontend's prompt
                inputs[slot["name"]] = source
        title = node.get("title") or info.get("display_name") or node_type
        api[str(node_id)] = {"inputs": inputs, "class_type": node_type, "_meta": {"title": title}}
    return api


def load_object_info(version: str = REFERENCE_VERSION) -> dict[str, dict]:
    """The recorded node definitions of host `version` (core + VideoHelperSuite) plus the pack's own."""
    core = json.loads((OBJECT_INFO_DIR / f"comfyui-{version}.json").read_text())
    return core["nodes"] | json.loads(STAR_OBJECT_INFO.read_text())


def twins(object_info: Mapping | None = None) -> dict[str, dict]:
    """Twin file name → generated API prompt, for every UI workflow."""
    info = load_object_info() if object_info is None else object_info
    return {path.name: ui_to_api(json.loads(path.read_text()), info) for path in sorted(UI_DIR.glob("*.json"))}


def dumps(prompt: Mapping) -> str:
    return json.dumps(prompt, indent=1, ensure_ascii=False) + "\n"


def tiny_models(prompt: Mapping, input_file: str | None = None) -> dict:
    """
    A twin made runnable with the tiny random models (and a x2 minimal-padding geometry) on a CPU host.

    Parameters:
        prompt (`Mapping`): an API prompt naming the real model files.
        input_file (`str`, *optional*): the clip in the host's input folder to read instead.

    Raises:
        WorkflowError: a model file with no tiny stand-in.
    """
    out = json.loads(json.dumps(prompt))
    for node_id, node in out.items():
        inputs, node_type = node["inputs"], node["class_type"]
        for (loader, name), mapping in TINY_MODELS.items():
            if node_type == loader and isinstance(inputs.get(name), str):
                if inputs[name] not in mapping:
                    raise WorkflowError(f"node {node_id} ({loader}) loads {inputs[name]!r}, which has no tiny stand-in "
                                        "in TINY_MODELS")
                inputs[name] = mapping[inputs[name]]
        if input_file is not None:
            for name in [n for t, n in INPUT_FILES if t == node_type and n in inputs]:
                inputs[name] = input_file
        if node_type in TINY_GEOMETRY_NODES:
            inputs.update({k: v for k, v in TINY_GEOMETRY.items() if not isinstance(inputs.get(k), list)})
    return out


def record(url: str, version: str | None, pack_module: str = "custom_nodes.star_vsr") -> list[Path]:
    """
    Re-records the node definitions from a running host: the core/VideoHelperSuite types the UI workflows use
    into ``object_info/comfyui-<version>.json``, and, from the reference version's host, the pack's own into
    ``object_info_star.json``.
    """
    with urllib.request.urlopen(url.rstrip("/") + "/object_info", timeout=60) as reply:
        info = json.loads(reply.read())
    with urllib.request.urlopen(url.rstrip("/") + "/system_stats", timeout=60) as reply:
        host_version = json.loads(reply.read())["system"].get("comfyui_version")
    version = version or host_version
    for (node_type, name) in FILE_COMBOS:
        if node_type in info:
            for group in info[node_type]["input"].values():
                if name in group and len(group[name]) > 1:
                    group[name][1]["options"] = []
    star = {k: v for k, v in info.items() if v.get("python_module") == pack_module}
    used = {n["type"] for path in UI_DIR.glob("*.json") for n in json.loads(path.read_text())["nodes"]}
    core = {k: info[k] for k in sorted(used) if k in info and k not in star}
    written = [OBJECT_INFO_DIR / f"comfyui-{version}.json"]
    if version == REFERENCE_VERSION:
        STAR_OBJECT_INFO.write_text(json.dumps(star, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
        written.append(STAR_OBJECT_INFO)
    OBJECT_INFO_DIR.mkdir(parents=True, exist_ok=True)
    written[0].write_text(json.dumps({"comfyui_version": version, "nodes": core}, indent=1, sort_keys=True,
                                     ensure_ascii=False) + "\n")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="exit 1 when a committed twin differs from its UI workflow")
    sub.add_parser("write", help="regenerate tests/workflows_api/*.json from workflows/*.json")
    tiny = sub.add_parser("tiny", help="write run-ready prompts for the tiny models into OUT")
    tiny.add_argument("out", type=Path)
    tiny.add_argument("--input", help="input clip name in the host's input folder")
    rec = sub.add_parser("record", help="re-record object_info from a running host, e.g. http://127.0.0.1:8188")
    rec.add_argument("url")
    rec.add_argument("--version", help="host version for the file name (default: what /system_stats says)")
    args = parser.parse_args(argv)
    if args.command == "record":
        for path in record(args.url, args.version):
            print(f"recorded {path.relative_to(REPO)}")
        return 0
    generated = twins()
    if args.command == "check":
        stale = [name for name, prompt in generated.items()
                 if not (API_DIR / name).is_file() or (API_DIR / name).read_text() != dumps(prompt)]
        extra = sorted({p.name for p in API_DIR.glob("*.json")} - set(generated))
        for name in stale:
            print(f"stale: tests/workflows_api/{name} (run: python scripts/workflow_twins.py write)")
        for name in extra:
            print(f"no UI workflow for tests/workflows_api/{name}: workflows/{name} is missing")
        return 1 if stale or extra else 0
    if args.command == "write":
        for name, prompt in generated.items():
            (API_DIR / name).write_text(dumps(prompt))
            print(f"wrote tests/workflows_api/{name}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, prompt in generated.items():
        (args.out / name).write_text(dumps(tiny_models(prompt, args.input)))
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
