"""Key conversion between the original SVD VAE layout and diffusers' `AutoencoderKLTemporalDecoder` layout.

The original layout (Stability generative-models `AutoencodingEngine` + `VideoDecoder`, also what ComfyUI loads)
names modules ``encoder.down.{i}.block.{j}``, ``encoder.mid.attn_1`` (1×1 convolutions ``q/k/v/proj_out``) and,
in the decoder, ``decoder.up.{k}.block.{j}`` whose level index ``k`` counts from the *highest* resolution, with
temporal parts ``time_stack.{in,out}_layers`` and a bare ``mix_factor``, and ``decoder.conv_out.time_mix_conv``.
It has no ``quant_conv``: the posterior is read from the encoder output directly, which diffusers expresses
with an identity ``quant_conv``.
"""
from __future__ import annotations

import torch

# Markers that identify each layout (present in every SVD VAE, absent from image-only VAEs).
SVD_MARKER = "decoder.conv_out.time_mix_conv.weight"
DIFFUSERS_MARKER = "decoder.time_conv_out.weight"
# Prefixes under which full checkpoints (SVD: first_stage_model, some exports: vae) store the VAE.
CHECKPOINT_PREFIXES = ("first_stage_model.", "vae.")

_RESNET = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
           ("nin_shortcut", "conv_shortcut"))
_ATTENTION = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))
_TEMPORAL = (("time_stack.in_layers.0", "temporal_res_block.norm1"),
             ("time_stack.in_layers.2", "temporal_res_block.conv1"),
             ("time_stack.out_layers.0", "temporal_res_block.norm2"),
             ("time_stack.out_layers.3", "temporal_res_block.conv2"))


