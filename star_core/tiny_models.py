"""Writes a ComfyUI-style models tree with random weights in the real file layouts, for tests and host checks.

``python -m star_core.tiny_models DIR [--parts ...] [--seed N]`` creates under ``DIR``:

* ``STAR/star_tiny.safetensors`` — a tiny STAR UNet + ControlNet + LIEM in the official key layout (the same
  names as ``light_deg.pt``), small enough to sample on a CPU in seconds;
* ``vae/svd_vae_tiny.safetensors`` — a narrow SVD temporal-decoder VAE in the original (ComfyUI) key layout, for
  the STAR VAE Loader (widths are read from the weights);
* ``vae/svd_vae_random.safetensors`` — a full-width SVD VAE (fp16): ComfyUI's own VAE loader builds the SVD VAE
  with a fixed configuration, so only the released widths load there;
* ``text_encoders/clip_h_random.safetensors`` — a full-width SD 2.x CLIP-H text encoder (fp16) in the layout
  ComfyUI's CLIP loader detects (``text_model.encoder.layers.22…``); its configuration is fixed as well.

The outputs are noise; the files only prove that loaders, shapes and graphs work end to end.
"""
from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

# The tiny network of the fixtures: 3 levels (32/64/128 channels), attention at the first two.
TINY_STAR = dict(dim=32, dim_mult=(1, 2, 4), num_heads=2, head_dim=16, num_res_blocks=1, attn_scales=(1.0, 0.5))
# SVD VAE widths: the narrow test VAE and the released one (which ComfyUI hard-codes).
TINY_VAE = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1)
FULL_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2)
# SD 2.x text encoder as ComfyUI builds it (sd2_clip_config.json): OpenCLIP ViT-H/14 text tower.
CLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
              num_attention_heads=16, max_position_embeddings=77, projection_dim=1024, hidden_act="gelu")

PARTS = ("star", "vae_tiny", "vae_full", "clip_h")
FILES = {
    "star": "STAR/star_tiny.safetensors",
    "vae_tiny": "vae/svd_vae_tiny.safetensors",
    "vae_full": "vae/svd_vae_random.safetensors",
    "clip_h": "text_encoders/clip_h_random.safetensors",
}


def random_weights(shapes: Mapping[str, tuple[int, ...]], seed: int, dtype: torch.dtype = torch.float32,
                   norm_keys: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """
    Deterministic random tensors in the recipe of the fixtures: norm weights ``1 + 0.1·randn``, other 1-D tensors
    ``0.05·randn``, everything else ``randn / sqrt(fan_in)``, so activations keep a sane scale through deep stacks.

    Parameters:
        shapes (`Mapping[str, tuple[int, ...]]`): key → shape, in the order to draw.
        seed (`int`): seed of the dedicated generator.
        dtype (`torch.dtype`): storage dtype of the result.
        norm_keys (`Iterable[str]`): the keys that are normalisation-layer weights.
    """
    generator = torch.Generator().manual_seed(seed)
    norms = set(norm_keys)
    out = {}
    for key, shape in shapes.items():
        value = torch.randn(shape, generator=generator)
        if len(shape) <= 1:
            value = 1 + 0.1 * value if key in norms else 0.05 * value
        else:
            value = value / _fan_in(shape) ** 0.5
        out[key] = value.to(dtype)
    return out


def _fan_in(shape: tuple[int, ...]) -> int:
    fan = 1
    for size in shape[1:]:
        fan *= size
    return fan


def _meta_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _norm_keys(module: torch.nn.Module) -> set[str]:
    return {f"{name}.weight" for name, m in module.named_modules()
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))}


def star_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny STAR network's state dict in the official key layout (float32)."""
    from .model import STARConfig, STARUNet

    with torch.device("meta"):
        model = STARUNet(STARConfig(**TINY_STAR))
    return random_weights(_meta_shapes(model), seed, norm_keys=_norm_keys(model))


def svd_vae_weights(block_out_channels: tuple[int, ...], layers_per_block: int, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """
    An SVD temporal-decoder VAE state dict in the original layout (what ComfyUI and the STAR VAE Loader read).

    Parameters:
        block_out_channels (`tuple[int, ...]`), layers_per_block (`int`): the widths and depth.
        seed (`int`): weight seed.
        dtype (`torch.dtype`): storage dtype.
    """
    from diffusers import AutoencoderKLTemporalDecoder

    from .vae.convert_svd import diffusers_to_svd

    levels = len(block_out_channels)
    with torch.device("meta"):
        vae = AutoencoderKLTemporalDecoder(down_block_types=("DownEncoderBlock2D",) * levels,
                                           block_out_channels=tuple(block_out_channels),
                                           layers_per_block=layers_per_block, latent_channels=4)
    weights = random_weights(_meta_shapes(vae), seed, norm_keys=_norm_keys(vae))
    channels = weights["quant_conv.weight"].shape[0]
    # No quant_conv in the original layout: an identity one converts away, as in the released SVD VAE.
    weights["quant_conv.weight"] = torch.eye(channels)[:, :, None, None]
    weights["quant_conv.bias"] = torch.zeros(channels)
    weights["decoder.conv_out.weight"] *= 0.5  # keeps decoded frames mostly inside [-1, 1]
    return {k: v.to(dtype) for k, v in diffusers_to_svd(weights).items()}


def _clip_h_meta() -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with torch.device("meta"):
        return CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_H))


def clip_h_shapes() -> dict[str, tuple[int, ...]]:
    """Key → shape of the SD 2.x CLIP-H text encoder in the HF ``CLIPTextModelWithProjection`` layout."""
    return {k: v for k, v in _meta_shapes(_clip_h_meta()).items() if not k.endswith("position_ids")}


def clip_h_weights(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """A full-width SD 2.x CLIP-H text encoder with random weights, in the layout ComfyUI's CLIP loader detects."""
    return random_weights(clip_h_shapes(), seed, dtype, norm_keys=_norm_keys(_clip_h_meta()))


def write_tree(root: Path | str, parts: Iterable[str] = PARTS, seed: int = 0) -> dict[str, Path]:
    """
    Writes the requested parts of the tiny models tree (see the module docstring).

    Parameters:
        root (`Path`): the models directory (ComfyUI's ``models/``).
        parts (`Iterable[str]`): any of ``"star"``, ``"vae_tiny"``, ``"vae_full"``, ``"clip_h"``.
        seed (`int`): base weight seed (each part adds its own offset).

    Returns:
        `dict[str, Path]`: part → written file.
    """
    root = Path(root)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown tiny-model parts {unknown}; choose from {list(PARTS)}")
    makers = {
        "star": lambda: star_weights(seed),
        "vae_tiny": lambda: svd_vae_weights(seed=seed + 1, **TINY_VAE),
        "vae_full": lambda: svd_vae_weights(seed=seed + 2, dtype=torch.float16, **FULL_VAE),
        "clip_h": lambda: clip_h_weights(seed + 3),
    }
    written = {}
    for part in PARTS:
        if part not in parts:
            continue
        path = root / FILES[part]
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(makers[part](), str(path), metadata={"format": "pt", "star_tiny_models": part})
        written[part] = path
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m star_core.tiny_models", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="models directory to write (ComfyUI's models/)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)} (default: all; the full-width parts "
                             "take ~0.9 GB)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    try:
        written = write_tree(args.dir, parts, args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    for part, path in written.items():
        print(f"{part}: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
