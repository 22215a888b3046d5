"""Verify group ``text``: the tiny open_clip text tower (``text_openclip_*``) through star_core's loader and tokenizer.

For every ``<base>_outputs.safetensors`` with its ``<base>.safetensors`` weights (open_clip key layout) and
``<base>_config.json``: embeddings of the stored token ids (``*.emb``), per-block hidden states and the last-layer
diagnostic, and — when open_clip's vocab can be obtained — the token ids of the stored prompt texts.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..text.encoder import build_text_model, load_text_encoder, openclip_text_options
from ..text.tokenizer import ClipTokenizer
from ..text.vocab import fetch_openclip_vocab
from ..text.weights import canonical_text_state_dict, read_tensors
from .report import Report

OUTPUTS_SUFFIX = "_outputs.safetensors"


def _tokenizer() -> ClipTokenizer | None:
    try:
        return ClipTokenizer.from_openclip_vocab(fetch_openclip_vocab())
    except RuntimeError as exc:
        print(f"NOTE text token ids not checked: {exc}", flush=True)
        return None


def _check_set(outputs_path: Path, report: Report, tokenizer: ClipTokenizer | None) -> None:
    base = outputs_path.name[: -len(OUTPUTS_SUFFIX)]
    weights_path = outputs_path.with_name(base + ".safetensors")
    config_path = outputs_path.with_name(base + "_config.json")
    stem = outputs_path.stem
    for needed in (weights_path, config_path):
        if not needed.is_file():
            report.fail(stem, f"{needed.name} missing next to {outputs_path.name}")
            return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    options = openclip_text_options(config)
    text_sd, spec = canonical_text_state_dict(read_tensors(weights_path), heads=options.get("heads"))
    # Blocks the official embedder runs: all but the last `layer_idx` (recorded as resblocks_run).
    run_layers = int(config.get("resblocks_run", spec.layers - int(config.get("layer_idx", 1))))
    star = load_text_encoder(weights_path, tokenizer=tokenizer, run_layers=run_layers, **options)
    # Every block, for the per-block diagnostics.
    full_model = build_text_model(text_sd, spec, spec.layers, hidden_act=options["hidden_act"])
    position_ids = torch.arange(spec.positions)[None]
    outputs = load_file(str(outputs_path))
    prompts = config.get("prompts", {})
    for key in sorted(outputs):
        name = f"{stem}/{key}"
        prompt, _, kind = key.partition(".")
        ids = outputs.get(f"{prompt}.tokens")
        if ids is None:
            report.fail(name, f"{prompt}.tokens missing")
            continue
        with torch.no_grad():
            if kind == "emb":
                report.compare(name, star.encode_ids(ids), outputs[key])
            elif kind == "ln_final_of_last_layer":
                report.compare(name, full_model(input_ids=ids, position_ids=position_ids).last_hidden_state,
                               outputs[key])
            elif re.fullmatch(r"hidden_\d+", kind):
                hidden = full_model(input_ids=ids, position_ids=position_ids, output_hidden_states=True).hidden_states
                report.compare(name, hidden[int(kind.split("_")[1])], outputs[key])
            elif kind == "tokens":
                text = prompts.get(prompt, {}).get("text")
                if text is None:
                    report.fail(name, f"no prompts.{prompt}.text in {config_path.name}")
                elif tokenizer is not None:
                    report.equal(name, star.tokenizer(text, ids.shape[1]).tolist(), ids.tolist())
                    expected_bpe = prompts[prompt].get("bpe_tokens_without_sot_eot")
                    if expected_bpe is not None:
                        report.equal(f"{config_path.stem}/prompts.{prompt}.bpe_tokens_without_sot_eot",
                                     len(tokenizer.encode(text)), expected_bpe)
            else:
                report.fail(name, "no checker for this key")


def run(fixture_dir: Path, report: Report) -> bool:
    """Checks every ``text_openclip*_outputs.safetensors`` set in ``fixture_dir``."""
    sets = sorted(Path(fixture_dir).glob("text_openclip*" + OUTPUTS_SUFFIX))
    if not sets:
        return False
    tokenizer = _tokenizer()
    for outputs_path in sets:
        _check_set(outputs_path, report, tokenizer)
    return True