def _key_table(levels: int, layers_per_block: int) -> tuple[dict[str, str], set[str]]:
    """Parameter-level map original → diffusers, and the original keys stored as 1×1 convolutions."""
    table: dict[str, str] = {}
    convolutional: set[str] = set()

    def module(old: str, new: str) -> None:
        table.update({f"{old}.weight": f"{new}.weight", f"{old}.bias": f"{new}.bias"})

    def resnet(old: str, new: str, video: bool) -> None:
        for a, b in _RESNET:
            module(f"{old}.{a}", f"{new}.spatial_res_block.{b}" if video else f"{new}.{b}")
        if video:
            for a, b in _TEMPORAL:
                module(f"{old}.{a}", f"{new}.{b}")
            table[f"{old}.mix_factor"] = f"{new}.time_mixer.mix_factor"

    def attention(old: str, new: str) -> None:
        for a, b in _ATTENTION:
            module(f"{old}.{a}", f"{new}.{b}")
        convolutional.update(f"{old}.{a}.weight" for a in ("q", "k", "v", "proj_out"))

    module("encoder.conv_in", "encoder.conv_in")
    module("quant_conv", "quant_conv")
    for i in range(levels):
        for j in range(layers_per_block):
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", video=False)
        if i < levels - 1:
            module(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    for side, video in (("encoder", False), ("decoder", True)):
        resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", video)
        attention(f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0")
        resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", video)
        module(f"{side}.norm_out", f"{side}.conv_norm_out")
        module(f"{side}.conv_out", f"{side}.conv_out")
    module("decoder.conv_in", "decoder.conv_in")
    module("decoder.conv_out.time_mix_conv", "decoder.time_conv_out")
    for k in range(levels):
        up = levels - 1 - k  # the original counts decoder levels from full resolution, diffusers from the latent
        for j in range(layers_per_block + 1):
            resnet(f"decoder.up.{k}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}", video=True)
        if k > 0:
            module(f"decoder.up.{k}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv")
    return table, convolutional


def strip_checkpoint_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Returns the VAE part of a full checkpoint (keys under ``first_stage_model.`` or ``vae.``) or the input."""
    for prefix in CHECKPOINT_PREFIXES:
        if prefix + SVD_MARKER in state_dict or prefix + DIFFUSERS_MARKER in state_dict:
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return state_dict


def _count(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    """Number of distinct integer indices ``n`` in keys ``prefix{n}.…``."""
    found = {key[len(prefix):].split(".", 1)[0] for key in state_dict if key.startswith(prefix)}
    return len({int(i) for i in found if i.isdigit()})


def svd_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Converts an original-layout SVD VAE state dict to diffusers' `AutoencoderKLTemporalDecoder` keys.

    Parameters:
        state_dict (`dict[str, torch.Tensor]`): keys like ``decoder.up.0.block.0.time_stack.in_layers.0.weight``.

    Returns:
        `dict[str, torch.Tensor]`: diffusers keys; a missing ``quant_conv`` becomes the identity.
    """
    levels = _count(state_dict, "encoder.down.")
    layers = _count(state_dict, "encoder.down.0.block.")
    if levels == 0 or layers == 0 or SVD_MARKER not in state_dict:
        raise ValueError("not an original-layout SVD VAE state dict: expected keys 'encoder.down.N.block.M.*' and "
                         f"'{SVD_MARKER}'")
    table, convolutional = _key_table(levels, layers)
    unknown = sorted(set(state_dict) - set(table))
    if unknown:
        raise ValueError(f"unexpected keys for an SVD VAE with {levels} levels × {layers} layers: {unknown[:8]}"
                         f"{' …' if len(unknown) > 8 else ''}")
    converted = {table[k]: (v.flatten(1) if k in convolutional else v) for k, v in state_dict.items()}
    if "quant_conv.weight" not in converted:
        channels = converted["encoder.conv_out.weight"].shape[0]
        dtype = converted["encoder.conv_out.weight"].dtype
        converted["quant_conv.weight"] = torch.eye(channels, dtype=dtype)[:, :, None, None]
        converted["quant_conv.bias"] = torch.zeros(channels, dtype=dtype)
    return converted


def diffusers_to_svd(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Converts diffusers `AutoencoderKLTemporalDecoder` keys to the original SVD layout (inverse of
    `svd_to_diffusers`); an identity ``quant_conv`` is dropped, any other is kept under its own name.

    Parameters:
        state_dict (`dict[str, torch.Tensor]`): diffusers keys.

    Returns:
        `dict[str, torch.Tensor]`: original-layout keys.
    """
    config = infer_config(state_dict)
    table, convolutional = _key_table(len(config["block_out_channels"]), config["layers_per_block"])
    inverse = {new: old for old, new in table.items()}
    unknown = sorted(set(state_dict) - set(inverse))
    if unknown:
        raise ValueError(f"unexpected keys for a diffusers AutoencoderKLTemporalDecoder: {unknown[:8]}"
                         f"{' …' if len(unknown) > 8 else ''}")
    converted = {inverse[k]: (v[:, :, None, None] if inverse[k] in convolutional else v)
                 for k, v in state_dict.items()}
    weight, bias = converted.get("quant_conv.weight"), converted.get("quant_conv.bias")
    if weight is not None and bias is not None:
        identity = torch.eye(weight.shape[0], dtype=weight.dtype)[:, :, None, None]
        if weight.shape == identity.shape and torch.equal(weight, identity) and not bias.any():
            del converted["quant_conv.weight"], converted["quant_conv.bias"]
    return converted


def infer_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """Reads the `AutoencoderKLTemporalDecoder` constructor arguments from a diffusers-layout state dict.

    Parameters:
        state_dict (`dict[str, torch.Tensor]`): diffusers keys.

    Returns:
        `dict`: ``in_channels``, ``out_channels``, ``down_block_types``, ``block_out_channels``,
        ``layers_per_block``, ``latent_channels``, ``scaling_factor`` (0.18215, the SVD value; not stored in
        weights) and ``force_upcast``.
    """
    levels = _count(state_dict, "encoder.down_blocks.")
    layers = _count(state_dict, "encoder.down_blocks.0.resnets.")
    if levels == 0 or layers == 0 or DIFFUSERS_MARKER not in state_dict:
        raise ValueError("not a diffusers AutoencoderKLTemporalDecoder state dict: expected keys "
                         f"'encoder.down_blocks.N.resnets.M.*' and '{DIFFUSERS_MARKER}'")
    return {
        "in_channels": state_dict["encoder.conv_in.weight"].shape[1],
        "out_channels": state_dict["decoder.conv_out.weight"].shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "block_out_channels": [state_dict[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]
                               for i in range(levels)],
        "layers_per_block": layers,
        "latent_channels": state_dict["decoder.conv_in.weight"].shape[1],
        "scaling_factor": 0.18215,
        "force_upcast": True,
    }
