"""STAR Model Loader: a STAR checkpoint from models/STAR, under ComfyUI's memory manager."""
from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from star_core.checkpoint import load_state_dict_file, load_star_model

from . import host
from .types import STARModel

STORAGE_ONLY = {d for d in host.WEIGHT_DTYPES.values() if d.itemsize == 1}


class STARModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="STARModelLoader",
            display_name="STAR Model Loader",
            category=host.CATEGORY,
            description="Loads a STAR checkpoint (light_deg.pt / heavy_deg.pt or a converted .safetensors) from "
                        "models/STAR; ComfyUI loads, offloads and partially loads it like a core model.",
            inputs=[
                io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("STAR"),
                               tooltip="STAR checkpoint in models/STAR (official .pt/.pth or .safetensors)."),
                io.Combo.Input("weight_dtype", options=["auto", *host.WEIGHT_DTYPES], default="auto",
                               tooltip="Storage dtype of the weights. auto: ComfyUI's choice for this device "
                                       "(fp16/bf16 on GPUs, fp32 on CPU). fp8 halves memory again; layers are "
                                       "cast to the compute dtype on the fly."),
            ],
            outputs=[STARModel.Output(display_name="star_model")],
        )

    @classmethod
    def validate_inputs(cls, ckpt_name: str) -> bool | str:
        return host.check_model_file("STAR", ckpt_name, "ckpt_name")

    @classmethod
    def execute(cls, ckpt_name: str, weight_dtype: str) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("STAR", ckpt_name)
        state_dict = load_state_dict_file(path)
        params = sum(v.numel() for v in state_dict.values())
        device = host.mm.get_torch_device()
        weight, compute = host.pick_dtypes(weight_dtype, device, params)
        build_dtype = compute if weight in STORAGE_ONLY else weight
        model = load_star_model(state_dict, dtype=build_dtype, compute_dtype=compute,
                                device=host.mm.unet_offload_device(), name=f"ckpt_name '{ckpt_name}'",
                                operations=host.operations_for(weight, compute, device))
        del state_dict
        if weight in STORAGE_ONLY:
            host.store_cast_weights(model, weight)
        return io.NodeOutput(host.wrap_model(model))
