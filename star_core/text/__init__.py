"""STAR text conditioning: open_clip-compatible tokenizer, official prompts, CLIP text encoder adapters."""
from .encoder import CLIPTextEncoder, TextEncoder, build_text_model, load_text_encoder, openclip_text_options
from .prompts import (
    DEFAULT_PROMPT,
    NEGATIVE_PROMPT,
    POSITIVE_SUFFIX,
    SUFFIX_MODES,
    SuffixMode,
    build_caption,
    fit_prompt_tokens,
)
from .tokenizer import CONTEXT_LENGTH, ClipTokenizer, load_tokenizer
from .vocab import fetch_openclip_vocab, find_openclip_vocab

__all__ = [
    "CLIPTextEncoder", "TextEncoder", "build_text_model", "load_text_encoder", "openclip_text_options",
    "DEFAULT_PROMPT", "NEGATIVE_PROMPT", "POSITIVE_SUFFIX", "SUFFIX_MODES", "SuffixMode", "build_caption",
    "fit_prompt_tokens", "CONTEXT_LENGTH", "ClipTokenizer", "load_tokenizer", "fetch_openclip_vocab",
    "find_openclip_vocab",
]
