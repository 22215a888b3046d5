"""Text-tower weights: safe reading, layout detection (open_clip or Hugging Face CLIP) and conversion.

Everything is converted to one canonical layout, the Hugging Face ``CLIPTextModel`` keys without the
``text_model.`` prefix (``embeddings.token_embedding.weight``, ``encoder.layers.{i}.self_attn.q_proj.weight``, …,
``final_layer_norm.weight``). Files are read with ``weights_only=True`` or safetensors, never unpickled freely.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from ..checkpoint import load_state_dict_file
from ..identify import TEXT_NEEDS, describe_weights

HF_TOKEN_KEY = "embeddings.token_embedding.weight"
OPENCLIP_TOKEN_KEY = "token_embedding.weight"
TOWER_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")
REQUIRED_KEYS = (HF_TOKEN_KEY, "embeddings.position_embedding.weight", "encoder.layers.0.mlp.fc1.weight",
                 "final_layer_norm.weight")
DEFAULT_HEAD_DIM = 64
# The SD 2.x text encoder is OpenCLIP ViT-H's text tower already cut after its 23rd of 24 blocks.
SD2_TEXT_WIDTH, SD2_TEXT_LAYERS = 1024, 23


@dataclass(frozen=True)
class TextTowerSpec:
    """Shape of a CLIP text tower, inferred from weights (and a config when one is given)."""

    vocab_size: int
    width: int
    layers: int
    heads: int
    intermediate: int
    positions: int
    layout: str  # "open_clip" or "hf": where the weights came from


def read_tensors(path: Path, keep: Callable[[str], bool] = lambda key: True) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors or torch file whose key passes ``keep``, loaded on CPU without code execution.

    Safetensors files are read key by key and torch files are memory-mapped (`load_state_dict_file`), so unwanted
    tensors (e.g. a 2.5 GB vision tower beside the text tower) are never read into memory.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text encoder weights {path} not found")
    if path.suffix != ".safetensors":
        return {k: v for k, v in load_state_dict_file(path).items() if keep(k)}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keep(k)}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read {path} as safetensors (truncated or not a safetensors file): {err}") from err


def _tower_prefix(sd: dict[str, torch.Tensor], name: str) -> tuple[str, str]:
    """(layout, key prefix) of the text tower in ``sd`` (a checkpoint may hold other models too)."""
    keys = list(sd)
    for key in keys:
        if key.endswith(HF_TOKEN_KEY):
            return "hf", key[: -len(HF_TOKEN_KEY)]
    for key in keys:
        if key.endswith(OPENCLIP_TOKEN_KEY) and key[: -len(OPENCLIP_TOKEN_KEY)] + "positional_embedding" in keys:
            return "open_clip", key[: -len(OPENCLIP_TOKEN_KEY)]
    what = describe_weights(sd)
    looks = f"it looks like {what}" if what else f"its first keys are {sorted(keys)[:4]}"
    raise ValueError(f"{name} holds no CLIP text tower: {looks} (expected open_clip keys token_embedding.weight, "
                     f"positional_embedding, transformer.resblocks.* or Hugging Face CLIPTextModel keys "
                     f"text_model.embeddings.token_embedding.weight, …). {TEXT_NEEDS}")


def _openclip_to_hf(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Renames an open_clip text tower to canonical keys, splitting the fused q/k/v projection."""
    missing = [k for k in ("positional_embedding", "ln_final.weight", "ln_final.bias") if prefix + k not in sd]
    if missing:
        raise ValueError(f"open_clip text tower is incomplete: missing {[prefix + k for k in missing]}")
    out = {
        "embeddings.token_embedding.weight": sd[prefix + "token_embedding.weight"],
        "embeddings.position_embedding.weight": sd[prefix + "positional_embedding"],
        "final_layer_norm.weight": sd[prefix + "ln_final.weight"],
        "final_layer_norm.bias": sd[prefix + "ln_final.bias"],
    }
    renames = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
               "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    block = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
    for key, value in sd.items():
        if not key.startswith(prefix + "transformer.resblocks."):
            continue
        match = block.match(key.replace(".in_proj_", ".in_proj."))
        name = match.group(2) if match else None
        if name == "attn.in_proj":
            index, kind = match.group(1), match.group(3)
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"encoder.layers.{index}.self_attn.{proj}.{kind}"] = part
        elif name in renames:
            out[f"encoder.layers.{match.group(1)}.{renames[name]}.{match.group(3)}"] = value
        else:
            raise ValueError(f"unsupported open_clip text-tower key {key} (only the plain ViT text block is known)")
    return out


def _count_layers(sd: dict[str, torch.Tensor]) -> int:
    indices = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    if indices != set(range(len(indices))):
        raise ValueError(f"text tower blocks are not numbered 0..N-1: found {sorted(indices)}")
    return len(indices)


def canonical_text_state_dict(
    sd: dict[str, torch.Tensor], heads: int | None = None, name: str = "these weights"
) -> tuple[dict[str, torch.Tensor], TextTowerSpec]:
    """Canonical text-tower state dict and its spec from an open_clip or Hugging Face layout state dict.

    Parameters:
        sd (`dict[str, torch.Tensor]`): weights in either layout, possibly with a prefix and unrelated keys
            (`visual.*`, `vision_model.*`, `text_projection`, `logit_scale` are ignored).
        heads (`int`, *optional*): attention heads; by default `width / 64` (ViT-H: 1024 / 64 = 16).
        name (`str`): the file the weights came from, for messages.
    """
    layout, prefix = _tower_prefix(sd, name)
    if layout == "open_clip":
        text = _openclip_to_hf(sd, prefix)
    else:
        text = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        # Only the tower itself (a text_projection or position_ids buffer may sit beside it).
        text = {k: v for k, v in text.items() if k.startswith(TOWER_ROOTS) and not k.endswith("position_ids")}
    missing = [k for k in REQUIRED_KEYS if k not in text]
    if missing:
        raise ValueError(f"the CLIP text tower in these weights is incomplete: missing {missing}")
    vocab_size, width = text[HF_TOKEN_KEY].shape
    layers = _count_layers(text)
    if layers == 0:
        raise ValueError("the text tower has no transformer blocks")
    heads = heads if heads is not None else max(width // DEFAULT_HEAD_DIM, 1)
    if width % heads:
        raise ValueError(f"text width {width} is not divisible by heads={heads}; pass the right head count")
    spec = TextTowerSpec(
        vocab_size=vocab_size,
        width=width,
        layers=layers,
        heads=heads,
        intermediate=text["encoder.layers.0.mlp.fc1.weight"].shape[0],
        positions=text["embeddings.position_embedding.weight"].shape[0],
        layout=layout,
    )
    return text, spec


def default_run_layers(spec: TextTowerSpec) -> int:
    """Blocks STAR runs: all but the last ("penultimate" layer), except for the SD 2.x text encoder file, whose
    23 blocks already stop at ViT-H's penultimate one."""
    if spec.layout == "hf" and (spec.width, spec.layers) == (SD2_TEXT_WIDTH, SD2_TEXT_LAYERS):
        return spec.layers
    return max(spec.layers - 1, 1)


def read_hf_text_config(folder: Path) -> dict:
    """The text part of a Hugging Face ``config.json`` (``CLIPTextConfig`` or a ``CLIPConfig``'s ``text_config``)."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return config.get("text_config", config)
