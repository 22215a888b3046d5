"""Making a loaded `STARUNet` trainable: the trainable set, dropout, activation checkpointing, fp32 master weights.

Nothing here changes the state-dict names: dropout goes into parameter-free slots and checkpointing wraps the
``forward`` of layer instances, so a trained model saves and loads like any STAR checkpoint.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..model.resblock import ResBlock, TemporalConvBlock
from ..model.transformer import SpatialTransformer, TemporalTransformer

CONTROLNET = "VideoControlNet."
# official: every VideoControlNet parameter plus every parameter whose name contains "local" (the LIEM gates)
TRAINABLE_SETS = {
    "official": "the whole ControlNet plus every LIEM ('local') weight, the official set",
    "controlnet": "the whole ControlNet only",
    "liem": "only the LIEM ('local') weights, in the UNet and the ControlNet",
}
# official dropout p of the ResBlocks and temporal conv blocks (the released config's dropout=0.1)
DROPOUT_P = 0.1
DROPOUT_MODES = {
    "trainable": "dropout in the trained network (the ControlNet); the frozen UNet runs as at inference",
    "official": "dropout in every ResBlock and temporal conv block, UNet included (the released training)",
    "off": "no dropout",
}
CHECKPOINTED = (ResBlock, SpatialTransformer, TemporalTransformer)


def is_trainable(name: str, which: str = "official") -> bool:
    """Whether parameter ``name`` (official key) belongs to the trainable set ``which`` (see `TRAINABLE_SETS`)."""
    if which not in TRAINABLE_SETS:
        raise ValueError(f"trainable set must be one of {sorted(TRAINABLE_SETS)}, got {which!r}")
    in_controlnet, is_local = name.startswith(CONTROLNET), "local" in name
    return {"official": in_controlnet or is_local, "controlnet": in_controlnet, "liem": is_local}[which]


def trainable_names(model: nn.Module, which: str = "official") -> list[str]:
    """The names of the trainable parameters, in ``named_parameters()`` order."""
    return [name for name, _ in model.named_parameters() if is_trainable(name, which)]


def set_dropout(model: nn.Module, mode: str = "trainable", p: float = DROPOUT_P) -> int:
    """
    Puts the official dropout layers back (the inference model has parameter-free identities in their place):
    after the SiLU of each ResBlock's ``out_layers`` and before the conv of temporal conv stages 2–4. They act
    only in training mode (``model.train()``).

    Parameters:
        model (`nn.Module`): a `STARUNet`.
        mode (`str`): see `DROPOUT_MODES`.
        p (`float`): drop probability.

    Returns:
        `int`: number of dropout layers now active in training mode.
    """
    if mode not in DROPOUT_MODES:
        raise ValueError(f"dropout mode must be one of {sorted(DROPOUT_MODES)}, got {mode!r}")
    count = 0
    for name, module in model.named_modules():
        active = mode == "official" or (mode == "trainable" and name.startswith(CONTROLNET))
        rate = p if active else 0.0
        if isinstance(module, ResBlock):
            module.out_layers[1] = _silu_dropout(rate)
            count += rate > 0
        elif isinstance(module, TemporalConvBlock):
            for stage in (module.conv2, module.conv3, module.conv4):
                stage[2] = nn.Dropout(rate) if rate > 0 else nn.Identity()
                count += rate > 0
    return count


def _silu_dropout(p: float) -> nn.Module:
    return nn.Sequential(nn.SiLU(), nn.Dropout(p)) if p > 0 else nn.SiLU()


def _checkpointed_forward(forward, *args, **kwargs):
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def set_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """
    Activation checkpointing (non-reentrant ``torch.utils.checkpoint``) on every ResBlock and spatial / temporal
    transformer: their activations are recomputed in backward instead of kept (about a third more compute).
    Dropout masks are reproduced in the recomputation (the RNG state is restored).

    Returns:
        `int`: number of wrapped layers.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, CHECKPOINTED):
            module.__dict__.pop("forward", None)  # back to the class's forward
            if enabled:
                module.forward = functools.partial(_checkpointed_forward, module.forward)
                count += 1
    return count


def prepare_for_training(model: nn.Module, *, trainable: str = "official", dropout: str = "trainable",
                         dropout_p: float = DROPOUT_P, checkpointing: bool = False,
                         master_dtype: torch.dtype = torch.float32) -> list[tuple[str, nn.Parameter]]:
    """
    Turns a loaded model into a training one: the trainable set gets gradients and ``master_dtype`` storage (fp32
    master weights), everything else stays frozen in its storage dtype; dropout and checkpointing as asked; the
    model is put in training mode.

    Parameters:
        model (`nn.Module`): a `STARUNet` (e.g. from `star_core.checkpoint.load_star_model`).
        trainable (`str`): see `TRAINABLE_SETS`.
        dropout (`str`): see `DROPOUT_MODES`.
        dropout_p (`float`): drop probability.
        checkpointing (`bool`): see `set_checkpointing`.
        master_dtype (`torch.dtype`): dtype of the trainable parameters.

    Returns:
        `list[tuple[str, nn.Parameter]]`: the trainable parameters, in ``named_parameters()`` order.
    """
    params = []
    for name, param in model.named_parameters():
        train = is_trainable(name, trainable)
        if train and param.dtype != master_dtype:
            param.data = param.data.to(master_dtype)
        param.requires_grad_(train)
        if train:
            params.append((name, param))
    if not params:
        raise ValueError(f"the trainable set {trainable!r} selects no parameter of this model")
    set_dropout(model, dropout, dropout_p)
    set_checkpointing(model, checkpointing)
    model.train()
    return params
