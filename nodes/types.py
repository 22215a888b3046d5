"""The pack's own socket types and the VAE input shared by the nodes that run the video VAE."""
from __future__ import annotations

from comfy_api.latest import io

# A ComfyUI ModelPatcher around star_core's STARUNet.
STARModel = io.Custom("STAR_MODEL")
# star_core's SVD video VAE, loaded from a diffusers folder or an SVD-layout file by STAR VAE Loader.
STARVae = io.Custom("STAR_VAE")


def vae_input(tooltip: str) -> io.MultiType.Input:
    """A VAE socket that takes a core VAE (holding the SVD VAE) or a STAR VAE."""
    return io.MultiType.Input("vae", types=[io.Vae, STARVae], tooltip=tooltip)
