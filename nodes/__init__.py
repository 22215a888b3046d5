"""The pack's ComfyUI nodes: thin V3 adapters over star_core (one file per node; host plumbing in `host`)."""
from __future__ import annotations

from .colour_fix import STARColourFix
from .lr_encode import STARLREncode
from .model_loader import STARModelLoader
from .sampler import STARSampler
from .text_encode import STARTextEncode
from .tiled_decode import STARTiledVAEDecode
from .upscale import STARUpscale
from .vae_loader import STARVAELoader
from .video_decode import STARVideoDecode
from .video_encode import STARVideoEncode

NODES = [STARModelLoader, STARVAELoader, STARTextEncode, STARUpscale, STARVideoEncode, STARLREncode, STARSampler,
         STARVideoDecode, STARTiledVAEDecode, STARColourFix]
