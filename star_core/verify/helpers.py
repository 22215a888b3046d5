"""Verify group ``helpers``: ``pipeline_helpers.json`` — official pad plans, chunk plans, prompts and token ids."""
from __future__ import annotations

import json
from pathlib import Path

from ..diffusion.chunking import plan_chunks
from ..windows import official_spans
from ..geometry import pad_to_fit
from ..text import NEGATIVE_PROMPT, POSITIVE_SUFFIX, ClipTokenizer, fetch_openclip_vocab
from .report import Report

HELPERS_FILE = "pipeline_helpers.json"
# Prompt strings stored in the file and the constants they must equal.
PROMPT_CONSTANTS = {"positive_prompt": POSITIVE_SUFFIX, "negative_prompt": NEGATIVE_PROMPT}


def _size(key: str) -> tuple[int, int]:
    """``"960x1704"`` → (960, 1704)."""
    h, w = key.lower().split("x")
    return int(h), int(w)


def _frames_and_len(key: str) -> tuple[int, int]:
    """``"F72_L32"`` → (72, 32)."""
    f, l = key.upper().split("_")
    return int(f.lstrip("F")), int(l.lstrip("L"))


def _token_text(key: str, helpers: dict) -> str:
    """The text a token key names: parts joined by ``" + "``, each a stored prompt name, ``"empty"`` or a
    literal (``"a good video + positive_prompt"`` → ``"a good video" + positive_prompt``, no separator)."""
    parts = []
    for part in key.split(" + "):
        if isinstance(helpers.get(part), str):
            parts.append(helpers[part])
        elif part == "empty":
            parts.append("")
        else:
            parts.append(part)
    return "".join(parts)


def _tokenizer(report: Report, name: str) -> ClipTokenizer | None:
    try:
        return ClipTokenizer.from_openclip_vocab(fetch_openclip_vocab())
    except RuntimeError as err:
        report.fail(name, f"open_clip BPE vocab unavailable: {err}")
        return None


def run(fixture_dir: Path, report: Report) -> bool:
    """
    Checks every case of `pipeline_helpers.json` in `fixture_dir`.

    Parameters:
        fixture_dir (`Path`): a fixture directory.
        report (`Report`): where the lines go.

    Returns:
        `bool`: False when the directory has no `pipeline_helpers.json`.
    """
    path = fixture_dir / HELPERS_FILE
    if not path.is_file():
        return False
    helpers = json.loads(path.read_text())
    stem = path.stem
    for key, expected in helpers.get("pad_to_fit", {}).items():
        report.equal(f"{stem}/pad_to_fit/{key}", list(pad_to_fit(*_size(key))), list(expected))
    for key, expected in helpers.get("make_chunks", {}).items():
        frames, chunk_len = _frames_and_len(key)
        expected = [list(w) for w in expected]
        report.equal(f"{stem}/make_chunks/{key}", [list(w) for w in official_spans(frames, chunk_len)], expected)
        if len(expected) > 1:  # a plan the official stitching can run: the sampler's plan must be the same
            plan = plan_chunks(frames, chunk_len, fusion="official")
            report.equal(f"{stem}/make_chunks/{key}/plan_chunks", [list(w) for w in plan.spans], expected)
    for key, constant in PROMPT_CONSTANTS.items():
        if key in helpers:
            report.equal(f"{stem}/{key}", constant, helpers[key])
    tokens = helpers.get("open_clip_tokens", {})
    if tokens:
        tokenizer = _tokenizer(report, f"{stem}/open_clip_tokens")
        if tokenizer is not None:
            for key, expected in tokens.items():
                ids = tokenizer([_token_text(key, helpers)])[0].tolist()
                report.equal(f"{stem}/open_clip_tokens/{key}", ids, list(expected))
    return True
