"""The run spec is the single source of defaults: the CLI and every node schema show exactly its defaults."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import pytest

from star_core import cli
from star_core.diffusion.schedule import t_max_for_denoise
from star_core.options import SpecError
from star_core.spec import DEFAULTS, SECTIONS, RunSpec, default, option_info

sys.path.insert(0, str(Path(__file__).parent / "comfy_stub"))
import harness  # noqa: E402

# Node inputs that stand for a spec option: (node, input) -> (dotted spec name, node value -> spec value).
NONE_IF_ZERO = (lambda v: None if v == 0 else v)
AUTO_IF_ZERO = (lambda v: "auto" if v == 0 else v)
NODE_OPTIONS = {
    ("STARLREncode", "scale"): ("output.scale", None),
    ("STARLREncode", "target_width"): ("output.target", NONE_IF_ZERO),
    ("STARLREncode", "target_height"): ("output.target", NONE_IF_ZERO),
    ("STARLREncode", "padding"): ("output.padding", None),
    ("STARLREncode", "posterior"): ("encode.posterior", None),
    ("STARLREncode", "seed"): ("seed", None),
    ("STARLREncode", "tile"): ("encode.tile", AUTO_IF_ZERO),
    ("STARLREncode", "tile_overlap"): ("encode.tile_overlap", None),
    ("STARSampler", "solver_mode"): ("sampler.mode", None),
    ("STARSampler", "steps"): ("sampler.steps", None),
    ("STARSampler", "cfg"): ("sampler.cfg", None),
    ("STARSampler", "rescale"): ("sampler.rescale", None),
    ("STARSampler", "denoise"): ("sampler.t_max", t_max_for_denoise),
    ("STARSampler", "chunk_length"): ("sampler.chunk_len", AUTO_IF_ZERO),
    ("STARSampler", "diffusion_tile"): ("sampler.tile", AUTO_IF_ZERO),
    ("STARSampler", "chunk_overlap"): ("sampler.overlap", lambda v: None if v < 0 else v),
    ("STARSampler", "fusion"): ("sampler.fusion", None),
    ("STARTiledVAEDecode", "tile"): ("decode.tile", AUTO_IF_ZERO),
    ("STARTiledVAEDecode", "tile_overlap"): ("decode.tile_overlap", None),
    ("STARTiledVAEDecode", "temporal_window"): ("decode.window", AUTO_IF_ZERO),
    ("STARTiledVAEDecode", "temporal_overlap"): ("decode.window_overlap", None),
    ("STARColourFix", "method"): ("colour.method", None),
    ("STARColourFix", "strength"): ("colour.strength", None),
    ("STARTextEncode", "prompt"): ("prompt.prompt", None),
    ("STARTextEncode", "suffix"): ("prompt.suffix", None),
    ("STARTextEncode", "negative_prompt"): ("prompt.negative_prompt", None),
    ("STARUpscale", "prompt"): ("prompt.prompt", None),
    ("STARUpscale", "scale"): ("output.scale", None),
    ("STARUpscale", "padding"): ("output.padding", None),
    ("STARUpscale", "seed"): ("seed", None),
    ("STARUpscale", "vae_tile"): ("encode.tile", AUTO_IF_ZERO),
}
# The streaming nodes show the same widget groups as their IMAGE counterparts.
NODE_OPTIONS |= {("STARVideoEncode", name): spec for (node, name), spec in NODE_OPTIONS.items()
                 if node == "STARLREncode"}
NODE_OPTIONS |= {("STARVideoDecode", name): spec for (node, name), spec in NODE_OPTIONS.items()
                 if node in ("STARTiledVAEDecode", "STARColourFix")}
# Widget inputs that are not run options (model files, dtypes): listed so a new input must be classified.
# Model files and the frame rate of IMAGE frames (a property of the source, like a file's fps) are not run options.
NOT_RUN_OPTIONS = {("STARModelLoader", "ckpt_name"), ("STARModelLoader", "weight_dtype"),
                   ("STARVAELoader", "vae_name"), ("STARLREncode", "fps")}


def test_cli_defaults_are_the_specs():
    parser = cli.build_parser()
    upscale = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["upscale"]
    actions = {a.option_strings[0]: a for a in upscale._actions if a.option_strings}
    assert set(cli.FLAG_OF.values()) <= set(actions)
    for path, flag in cli.FLAG_OF.items():
        assert actions[flag].default == default(path), flag
        info = option_info(path)
        assert actions[flag].help == info.help, flag
        if info.choices is not None:
            assert tuple(actions[flag].choices) == info.choices, flag
    # every spec option is reachable from the command line
    every = {f"{head}.{f.name}" for head, cls in SECTIONS.items() for f in dataclasses.fields(cls)} | {"seed"}
    assert every - set(cli.FLAG_OF) == {"output.target", "sampler.t_max"}  # --target-size; denoise is node-only


@pytest.fixture(scope="module")
def node_inputs(tmp_path_factory) -> dict:
    nodes = harness.node_classes(harness.load_pack(tmp_path_factory.mktemp("models")))
    inputs = {}
    for node_id, cls in nodes.items():
        info = cls.define_schema().v1_info()["input"]
        for group in ("required", "optional"):
            for name, (io_type, options) in info.get(group, {}).items():
                inputs[node_id, name] = (io_type, options)
    return inputs


def test_node_defaults_are_the_specs(node_inputs):
    widgets = {key for key, (io_type, options) in node_inputs.items() if "default" in options}
    assert widgets - set(NODE_OPTIONS) - NOT_RUN_OPTIONS == set(), "classify every new widget input"
    for key, (path, convert) in NODE_OPTIONS.items():
        shown = node_inputs[key][1]["default"]
        assert (convert or (lambda v: v))(shown) == default(path), key


def test_spec_validation_names_the_option():
    with pytest.raises(SpecError, match=r"sampler.steps \(20\) is only used by solver mode 'normal'"):
        DEFAULTS.with_options({"sampler.steps": 20})
    assert DEFAULTS.with_options({"sampler.mode": "normal", "sampler.steps": 20}).sampler.steps == 20
    with pytest.raises(SpecError, match=r"colour.strength must be in \[0, 1\], got 1.5"):
        DEFAULTS.with_options({"colour.strength": 1.5})
    with pytest.raises(SpecError, match=r"decode.window_overlap \(3\) must be smaller than the decoder window \(3\)"):
        DEFAULTS.with_options({"decode.window_overlap": 3, "decode.window": 3})
    with pytest.raises(SpecError, match=r"decode.window_overlap \(3\) must be smaller than the decoder window "
                       r"\(auto: at most 3\)"):
        DEFAULTS.with_options({"decode.window_overlap": 3})
    with pytest.raises(SpecError, match=r"sampler.chunk_len must be an integer or auto, got 'big'"):
        DEFAULTS.with_options({"sampler.chunk_len": "big"})
    with pytest.raises(SpecError, match=r"decode.window must be in \[1, 256\] or auto, got 0"):
        DEFAULTS.with_options({"decode.window": 0})
    with pytest.raises(SpecError, match="decode.tile overlap 64 px must be smaller than the tile size 64 px"):
        DEFAULTS.with_options({"decode.tile": 64, "decode.tile_mode": "fast"})
    assert DEFAULTS.with_options({"decode.tile": 64}).decode.tile_mode == "exact"  # exact tiles need no overlap
    with pytest.raises(SpecError, match=r"seed must be in \[0, 18446744073709551615\], got -1"):
        DEFAULTS.with_options({"seed": -1})
    with pytest.raises(SpecError, match=r"output.target must be two integers"):
        DEFAULTS.with_options({"output.target": (0, 5)})
    with pytest.raises(KeyError, match="unknown run option 'sampler.cfgg'"):
        DEFAULTS.with_options({"sampler.cfgg": 1.0})
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULTS.seed = 1  # type: ignore[misc]
    assert RunSpec() == DEFAULTS and DEFAULTS.sampler.fusion == "linear" and DEFAULTS.decode.window == "auto"


def test_cli_reports_spec_errors_with_the_flag(tmp_path, capsys):
    clip = tmp_path / "in.mp4"
    clip.write_bytes(b"")
    for args, message in ((["--cfg", "nan"], "--cfg must be a finite number, got nan"),
                          (["--steps", "30"], "--steps (30) is only used by solver mode 'normal'"),
                          (["--chunk-len", "8", "--chunk-overlap", "8"],
                           "--chunk-overlap (8) must be smaller than the chunk length (8)")):
        assert cli.main(["upscale", str(clip), "-o", str(tmp_path / "o.mp4"), *args]) == cli.EXIT_FAILED
        assert message in capsys.readouterr().err
