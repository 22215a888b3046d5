"""The STAR I2VGen-XL network (UNet + VideoControlNet + LIEM) in plain torch, with the official state-dict names."""
from .attention import get_attention_function, sdpa_attention, use_attention
from .config import STARConfig, config_from_state_dict
from .controlnet import VideoControlNet
from .embedding import sinusoidal_embedding
from .liem import SpatialLIEM, TemporalLIEM
from .ops import cast_ops
from .unet import STARUNet, check_latent_size, latent_size_fits

__all__ = [
    "STARConfig", "STARUNet", "SpatialLIEM", "TemporalLIEM", "VideoControlNet", "cast_ops", "check_latent_size",
    "config_from_state_dict", "get_attention_function", "latent_size_fits", "sdpa_attention",
    "sinusoidal_embedding", "use_attention",
]
