"""`VideoVAE` over diffusers' `AutoencoderKLTemporalDecoder` (the SVD VAE STAR uses), and its loaders."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLTemporalDecoder

from ..checkpoint import load_state_dict_file
from ..identify import VAE_NEEDS, describe_weights
from .base import OFFICIAL_WINDOW, ProgressCallback, SpatialTiling
from .convert_svd import DIFFUSERS_MARKER, SVD_MARKER, infer_config, strip_checkpoint_prefix, svd_to_diffusers
from .exact import Program, Tick, TileGrid, decoder_program, encoder_program, progress_ticker, run_exact
from .tiled import DecodeFn, MomentsFn, decode_windows, encode_moments, temporal_plan

# diffusers writes these names in a model folder (``variant`` inserts e.g. ``.fp16`` before the suffix).
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class SVDVideoVAE:
    """The SVD temporal-decoder VAE with STAR's encode/decode conventions.

    Encode follows `VideoToVideo_sr.vae_encode` (one frame at a time, posterior sample ``mean + std·eps`` with
    ``logvar`` clamped to [-30, 20], times ``scaling_factor``); decode follows `vae_decode_chunk` (latent divided
    by ``scaling_factor``, temporal decoder over windows of ``window`` frames). Both add optional spatial tiles and
    overlapping temporal windows.

    Parameters:
        model (`AutoencoderKLTemporalDecoder`): the network; put it on its device and dtype beforehand.
        decode_autocast (`torch.dtype`, *optional*): run decode under ``torch.autocast`` with this dtype (the
            official GPU decode runs under fp16 autocast); encode always runs in the weights' dtype, as officially.
    """

    def __init__(self, model: AutoencoderKLTemporalDecoder, *, decode_autocast: torch.dtype | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.decode_autocast = decode_autocast
        self.scaling_factor = float(model.config.scaling_factor)
        self.latent_channels = int(model.config.latent_channels)
        self.downscale = 2 ** (len(model.config.block_out_channels) - 1)
        self._programs: dict[str, Program] = {}  # exact-tiling programs, built on first use

    @property
    def device(self) -> torch.device:
        """Where the network runs (tiles are moved there one at a time)."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype; inputs are cast to it."""
        return next(self.model.parameters()).dtype

    def _moments(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            # contiguous NCHW: torch's CPU GroupNorm loses precision on channels-last input (e.g. permuted frames)
            x = pixels.to(self.device, self.dtype).contiguous()
            return self.model.quant_conv(self.model.encoder(x))

    def _decode_context(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        if self.decode_autocast is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.decode_autocast))
        return stack

    def _decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        with self._decode_context():
            z = z.to(self.device, self.dtype) / self.scaling_factor
            return self.model.decode(z, num_frames=num_frames).sample

    def _program(self, part: str) -> Program:
        """The exact-tiling program of the encoder or decoder (built once; it holds the model's modules)."""
        if part not in self._programs:
            self._programs[part] = (encoder_program if part == "encoder" else decoder_program)(self.model)
        return self._programs[part]

    def _exact(self, part: str, x: torch.Tensor, grid: TileGrid, tiling: SpatialTiling,
               tick: Tick | None) -> torch.Tensor:
        return run_exact(self._program(part), x, grid, device=self.device, park=tiling.park, tick=tick)

    def _exact_moments_fn(self, height: int, width: int, count: int, tiling: SpatialTiling,
                          callback: ProgressCallback | None) -> MomentsFn | None:
        """Per-frame exact tiled encoder for ``count`` frames of ``height × width`` pixels (None: one tile)."""
        f = self.downscale
        grid = TileGrid.plan(-(-height // f), -(-width // f), tiling.tile // f)
        if len(grid) == 1:
            return None
        tick = progress_ticker(callback, count * self._program("encoder").sweeps * len(grid))

        def moments(pixels: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                x = pixels.to(self.dtype).contiguous()  # stays where it is; tiles move to the device
                return self._exact("encoder", x, grid, tiling, tick)

        return moments

    def _exact_decode_fn(self, latent: torch.Tensor, windows: int, tiling: SpatialTiling,
                         callback: ProgressCallback | None) -> DecodeFn | None:
        """Per-window exact tiled decoder for ``windows`` windows of ``latent`` (None: one tile)."""
        grid = TileGrid.plan(latent.shape[3], latent.shape[4], tiling.tile // self.downscale)
        if len(grid) == 1:
            return None
        tick = progress_ticker(callback, windows * self._program("decoder").sweeps * len(grid))

        def decode(z: torch.Tensor, num_frames: int) -> torch.Tensor:
            with self._decode_context():
                z = z.to(self.device, self.dtype) / self.scaling_factor
                return self._exact("decoder", z, grid, tiling, tick)

        return decode

    def _check_frames(self, frames: torch.Tensor) -> None:
        if frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[0] < 1 or not frames.is_floating_point():
            raise ValueError(f"VAE encode: frames must be a float tensor [T,3,H,W] in [-1, 1] with T >= 1, got "
                             f"{frames.dtype} {tuple(frames.shape)}; convert IMAGE [T,H,W,3] 0..1 with "
                             "x.permute(0, 3, 1, 2) * 2 - 1")

    def posterior(self, frames: torch.Tensor, *, tiling: SpatialTiling | None = None,
                  callback: ProgressCallback | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame posterior mean and std.

        Parameters:
            frames (`torch.Tensor`): ``[T,3,H,W]`` in [-1, 1]; sizes not divisible by 8 are edge-padded.
            tiling (`SpatialTiling`, *optional*): spatial tiles in input pixels (exact, or blended moments).
            callback (`ProgressCallback`, *optional*): progress per tile (fast) or per tile and layer step
                (exact), per frame untiled; raising interrupts.

        Returns:
            `tuple[torch.Tensor, torch.Tensor]`: ``mean`` and ``std``, each ``[T,C,ceil(H/8),ceil(W/8)]`` float32.
        """
        self._check_frames(frames)
        moments_fn = self._moments
        if tiling is not None and tiling.mode == "exact":
            # tiles inside each frame's encode; a single tile is the untiled encode
            exact = self._exact_moments_fn(frames.shape[2], frames.shape[3], frames.shape[0], tiling, callback)
            moments_fn, tiling, callback = (moments_fn, None, callback) if exact is None else (exact, None, None)
        moments = encode_moments(moments_fn, frames, self.downscale, tiling=tiling, callback=callback)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def encode(self, frames: torch.Tensor, eps: torch.Tensor | None = None, *, sample: bool = True,
               generator: torch.Generator | None = None, tiling: SpatialTiling | None = None,
               callback: ProgressCallback | None = None) -> torch.Tensor:
        """Encodes frames to the scaled latent STAR samples from.

        Parameters:
            frames (`torch.Tensor`): ``[T,3,H,W]`` in [-1, 1].
            eps (`torch.Tensor`, *optional*): posterior noise ``[T,C,h,w]`` (frame ``f`` uses ``eps[f]``); when
                None and ``sample`` is set, one ``randn [1,C,h,w]`` per frame is drawn on the CPU from
                ``generator`` (or the global generator), in frame order like the official code.
            sample (`bool`, *optional*, defaults to True): official posterior sample; False uses the mean.
            generator (`torch.Generator`, *optional*): CPU generator for the drawn noise.
            tiling (`SpatialTiling`, *optional*): spatial tiles in input pixels.
            callback (`ProgressCallback`, *optional*): per-tile progress; raising interrupts.

        Returns:
            `torch.Tensor`: ``[1,C,T,h,w]`` float32 latent times ``scaling_factor``, on ``frames.device``.
        """
        mean, std = self.posterior(frames, tiling=tiling, callback=callback)
        if sample:
            if eps is None:
                eps = torch.cat([torch.randn((1, *mean.shape[1:]), generator=generator)
                                 for _ in range(mean.shape[0])])
            elif tuple(eps.shape) != tuple(mean.shape):
                raise ValueError(f"VAE encode: eps has shape {tuple(eps.shape)} but the posterior of these frames "
                                 f"is {tuple(mean.shape)} [T,C,h,w]; pass one noise map per frame of that shape")
            mean = mean + std * eps.to(mean.device, torch.float32)
        return (mean * self.scaling_factor).transpose(0, 1).unsqueeze(0)

    def decode(self, latent: torch.Tensor, window: int = OFFICIAL_WINDOW, window_overlap: int = 0, *,
               tiling: SpatialTiling | None = None, callback: ProgressCallback | None = None) -> torch.Tensor:
        """Decodes a scaled latent video.

        Parameters:
            latent (`torch.Tensor`): ``[1,C,T,h,w]`` scaled latent.
            window (`int`, *optional*, defaults to 3): frames per temporal-decoder call (official 3).
            window_overlap (`int`, *optional*, defaults to 0): frames shared by neighbouring windows; 0 is the
                official chunking (last window may be shorter), > 0 blends full-size overlapping windows.
            tiling (`SpatialTiling`, *optional*): spatial tiles in output pixels (exact or feathered).
            callback (`ProgressCallback`, *optional*): progress per tile (fast) or per tile and layer step
                (exact), per window untiled; raising interrupts.

        Returns:
            `torch.Tensor`: ``[T,3,8h,8w]`` float32 in about [-1, 1] (not clamped), on ``latent.device``.
        """
        if latent.ndim != 5 or latent.shape[0] != 1 or latent.shape[1] != self.latent_channels:
            raise ValueError(f"VAE decode: latent must be [1,{self.latent_channels},T,h,w], got "
                             f"{tuple(latent.shape)}")
        if window < 1 or not 0 <= window_overlap < window:
            raise ValueError(f"VAE decode: need window >= 1 and 0 <= window_overlap < window, got window={window}, "
                             f"window_overlap={window_overlap}")
        decode_fn = self._decode
        if tiling is not None and tiling.mode == "exact":
            # tiles inside each window's decode; a single tile is the untiled decode
            windows = len(temporal_plan(latent.shape[2], window, window_overlap))
            exact = self._exact_decode_fn(latent, windows, tiling, callback)
            decode_fn, tiling, callback = (decode_fn, None, callback) if exact is None else (exact, None, None)
        return decode_windows(decode_fn, latent, self.downscale, window=window, window_overlap=window_overlap,
                              tiling=tiling, callback=callback)


def build_vae(state_dict: dict[str, torch.Tensor], config: dict | None = None, *, source: str = "state dict",
              dtype: torch.dtype = torch.float32) -> AutoencoderKLTemporalDecoder:
    """Builds the diffusers model from a state dict in either layout and loads it strictly.

    Parameters:
        state_dict (`dict[str, torch.Tensor]`): original SVD keys or diffusers keys, optionally under a
            ``first_stage_model.`` / ``vae.`` prefix.
        config (`dict`, *optional*): diffusers config (``config.json`` contents); inferred from shapes if None.
        source (`str`): name of the file, for error messages.
        dtype (`torch.dtype`, *optional*, defaults to float32): parameter dtype (official: fp32 parameters, even
            from the fp16 variant).

    Returns:
        `AutoencoderKLTemporalDecoder`: in eval mode on the CPU.
    """
    state_dict = strip_checkpoint_prefix(state_dict)
    if SVD_MARKER in state_dict:
        state_dict = svd_to_diffusers(state_dict)
    elif DIFFUSERS_MARKER not in state_dict:
        what = describe_weights(state_dict)
        looks = f"it looks like {what}" if what else f"its first keys are {sorted(state_dict)[:4]}"
        raise ValueError(f"{source} is not the SVD temporal-decoder VAE: {looks} (it has neither '{SVD_MARKER}' "
                         f"nor '{DIFFUSERS_MARKER}'). {VAE_NEEDS}")
    if config is None:
        config = infer_config(state_dict)
    else:
        class_name = config.get("_class_name", "AutoencoderKLTemporalDecoder")
        if class_name != "AutoencoderKLTemporalDecoder":
            raise ValueError(f"{source}: config describes a {class_name}, expected AutoencoderKLTemporalDecoder")
    model = AutoencoderKLTemporalDecoder.from_config(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"{source} does not match an SVD VAE with config {dict(config)}: missing keys "
                         f"{missing[:6]}, unexpected keys {unexpected[:6]}")
    # nn.Module.to: diffusers' override warns about fp32-pinned modules, which this class does not have.
    return torch.nn.Module.to(model, dtype).eval()


def load_svd_vae(path: str | Path, *, config: dict | str | Path | None = None, variant: str | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 decode_autocast: torch.dtype | None = None) -> SVDVideoVAE:
    """Loads the SVD VAE from a diffusers folder or a single weights file.

    Parameters:
        path (`str` or `Path`): a diffusers model folder (``config.json`` + ``diffusion_pytorch_model[.variant]
            .safetensors``, or a parent holding such a ``vae/`` folder), or one ``.safetensors`` / ``.pt`` file in
            the original SVD layout (ComfyUI / generative-models, also a full SVD checkpoint) or diffusers layout.
        config (`dict` or path, *optional*): diffusers config for a single file; inferred from shapes if None.
        variant (`str`, *optional*): folder weights variant, e.g. ``"fp16"``.
        device (`torch.device` or `str`, *optional*): where the network runs.
        dtype (`torch.dtype`, *optional*, defaults to float32): parameter dtype.
        decode_autocast (`torch.dtype`, *optional*): autocast dtype for decode (e.g. ``torch.float16`` on GPU).

    Returns:
        `SVDVideoVAE`
    """
    path = Path(path)
    if path.is_dir():
        folder = path / "vae" if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file() \
            else path
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path} is a folder without config.json (nor vae/config.json): give the "
                                    "diffusers VAE folder or a single .safetensors file")
        config = json.loads(config_file.read_text())
        names = [name.replace(".", f".{variant}.", 1) if variant else name for name in WEIGHT_NAMES]
        weights = next((folder / name for name in names if (folder / name).is_file()), None)
        if weights is None:
            hint = "" if variant else " (for fp16 weights pass variant='fp16')"
            raise FileNotFoundError(f"{folder} has no {' or '.join(names)}{hint}")
    elif path.is_file():
        weights = path
        if isinstance(config, (str, Path)):
            config = json.loads(Path(config).read_text())
    else:
        raise FileNotFoundError(f"VAE path {path} does not exist: give a diffusers VAE folder or a .safetensors file")
    model = build_vae(load_state_dict_file(weights), config, source=str(weights), dtype=dtype)
    return SVDVideoVAE(model.to(device), decode_autocast=decode_autocast)
