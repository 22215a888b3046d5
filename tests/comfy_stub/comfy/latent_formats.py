"""Stub of `comfy.latent_formats`: the SD 1.x/2.x latent space."""


class SD15:
    latent_channels = 4
    scale_factor = 0.18215
