"""STAR VAE Loader: the SVD temporal-decoder VAE from a diffusers folder or an SVD-layout file."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from star_core.vae import load_svd_vae

from . import host
from .types import STARVae


class STARVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="STARVAELoader",
            display_name="STAR VAE Loader",
            category=host.CATEGORY,
            description="Loads the SVD temporal-decoder VAE STAR uses, from models/vae: a single file in the SVD "
                        "(ComfyUI) or diffusers layout, or a diffusers folder's weights file next to config.json.",
            inputs=[
                io.Combo.Input("vae_name", options=folder_paths.get_filename_list("vae"),
                               tooltip="SVD VAE file in models/vae (svd_xt_vae.safetensors, or "
                                       "<folder>/diffusion_pytorch_model.safetensors of a diffusers folder)."),
            ],
            outputs=[STARVae.Output(display_name="vae")],
        )

    @classmethod
    def validate_inputs(cls, vae_name: str) -> bool | str:
        return host.check_model_file("vae", vae_name, "vae_name")

    @classmethod
    def execute(cls, vae_name: str) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("vae", vae_name)
        folder = os.path.dirname(path)
        config = os.path.join(folder, "config.json")
        source = folder if os.path.isfile(config) else path
        return io.NodeOutput(load_svd_vae(source, device=host.mm.vae_offload_device()))
