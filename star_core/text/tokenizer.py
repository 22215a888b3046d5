"""CLIP byte-level BPE tokenizer giving the same ids as ``open_clip.tokenize`` (what STAR's text encoder sees).

The merges come from open_clip's ``bpe_simple_vocab_16e6.txt.gz`` or from a Hugging Face CLIP tokenizer folder
(``vocab.json`` + ``merges.txt``); both describe the same 49408-entry vocabulary and give identical ids.
"""
from __future__ import annotations

import functools
import gzip
import html
import json
import unicodedata
from pathlib import Path

import regex
import torch

CONTEXT_LENGTH = 77
# open_clip reads exactly this many merges from its vocab file (49152 BPE entries - 256 bytes - 2 specials).
NUM_MERGES = 49152 - 256 - 2
OPENCLIP_VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
_OPENCLIP_SPECIALS = ("<start_of_text>", "<end_of_text>")
_HF_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
_WORD_END = "</w>"

# open_clip's split: its two special tokens, English contractions, letter runs, single digits, other symbol runs.
_PATTERN = regex.compile(
    r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")
_TERMINAL_ESCAPE = regex.compile(r"\x1b\[[\d;]*[a-zA-Z]")
_WIDTH_FORMS = regex.compile(r"[\uff01-\uff5e\uff61-\uff9f]+")  # full-width ASCII, half-width katakana
# Typographic quotes and ligatures that open_clip's ftfy pass turns into plain characters.
_PLAIN_CHARS = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"',
    "\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl",
})


