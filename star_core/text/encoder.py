"""STAR's text conditioning: the ``TextEncoder`` protocol and a transformers ``CLIPTextModel`` adapter.

STAR's context is OpenCLIP ViT-H/14's text tower run up to its penultimate block, then the final LayerNorm,
over all 77 positions (padding included; causal mask only, no attention mask, no projection). The adapter builds
a ``CLIPTextModel`` with exactly the blocks that are run, so its ``last_hidden_state`` is that embedding
(``final_layer_norm(hidden_states[-2])`` of the full tower) without computing the unused last block.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from .tokenizer import CONTEXT_LENGTH, ClipTokenizer, load_tokenizer
from .vocab import find_openclip_vocab
from .weights import TextTowerSpec, canonical_text_state_dict, default_run_layers, read_hf_text_config, read_tensors

# File names tried, in order, inside a model folder (Hugging Face first, then open_clip's).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPENCLIP_CONFIG_FILE = "open_clip_config.json"


@runtime_checkable
class TextEncoder(Protocol):
    """Anything that turns prompts into STAR's cross-attention context."""

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Embeddings ``[N, 77, W]`` (W = 1024 for the released model) on ``device`` in ``dtype``."""
        ...


def build_text_model(
    text_state_dict: dict[str, torch.Tensor],
    spec: TextTowerSpec,
    run_layers: int,
    hidden_act: str = "gelu",
    layer_norm_eps: float = 1e-5,
    dtype: torch.dtype = torch.float32,
):
    """A ``CLIPTextModel`` (SDPA attention) holding the first ``run_layers`` blocks of a canonical state dict.

    Parameters:
        text_state_dict (`dict[str, torch.Tensor]`): canonical keys (see `star_core.text.weights`).
        spec (`TextTowerSpec`): tower shape.
        run_layers (`int`): blocks to keep (STAR: all but the last of the full tower).
        hidden_act (`str`, defaults to `"gelu"`): MLP activation (`"quick_gelu"` for OpenAI CLIP towers).
        layer_norm_eps (`float`, defaults to 1e-5): LayerNorm epsilon.
        dtype (`torch.dtype`, defaults to float32): parameter dtype.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    if not 1 <= run_layers <= spec.layers:
        raise ValueError(f"run_layers={run_layers} must be between 1 and the tower's {spec.layers} blocks")
    config = CLIPTextConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.width, intermediate_size=spec.intermediate,
        num_hidden_layers=run_layers, num_attention_heads=spec.heads, max_position_embeddings=spec.positions,
        hidden_act=hidden_act, layer_norm_eps=layer_norm_eps,
    )
    with torch.device("meta"):  # no random init, no second copy of the weights
        model = CLIPTextModel._from_config(config, attn_implementation="sdpa")
    cut = {k: v.to(dtype) for k, v in text_state_dict.items()
           if not k.startswith("encoder.layers.") or int(k.split(".")[2]) < run_layers}
    # transformers 4.x nests the tower under "text_model."; 5.x does not.
    prefix = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
    try:
        model.load_state_dict({prefix + k: v for k, v in cut.items()}, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"the weights are not a complete CLIP text tower of the inferred shape {spec}: {err}") from err
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:  # non-persistent buffers are not in any state dict
            if not name.endswith("position_ids"):
                raise RuntimeError(f"CLIPTextModel buffer {name} could not be initialised")
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner).register_buffer(leaf, torch.arange(spec.positions)[None], persistent=False)
    return model.eval().requires_grad_(False)


class CLIPTextEncoder:
    """``TextEncoder`` over a transformers ``CLIPTextModel`` and an open_clip-compatible tokenizer.

    Parameters:
        model (`CLIPTextModel`): built by `build_text_model` (or any model whose `last_hidden_state` is the context).
        tokenizer (`ClipTokenizer`, *optional*): needed by `encode`; `encode_ids` works without it.
    """

    def __init__(self, model, tokenizer: ClipTokenizer | None = None):
        self.model = model
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "CLIPTextEncoder":
        """Moves the model (e.g. to the GPU for encoding, back to CPU afterwards); returns self."""
        self.model.to(device=device, dtype=dtype)
        return self

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[N, 77, W]`` of token ids ``[N, 77]`` (as produced by the tokenizer)."""
        positions = self.model.config.max_position_embeddings
        vocab = self.model.config.vocab_size
        if ids.ndim != 2 or ids.shape[1] != positions or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"token ids must be an integer tensor [N, {positions}], got {ids.dtype} {tuple(ids.shape)}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab}); got {ids.min().item()}..{ids.max().item()}: "
                             "the tokenizer does not match this text encoder")
        ids = ids.to(self.device, torch.long)
        position_ids = torch.arange(positions, device=self.device)[None].expand(ids.shape[0], -1)
        with torch.no_grad():
            return self.model(input_ids=ids, position_ids=position_ids).last_hidden_state

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Embeddings ``[N, 77, W]`` of prompts (tokenized exactly as ``open_clip.tokenize``)."""
        if self.tokenizer is None:
            raise ValueError("this text encoder has no tokenizer: pass tokenizer= (a ClipTokenizer, open_clip's "
                             "bpe_simple_vocab_16e6.txt.gz or a CLIP tokenizer folder) or run "
                             "star_core.text.fetch_openclip_vocab() once")
        return self.encode_ids(self.tokenizer(texts, self.model.config.max_position_embeddings))


