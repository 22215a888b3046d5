"""Video VAE: the `VideoVAE` protocol, the SVD temporal-decoder adapter and its loaders, tiled encode/decode."""
from .base import OFFICIAL_WINDOW, ProgressCallback, SpatialTiling, VideoVAE
from .convert_svd import diffusers_to_svd, infer_config, svd_to_diffusers
from .svd import SVDVideoVAE, build_vae, load_svd_vae

__all__ = [
    "OFFICIAL_WINDOW", "ProgressCallback", "SpatialTiling", "VideoVAE", "SVDVideoVAE", "build_vae", "load_svd_vae",
    "diffusers_to_svd", "infer_config", "svd_to_diffusers",
]
