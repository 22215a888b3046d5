"""The pack's ComfyUI nodes: thin V3 adapters over star_core (one file per node; host plumbing in `host`)."""
from __future__ import annotations

from .colour_fix import STARColourFix
from .lr_encode import STARLREncode
from .model_loader import STARModelLoader
from .sampler import STARSampler
from .text_encode import STARTextEncode
from .tiled_decode import STARTiledVAEDecode
from .vae_loader import STARVAELoader

NODES = [STARModelLoader, STARVAELoader, STARTextEncode, STARLREncode, STARSampler, STARTiledVAEDecode, STARColourFix]