def openclip_text_options(config: dict) -> dict:
    """``heads`` and ``hidden_act`` from an open_clip model config (``open_clip_config.json``'s ``model_cfg``, a
    fixture's ``open_clip_model_cfg``, or the model config itself)."""
    model_cfg = config.get("model_cfg") or config.get("open_clip_model_cfg") or config
    text_cfg = model_cfg.get("text_cfg", {})
    options = {"hidden_act": "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"}
    if "heads" in text_cfg:
        options["heads"] = int(text_cfg["heads"])
    return options


def _folder_sources(folder: Path) -> tuple[Path, dict, Path]:
    """(weights file, options from configs, tokenizer search root) of a model folder."""
    root = folder
    if (folder / "text_encoder").is_dir():  # diffusers SD 2.x pipeline folder
        folder = folder / "text_encoder"
    weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"no text encoder weights in {folder}: expected one of {', '.join(WEIGHT_FILES)}")
    options: dict = {}
    if weights.name.startswith("open_clip") and (folder / OPENCLIP_CONFIG_FILE).is_file():
        options = openclip_text_options(json.loads((folder / OPENCLIP_CONFIG_FILE).read_text(encoding="utf-8")))
    elif (folder / "config.json").is_file():
        text_cfg = read_hf_text_config(folder)
        options = {"heads": text_cfg.get("num_attention_heads"), "hidden_act": text_cfg.get("hidden_act", "gelu"),
                   "layer_norm_eps": text_cfg.get("layer_norm_eps", 1e-5)}
        options = {k: v for k, v in options.items() if v is not None}
    return weights, options, root


def _default_tokenizer(root: Path | None) -> ClipTokenizer | None:
    if root is not None:
        try:
            return load_tokenizer(root)
        except FileNotFoundError:
            pass
    cached = find_openclip_vocab()
    return ClipTokenizer.from_openclip_vocab(cached) if cached else None


def load_text_encoder(
    path: str | Path,
    *,
    tokenizer: ClipTokenizer | str | Path | None = None,
    heads: int | None = None,
    hidden_act: str | None = None,
    run_layers: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> CLIPTextEncoder:
    """Loads STAR's text encoder from local files.

    Accepts a Hugging Face folder (``config.json`` + ``model.safetensors``/``pytorch_model.bin``; a ``CLIPModel``,
    a ``CLIPTextModel`` or a diffusers SD 2.x folder with ``text_encoder/``), open_clip's
    ``open_clip_pytorch_model.bin`` / ``open_clip_model.safetensors``, or a single file of a text tower in either
    key layout (e.g. ComfyUI's ``text_encoders/`` SD 2.x CLIP-H file). The shape is inferred from the weights.

    Parameters:
        path (`str` or `Path`): folder or weights file.
        tokenizer (`ClipTokenizer`, `str` or `Path`, *optional*): tokenizer or where to load it from; by default
            the folder's own tokenizer, else the cached open_clip vocab (`fetch_openclip_vocab`).
        heads (`int`, *optional*): attention heads; default from a config file, else width / 64.
        hidden_act (`str`, *optional*): MLP activation; default from a config file, else `"gelu"` (ViT-H).
        run_layers (`int`, *optional*): blocks to run; default all but the last (STAR's "penultimate"), or all 23
            of an SD 2.x text encoder file (already cut there).
        device (`torch.device` or `str`, defaults to `"cpu"`): where the model runs.
        dtype (`torch.dtype`, defaults to float32): parameter dtype (the official code encodes in float32).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text encoder {path} not found")
    options: dict = {}
    tokenizer_root: Path | None = None
    if path.is_dir():
        path, options, tokenizer_root = _folder_sources(path)
    if heads is not None:
        options["heads"] = heads
    if hidden_act is not None:
        options["hidden_act"] = hidden_act
    raw = read_tensors(path, keep=lambda k: "visual." not in k and "vision_model." not in k)
    text_sd, spec = canonical_text_state_dict(raw, heads=options.get("heads"), name=str(path))
    del raw
    model = build_text_model(
        text_sd, spec, run_layers if run_layers is not None else default_run_layers(spec),
        hidden_act=options.get("hidden_act", "gelu"), layer_norm_eps=options.get("layer_norm_eps", 1e-5), dtype=dtype,
    ).to(device)
    if tokenizer is not None and not isinstance(tokenizer, ClipTokenizer):
        tokenizer = load_tokenizer(tokenizer)
    return CLIPTextEncoder(model, tokenizer if tokenizer is not None else _default_tokenizer(tokenizer_root))
