"""STAR's official prompt strings and caption construction (``suffix="official" | "protected" | "none"``)."""
from __future__ import annotations

from typing import Literal

from .tokenizer import CONTEXT_LENGTH, ClipTokenizer

# Exact strings of the official config (the runs of spaces come from Python line continuations in the source).
POSITIVE_SUFFIX = (
    "Cinematic, High Contrast, highly detailed, taken using a Canon EOS R camera,   hyper detailed photo - realistic "
    "maximum detail, 32k, Color Grading, ultra HD, extreme meticulous detailing,  skin pore detailing, hyper "
    "sharpness, perfect without deformations."
)
NEGATIVE_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, CG Style, 3D render, unreal "
    "engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, jpeg artifacts, "
    "deformed, lowres, over-smooth"
)
DEFAULT_PROMPT = "a good video"

SuffixMode = Literal["official", "protected", "none"]
SUFFIX_MODES: tuple[str, ...] = ("official", "protected", "none")


def fit_prompt_tokens(prompt_ids: list[int], suffix_ids: list[int], context_length: int = CONTEXT_LENGTH) -> list[int]:
    """The longest prefix of ``prompt_ids`` that leaves room for all of ``suffix_ids`` plus start and end tokens.

    Parameters:
        prompt_ids (`list[int]`): BPE ids of the user prompt (no start/end tokens).
        suffix_ids (`list[int]`): BPE ids of the quality suffix.
        context_length (`int`, defaults to 77): text encoder sequence length.
    """
    room = context_length - 2 - len(suffix_ids)
    if room < 0:
        raise ValueError(f"the suffix alone needs {len(suffix_ids) + 2} of the {context_length} text positions")
    return prompt_ids[:room]


def build_caption(
    prompt: str,
    suffix: SuffixMode = "official",
    tokenizer: ClipTokenizer | None = None,
    context_length: int = CONTEXT_LENGTH,
) -> str:
    """The positive caption for ``prompt``.

    Parameters:
        prompt (`str`): user prompt (the official default is `"a good video"`).
        suffix (`str`, defaults to `"official"`):
            `"official"`: prompt immediately followed by the quality suffix, no separator (a prompt longer than ~22
            tokens pushes the end of the suffix past 77 tokens, where it is cut off);
            `"protected"`: the same string when it fits; otherwise the prompt is shortened, token by token, so the
            whole suffix fits (then joined with a space, since the cut prompt no longer ends where the user wrote);
            `"none"`: the prompt alone.
        tokenizer (`ClipTokenizer`, *optional*): needed for `"protected"`; any object with `encode(text) -> ids`
            (BPE ids, no start/end) and `decode(ids) -> text` works, e.g. a host's CLIP-H tokenizer.
        context_length (`int`, defaults to 77): text encoder sequence length.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    if suffix not in SUFFIX_MODES:
        raise ValueError(f"suffix mode {suffix!r} is not one of {list(SUFFIX_MODES)}")
    if suffix == "none":
        return prompt
    official = prompt + POSITIVE_SUFFIX
    if suffix == "official":
        return official
    if tokenizer is None:
        raise ValueError('suffix="protected" needs the tokenizer to count tokens: pass tokenizer=')
    if len(tokenizer.encode(official)) <= context_length - 2:
        return official
    kept = fit_prompt_tokens(tokenizer.encode(prompt), tokenizer.encode(POSITIVE_SUFFIX), context_length)
    # Cut at a word end: a fragment of a cut word re-encodes differently after decoding, so drop tokens until the
    # kept prefix survives the round trip and the suffix still fits behind it.
    while kept:
        text = tokenizer.decode(kept).strip()
        caption = f"{text} {POSITIVE_SUFFIX}"
        if tokenizer.encode(text) == kept and len(tokenizer.encode(caption)) <= context_length - 2:
            return caption
        kept = kept[:-1]
    return POSITIVE_SUFFIX
