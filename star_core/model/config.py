"""Architecture settings of the STAR I2VGen-XL UNet + VideoControlNet, and their inference from a state dict."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

import torch

GROUPS = 32  # every GroupNorm in the network uses 32 groups, so every block width must be a multiple of 32
# The official ControlNet's middle_block_out reads embed_dim = 4·dim channels, so the deepest level is 4·dim wide.
LAST_MULT = 4


@dataclass(frozen=True)
class STARConfig:
    """
    Constructor settings of the official ``ControlledV2VUNet``; the defaults are the released model.

    Parameters:
        in_dim (`int`): latent channels of the noisy input and of the ControlNet hint.
        dim (`int`): width of the first level; the timestep embedding is ``4 * dim`` wide.
        context_dim (`int`): width of the text context the cross-attentions read.
        out_dim (`int`): channels of the prediction.
        dim_mult (`tuple[int, ...]`): width multiplier of each level (one level per entry).
        num_heads (`int`): heads of the first temporal transformer (``input_blocks.0.1``), whose inner width is
            ``num_heads * head_dim`` (any width: it is not group-normalised).
        head_dim (`int`): width of one attention head everywhere; other transformers use ``width // head_dim`` heads,
            so it must divide the width of every attention level and of the middle block.
        num_res_blocks (`int`): ResBlocks per encoder level (the decoder has one more per level).
        attn_scales (`tuple[float, ...]`): resolution scales (1, 1/2, 1/4, ...) whose blocks carry a spatial and a
            temporal transformer. The middle block always has both.
    """

    in_dim: int = 4
    dim: int = 320
    context_dim: int = 1024
    out_dim: int = 4
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_heads: int = 8
    head_dim: int = 64
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = (1.0, 0.5, 0.25)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim_mult", tuple(int(m) for m in self.dim_mult))
        object.__setattr__(self, "attn_scales", tuple(float(s) for s in self.attn_scales))
        if not self.dim_mult or min(self.dim_mult) < 1:
            raise ValueError(f"STARConfig.dim_mult must be a non-empty tuple of positive ints, got {self.dim_mult}")
        if self.num_res_blocks < 1 or self.num_heads < 1 or self.head_dim < 1:
            raise ValueError(f"STARConfig: num_res_blocks, num_heads and head_dim must be >= 1, got "
                             f"{self.num_res_blocks}, {self.num_heads}, {self.head_dim}")
        if self.dim % GROUPS:
            raise ValueError(f"STARConfig: dim {self.dim} is not a multiple of {GROUPS} (every block width is "
                             f"group-normalised with {GROUPS} groups)")
        if self.dim_mult[-1] != LAST_MULT:
            raise ValueError(f"STARConfig: dim_mult must end in {LAST_MULT}, got {self.dim_mult} (the official "
                             f"ControlNet's middle_block_out reads {LAST_MULT}·dim channels)")
        for width in self.attention_widths:
            if width % self.head_dim:
                raise ValueError(f"STARConfig: head_dim {self.head_dim} does not divide the attention width {width} "
                                 f"(the official spatial transformer needs width // head_dim · head_dim == width)")

    @property
    def embed_dim(self) -> int:
        """Width of the timestep embedding."""
        return 4 * self.dim

    def level_has_attention(self, level: int) -> bool:
        """Whether the blocks at resolution level ``level`` (0 = full resolution) carry transformers."""
        return 0.5**level in self.attn_scales

    @property
    def attention_widths(self) -> set[int]:
        """Widths of the levels with transformers, and of the middle block (which always has them)."""
        return {self.dim * m for level, m in enumerate(self.dim_mult) if self.level_has_attention(level)} | {
            self.dim * self.dim_mult[-1]}


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"not a STAR I2VGen-XL checkpoint: required key {key!r} is missing "
                         f"(the state dict has {len(sd)} keys, e.g. {sorted(sd)[:3]})")
    return tuple(sd[key].shape)


def config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> STARConfig:
    """
    Infers the architecture from tensor shapes of an official-layout state dict (UNet keys at top level).

    Parameters:
        sd (`Mapping[str, torch.Tensor]`): the state dict (tensors may live on any device, including ``meta``).

    Returns:
        `STARConfig`: width, multipliers, res-blocks per level, attention levels, heads and context width.

    Raises:
        ValueError: when a key the inference needs is missing or the shapes contradict each other.
    """
    in_w = _shape(sd, "input_blocks.0.0.weight")  # [dim, in_dim, 3, 3]
    dim, in_dim = in_w[0], in_w[1]
    out_dim = _shape(sd, "out.2.weight")[0]
    # input_blocks.0.1 is the first temporal transformer: proj_in Conv1d [num_heads*head_dim, dim, 1].
    first_inner = _shape(sd, "input_blocks.0.1.proj_in.weight")[0]

    # Encoder blocks: a ResBlock block has "in_layers"; a Downsample block has "op".
    pattern = re.compile(r"^input_blocks\.(\d+)\.(0\.in_layers|op)\.")
    kinds: dict[int, str] = {}
    for key in sd:
        m = pattern.match(key)
        if m:
            kinds[int(m.group(1))] = "res" if m.group(2).startswith("0") else "down"
    n_blocks = max(kinds, default=0)
    if sorted(kinds) != list(range(1, n_blocks + 1)):
        raise ValueError(f"not a STAR I2VGen-XL checkpoint: encoder blocks {sorted(kinds)} are not contiguous")
    seq = [kinds[i] for i in range(1, n_blocks + 1)]
    levels: list[list[int]] = [[]]
    for i, kind in enumerate(seq, start=1):
        if kind == "down":
            levels.append([])
        else:
            levels[-1].append(i)
    counts = {len(blocks) for blocks in levels}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"not a STAR I2VGen-XL checkpoint: uneven ResBlocks per level {[len(b) for b in levels]}")
    num_res_blocks = counts.pop()

    dim_mult = []
    for blocks in levels:
        width = _shape(sd, f"input_blocks.{blocks[0]}.0.in_layers.2.weight")[0]
        if width % dim:
            raise ValueError(f"not a STAR I2VGen-XL checkpoint: level width {width} is not a multiple of dim {dim}")
        dim_mult.append(width // dim)
    attn_scales = tuple(0.5**lvl for lvl, blocks in enumerate(levels) if f"input_blocks.{blocks[0]}.1.norm.weight" in sd)

    # The middle block always has a spatial transformer; its cross-attention keys give the context width.
    context_dim = _shape(sd, "middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1]
    attention_widths = [dim * m for lvl, m in enumerate(dim_mult) if 0.5**lvl in attn_scales] + [dim * dim_mult[-1]]
    head_dim = _infer_head_dim(first_inner, *attention_widths)
    return STARConfig(in_dim=in_dim, dim=dim, context_dim=context_dim, out_dim=out_dim, dim_mult=tuple(dim_mult),
                      num_heads=first_inner // head_dim, head_dim=head_dim, num_res_blocks=num_res_blocks,
                      attn_scales=attn_scales)


def _infer_head_dim(first_inner: int, *widths: int) -> int:
    """
    The head width is not stored in any shape (q/k/v projections are square in the head split), so it is taken as
    the released 64 when every width allows it, else the widest power of two dividing all of them that keeps the
    first temporal transformer at two or more heads (the construction rule of the fixture configs), else the
    first transformer's whole width as one head. Any choice loads and runs; only the right split reproduces the
    original attention, so give the config when it is known (e.g. a fixture's ``tiny_config.json``).
    """
    candidates = [64] + [2**p for p in range(12, -1, -1)]
    for head_dim in candidates:
        if all(w % head_dim == 0 for w in (first_inner, *widths)) and first_inner // head_dim >= 2:
            return head_dim
    return math.gcd(first_inner, *widths)