@functools.lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """CLIP's reversible byte → character map: printable Latin-1 bytes map to themselves, the other 68 bytes to
    code points 256, 257, … in byte order. Dict order (printable bytes first) is the order of the first vocab ids."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    others = sorted(set(range(256)) - set(printable))
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def clean_text(text: str) -> str:
    """open_clip's text normalisation: unicode fix-up, double HTML unescape, whitespace collapse, lower case.

    open_clip runs ``ftfy.fix_text`` first; this applies the parts of it that change ordinary prompts (NFC, plain
    quotes, ligatures, full/half-width forms, terminal colour codes) without depending on ftfy; only its mojibake
    repair is not reproduced.
    """
    text = _TERMINAL_ESCAPE.sub("", unicodedata.normalize("NFC", text).translate(_PLAIN_CHARS))
    text = _WIDTH_FORMS.sub(lambda m: unicodedata.normalize("NFKC", m.group(0)), text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


class ClipTokenizer:
    """open_clip-compatible CLIP tokenizer.

    Parameters:
        vocab (`dict[str, int]`): BPE symbol → id, including the start and end tokens.
        merges (`list[tuple[str, str]]`): merge rules, highest priority first.
        start_token (`str`): name of the start-of-text symbol in ``vocab``.
        end_token (`str`): name of the end-of-text symbol in ``vocab``.
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], start_token: str, end_token: str):
        for name in (start_token, end_token):
            if name not in vocab:
                raise ValueError(f"tokenizer vocabulary has no special token {name!r}")
        self.vocab = vocab
        self.id_to_symbol = {i: s for s, i in vocab.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.start_id = vocab[start_token]
        self.end_id = vocab[end_token]
        self._specials = {_OPENCLIP_SPECIALS[0]: self.start_id, _OPENCLIP_SPECIALS[1]: self.end_id}
        self._bytes = byte_alphabet()
        self._unbytes = {c: b for b, c in self._bytes.items()}
        self._word_ids = functools.lru_cache(maxsize=1 << 16)(self._bpe_ids)

    @classmethod
    def from_openclip_vocab(cls, path: str | Path) -> "ClipTokenizer":
        """Reads open_clip's ``bpe_simple_vocab_16e6.txt(.gz)`` (a header line, then one merge per line)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"CLIP BPE vocab file {path} not found")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1 : NUM_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{path} is not a CLIP BPE merges file: expected {NUM_MERGES} lines of two symbols "
                             f"after the header")
        alphabet = list(byte_alphabet().values())
        symbols = alphabet + [c + _WORD_END for c in alphabet] + ["".join(m) for m in merges]
        symbols += list(_OPENCLIP_SPECIALS)
        return cls({s: i for i, s in enumerate(symbols)}, merges, *_OPENCLIP_SPECIALS)

    @classmethod
    def from_hf_folder(cls, folder: str | Path) -> "ClipTokenizer":
        """Reads a Hugging Face ``CLIPTokenizer`` folder (``vocab.json`` + ``merges.txt``)."""
        folder = Path(folder)
        missing = [n for n in ("vocab.json", "merges.txt") if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} is not a CLIP tokenizer folder: missing {', '.join(missing)}")
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
        if any(len(m) != 2 for m in merges):
            raise ValueError(f"{folder / 'merges.txt'} has lines that are not two symbols")
        return cls(vocab, merges, *_HF_SPECIALS)

    def _bpe_ids(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-split word (already byte-mapped): merge the best-ranked adjacent pair until none applies."""
        parts = list(word[:-1]) + [word[-1] + _WORD_END]
        while len(parts) > 1:
            pairs = list(zip(parts, parts[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, len(self.ranks)))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(self.vocab[p] for p in parts)

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without the start/end tokens."""
        ids: list[int] = []
        for piece in _PATTERN.findall(clean_text(text)):
            special = self._specials.get(piece)
            if special is not None:
                ids.append(special)
            else:
                ids.extend(self._word_ids("".join(self._bytes[b] for b in piece.encode("utf-8"))))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of BPE ids (lower case, words separated by single spaces; start/end/padding ids dropped)."""
        skip = {self.start_id, self.end_id, 0}
        raw = bytearray()
        for symbol in (self.id_to_symbol[i] for i in ids if i not in skip):
            word_end = symbol.endswith(_WORD_END)
            raw.extend(self._unbytes[c] for c in (symbol[: -len(_WORD_END)] if word_end else symbol))
            if word_end:
                raw.extend(b" ")
        return raw.decode("utf-8", errors="replace").strip()

    def frame(self, ids: list[int], context_length: int = CONTEXT_LENGTH) -> list[int]:
        """``[start] + ids + [end]`` cut to ``context_length`` (last id forced to end) and zero padded."""
        framed = [self.start_id, *ids, self.end_id]
        if len(framed) > context_length:
            framed = framed[:context_length]
            framed[-1] = self.end_id
        return framed + [0] * (context_length - len(framed))

    def __call__(self, texts: str | list[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
        """Token ids ``[N, context_length]`` int64, exactly as ``open_clip.tokenize``.

        Parameters:
            texts (`str` or `list[str]`): prompt(s).
            context_length (`int`, defaults to 77): sequence length of the text encoder.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not all(isinstance(t, str) for t in texts):
            raise ValueError(f"texts must be strings, got {[type(t).__name__ for t in texts]}")
        return torch.tensor([self.frame(self.encode(t), context_length) for t in texts], dtype=torch.long)


def load_tokenizer(path: str | Path) -> ClipTokenizer:
    """Loads a tokenizer from open_clip's vocab file, a Hugging Face tokenizer folder, or a model folder holding
    either (directly or in a ``tokenizer/`` subfolder, as SD 2.x diffusers folders do).

    Parameters:
        path (`str` or `Path`): vocab file or folder.
    """
    path = Path(path)
    if path.is_file():
        return ClipTokenizer.from_openclip_vocab(path)
    for folder in (path, path / "tokenizer"):
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return ClipTokenizer.from_hf_folder(folder)
        if (folder / OPENCLIP_VOCAB_NAME).is_file():
            return ClipTokenizer.from_openclip_vocab(folder / OPENCLIP_VOCAB_NAME)
    raise FileNotFoundError(f"no CLIP tokenizer at {path}: give open_clip's {OPENCLIP_VOCAB_NAME}, or a folder with "
                            "vocab.json and merges.txt (a Hugging Face CLIP tokenizer)")
