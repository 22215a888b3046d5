"""What a run's memory depends on, independent of the pipeline: the plan's sizes and the resident components."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache

import torch

from ..model.config import STARConfig
from ..model.unet import check_latent_size

# Parameter counts of the released components.
RELEASED_UNET_PARAMS = 2_041_121_910  # light_deg.pt / heavy_deg.pt (UNet + VideoControlNet + LIEM)
SVD_VAE_PARAMS = 97_742_847  # AutoencoderKLTemporalDecoder, SVD widths (encoder 34.2 M + decoder 63.6 M)
OPENCLIP_H_TEXT_PARAMS = 352_984_064  # OpenCLIP ViT-H/14 text tower as a CLIPTextModel

VAE_PARKS = ("device", "host")


def _check_dtype(name: str, value: object) -> None:
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"PlanSizes.{name} must be a floating torch.dtype, got {value!r}")


@dataclass(frozen=True)
class PlanSizes:
    """
    The sizes that set a run's peak device memory: the video, the temporal chunks and spatial tiles of the
    denoiser, the VAE's tiles and windows, and the dtypes. Sizes of the latent are in latent cells (8 pixels).

    Parameters:
        frames (`int`): latent frames F of the whole video (= video frames).
        latent_h (`int`), latent_w (`int`): latent height and width (padded frame / 8).
        chunk_len (`int`): frames per denoiser evaluation (`SamplerSettings.chunk_len`; official 32).
        fusion (`str`): chunk fusion (`"official"` windows may grow to 1.25·chunk_len frames; others keep it).
        tile (`tuple[int, int]`, *optional*): diffusion tile (height, width) in latent cells, each valid for the
            network (`check_latent_size`); None evaluates whole frames (untiled).
        tile_overlap (`int`): latent cells shared by neighbouring diffusion tiles (time only, not memory).
        batch_cfg (`bool`): both CFG passes in one batch of 2 (twice the activations of one evaluation).
        unet_dtype (`torch.dtype`): storage dtype of the UNet + ControlNet weights.
        compute_dtype (`torch.dtype`, *optional*): dtype of the UNet activations (default `unet_dtype`); a
            different one costs a cast copy of the largest layer.
        vae_dtype (`torch.dtype`): storage dtype of the VAE weights (official fp32).
        encode_dtype (`torch.dtype`, *optional*): dtype of the encoder's activations (default `vae_dtype`; official
            fp32).
        decode_dtype (`torch.dtype`, *optional*): dtype of the decoder's activations (default `vae_dtype`; the
            official GPU decode runs under fp16 autocast).
        encode_tile (`int`, *optional*): exact VAE encoder tile edge in pixels; None encodes whole frames.
        encode_park (`str`): where the exact tiled encoder keeps whole-frame activations between layers:
            `"device"` or `"host"` (then only a tile's working set is on the device).
        decode_tile (`int`, *optional*), decode_park (`str`): the same for the decoder.
        vae_halo (`int`): pixels a VAE tile reads beyond its core on each side.
        decode_window (`int`): frames per temporal-decoder call (official 3).
        encode_window (`int`): LR frames on the device per encode call (the encoder itself runs one frame).
        state_on_device (`bool`): the sampler state (latents, solver history, Brownian tree) lives on the device;
            False keeps it on the host and moves one chunk at a time.
    """

    frames: int
    latent_h: int
    latent_w: int
    chunk_len: int = 32
    fusion: str = "linear"
    tile: tuple[int, int] | None = None
    tile_overlap: int = 8
    batch_cfg: bool = False
    unet_dtype: torch.dtype = torch.float16
    compute_dtype: torch.dtype | None = None
    vae_dtype: torch.dtype = torch.float32
    encode_dtype: torch.dtype | None = None
    decode_dtype: torch.dtype | None = None
    encode_tile: int | None = None
    encode_park: str = "device"
    decode_tile: int | None = None
    decode_park: str = "device"
    vae_halo: int = 16
    decode_window: int = 3
    encode_window: int = 4
    state_on_device: bool = True

    def __post_init__(self) -> None:
        for name in ("frames", "latent_h", "latent_w", "chunk_len", "decode_window", "encode_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PlanSizes.{name} must be a positive integer, got {value!r}")
        if self.tile is not None:
            tile = tuple(self.tile)
            if len(tile) != 2 or any(not isinstance(v, int) or v < 1 for v in tile):
                raise ValueError(f"PlanSizes.tile must be None or (height, width) in latent cells, got {self.tile!r}")
            if tile[0] >= self.latent_h and tile[1] >= self.latent_w:
                tile = None  # one tile covering the latent is the untiled run
            else:
                tile = (min(tile[0], self.latent_h), min(tile[1], self.latent_w))
            object.__setattr__(self, "tile", tile)
        for name in ("encode_tile", "decode_tile"):
            tile = getattr(self, name)
            if tile is not None and (not isinstance(tile, int) or tile < 8 or tile % 8):
                raise ValueError(f"PlanSizes.{name} must be None or a multiple of 8 pixels, got {tile!r}")
        for name in ("encode_park", "decode_park"):
            if getattr(self, name) not in VAE_PARKS:
                raise ValueError(f"PlanSizes.{name} must be one of {VAE_PARKS}, got {getattr(self, name)!r}")
        for name in ("unet_dtype", "vae_dtype"):
            _check_dtype(name, getattr(self, name))
        for name in ("compute_dtype", "encode_dtype", "decode_dtype"):
            if getattr(self, name) is not None:
                _check_dtype(name, getattr(self, name))

    @property
    def unet_compute_dtype(self) -> torch.dtype:
        """Dtype of the UNet activations."""
        return self.compute_dtype or self.unet_dtype

    @property
    def vae_encode_dtype(self) -> torch.dtype:
        """Dtype of the encoder's activations."""
        return self.encode_dtype or self.vae_dtype

    @property
    def vae_decode_dtype(self) -> torch.dtype:
        """Dtype of the decoder's activations."""
        return self.decode_dtype or self.vae_dtype

    @property
    def eval_size(self) -> tuple[int, int]:
        """(height, width) in latent cells of one denoiser evaluation: the tile, or the whole latent."""
        return self.tile if self.tile is not None else (self.latent_h, self.latent_w)

    @property
    def pixel_size(self) -> tuple[int, int]:
        """(height, width) of the padded frames in pixels."""
        return self.latent_h * 8, self.latent_w * 8

    def replace(self, **changes) -> "PlanSizes":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def describe(self, stage: str | None = None) -> str:
        """
        Short human-readable form, e.g. ``chunk 16, tile 66x120 latent, encode tile 512 px, 3-frame decode``.

        Parameters:
            stage (`str`, *optional*): ``"sample"``, ``"encode"`` or ``"decode"`` names only that stage's
                settings; None names all.
        """
        parts = []
        if stage in (None, "sample"):
            parts.append(f"chunk {self.chunk_len}")
            parts.append("untiled" if self.tile is None else f"tile {self.tile[0]}x{self.tile[1]} latent")
            if not self.state_on_device:
                parts.append("sampler state on the host")
        for name in ("encode", "decode"):
            if stage in (None, name):
                tile, park = getattr(self, f"{name}_tile"), getattr(self, f"{name}_park")
                text = f"{name} whole frames" if tile is None else f"{name} tile {tile} px"
                parts.append(text + (" parked on the host" if tile is not None and park == "host" else ""))
        if stage in (None, "decode"):
            parts.append(f"{self.decode_window}-frame decode")
        return ", ".join(parts)


@dataclass(frozen=True)
class Components:
    """
    The models whose weights occupy the device, and how long they stay there.

    Parameters:
        unet_config (`STARConfig`): the network's architecture (selects the activation coefficients).
        unet_params (`int`): UNet + ControlNet parameters.
        vae_params (`int`): VAE parameters (encoder + decoder).
        vae_widths (`tuple[int, ...]`): the VAE's ``block_out_channels`` (selects the activation coefficients).
        text_params (`int`): text-encoder parameters kept on the device (0 when it is freed after the prompts).
        text_dtype (`torch.dtype`): its storage dtype.
        resident (`bool`): every model stays on the device for the whole run (the CLI; the official code); False
            holds only the stage's own model (a host that offloads, e.g. ComfyUI's model management).
    """

    unet_config: STARConfig = field(default_factory=STARConfig)
    unet_params: int = RELEASED_UNET_PARAMS
    vae_params: int = SVD_VAE_PARAMS
    vae_widths: tuple[int, ...] = (128, 256, 512, 512)
    text_params: int = 0
    text_dtype: torch.dtype = torch.float32
    resident: bool = True

    @classmethod
    def from_models(cls, unet: torch.nn.Module, vae_model: torch.nn.Module | None = None,
                    text_encoder: torch.nn.Module | None = None, *, resident: bool = True) -> "Components":
        """
        The components of loaded models: parameter counts and architectures read from the modules.

        Parameters:
            unet (`STARUNet`): the network.
            vae_model (`torch.nn.Module`, *optional*): the diffusers VAE (``SVDVideoVAE.model``).
            text_encoder (`torch.nn.Module`, *optional*): a text encoder that stays on the device.
            resident (`bool`): see the class.
        """
        def count(module: torch.nn.Module | None) -> int:
            return 0 if module is None else sum(p.numel() for p in module.parameters())

        widths = tuple(vae_model.config.block_out_channels) if vae_model is not None else cls.vae_widths
        text_dtype = next(text_encoder.parameters()).dtype if text_encoder is not None else torch.float32
        return cls(unet_config=unet.config, unet_params=count(unet),
                   vae_params=count(vae_model) if vae_model is not None else SVD_VAE_PARAMS, vae_widths=widths,
                   text_params=count(text_encoder), text_dtype=text_dtype, resident=resident)


@lru_cache(maxsize=64)
def valid_tile_sizes(length: int, levels: int, axis: str) -> tuple[int, ...]:
    """
    Tile edges (latent cells) up to `length` that the network accepts on this axis, longest first.

    Parameters:
        length (`int`): the latent's size on the axis.
        levels (`int`): resolution levels of the network (``len(config.dim_mult)``).
        axis (`str`): ``"h"`` or ``"w"`` (the down-sampling rules differ).
    """
    if axis not in ("h", "w"):
        raise ValueError(f"axis must be 'h' or 'w', got {axis!r}")
    # A valid size on the other axis, so that check_latent_size judges only this one: 2^levels + 2 (height)
    # and 2^levels (width) stay even through every down-sampling.
    other = 2**levels if axis == "h" else 2**levels + 2

    def ok(size: int) -> bool:
        try:
            check_latent_size(size, other, levels) if axis == "h" else check_latent_size(other, size, levels)
        except ValueError:
            return False
        return True

    return tuple(size for size in range(length, 0, -1) if ok(size))
