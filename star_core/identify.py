"""What a state dict (or a text context) looks like, so a loader given the wrong file can say so.

STAR needs three components; users often point a loader at another model's file (an SD 1.5 checkpoint in the
STAR slot, an image VAE instead of SVD's temporal VAE, the SD 1.x CLIP-L text encoder instead of CLIP-H). The
loaders call `describe_weights` on a file that is not what they expect and put the answer, and the matching
``*_NEEDS`` sentence, into their error. Only key names and shapes are read (tensors may live on ``meta``).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

# What each component slot needs, for error messages.
STAR_NEEDS = ("STAR needs its own checkpoint, light_deg.pt or heavy_deg.pt (huggingface.co/SherryX/STAR, folder "
              "I2VGen-XL-based: the I2VGen-XL UNet with STAR's VideoControlNet), or a .safetensors converted from "
              "one (python -m star_core.convert)")
VAE_NEEDS = ("STAR needs the SVD temporal-decoder VAE (stabilityai/stable-video-diffusion-img2vid, folder vae; "
             "or ComfyUI's svd_xt_vae.safetensors / a full SVD checkpoint)")
TEXT_NEEDS = ("STAR needs the OpenCLIP ViT-H/14 text encoder, 1024 wide (laion/CLIP-ViT-H-14-laion2B-s32B-b79K "
              "open_clip_pytorch_model.bin, or the SD 2.x text encoder; in ComfyUI a CLIP loaded with type "
              "stable_diffusion from an SD 2.x CLIP-H file)")

# Text-encoder widths of the CLIP/T5 towers a user may have, and their names.
TEXT_WIDTHS = {
    512: "a CLIP ViT-B text encoder",
    768: "a CLIP ViT-L/14 text encoder (SD 1.x)",
    1024: "an OpenCLIP ViT-H/14 text encoder (SD 2.x)",
    1280: "an OpenCLIP ViT-bigG/14 text encoder (SDXL)",
    2048: "the SDXL text encoders (CLIP-L and OpenCLIP bigG, concatenated)",
    4096: "a T5-XXL text encoder (SD3 / Flux / video DiTs)",
}
# Prefixes full checkpoints (ldm / sgm / ComfyUI) put their parts under.
_UNET_PREFIX = "model.diffusion_model."
_VAE_PREFIXES = ("first_stage_model.", "vae.")
_TEXT_PREFIXES = ("cond_stage_model.", "conditioner.", "text_encoders.", "te.")


def _a(phrase: str) -> str:
    """``phrase`` with its indefinite article ("an SDXL UNet", "a Stable Diffusion 1.x UNet")."""
    return ("an " if phrase[:1] in "AEIOUaeiou" or phrase.startswith(("SD", "SVD")) else "a ") + phrase


def text_width_name(width: int) -> str:
    """A readable name for a text context width (``768`` → ``"a CLIP ViT-L/14 text encoder (SD 1.x)"``)."""
    return TEXT_WIDTHS.get(width, f"a {width}-wide text encoder")


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...] | None:
    value = sd.get(key)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _context_width(sd: Mapping[str, torch.Tensor], prefix: str = "") -> int | None:
    """Width of the text context the first cross-attention of a UNet reads (``attn2.to_k`` input features)."""
    for key, value in sd.items():
        if key.startswith(prefix) and key.endswith("attn2.to_k.weight") and isinstance(value, torch.Tensor):
            return int(value.shape[1])
    return None


def _sd_family(sd: Mapping[str, torch.Tensor], prefix: str, keys: list[str]) -> str:
    """SVD / SDXL / SD 2.x / SD 1.x from the keys of a UNet in the ldm layout under ``prefix``."""
    if any("time_stack" in k or "time_mixer" in k for k in keys):
        return "Stable Video Diffusion (SVD)"
    if any(k.startswith(prefix + "label_emb.") for k in keys):
        return "SDXL"
    width = _context_width(sd, prefix)
    return {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x"}.get(width, "Stable-Diffusion-style")


def _describe_vae(sd: Mapping[str, torch.Tensor], keys: list[str], prefix: str = "") -> str | None:
    original = any(k.startswith(prefix + "encoder.down.") for k in keys)
    diffusers = any(k.startswith(prefix + "encoder.down_blocks.") for k in keys)
    if not (original or diffusers):
        return None
    layout = "original layout" if original else "diffusers layout"
    if prefix + "decoder.conv_out.time_mix_conv.weight" in sd or prefix + "decoder.time_conv_out.weight" in sd:
        return f"the SVD temporal-decoder VAE ({layout})"
    out = _shape(sd, prefix + "encoder.conv_out.weight")
    channels = out[0] // 2 if out else None
    if channels and channels != 4:
        return f"a {channels}-channel image VAE ({layout}; e.g. SD3 / Flux), not SVD's 4-channel temporal VAE"
    return f"an image VAE (Stable Diffusion / SDXL AutoencoderKL, {layout}) without SVD's temporal decoder"


def _describe_text(sd: Mapping[str, torch.Tensor], keys: list[str]) -> str | None:
    for key in keys:
        if key.endswith("embeddings.token_embedding.weight") or key.endswith("token_embedding.weight"):
            width = int(sd[key].shape[1])
            return f"{text_width_name(width)} ({width} wide)"
    if any(".SelfAttention.q.weight" in k for k in keys):
        return "a T5 text encoder"
    if any(k.startswith(("vision_model.", "visual.")) for k in keys):
        return "a CLIP image encoder"
    return None


def describe_weights(sd: Mapping[str, torch.Tensor]) -> str | None:
    """
    A short description of what a state dict holds, from its key names and a few shapes.

    Parameters:
        sd (`Mapping[str, torch.Tensor]`): the tensors (any device, ``meta`` included).

    Returns:
        `str` or `None`: e.g. ``"a full Stable Diffusion 1.x checkpoint (UNet + VAE + text encoder)"``,
        ``"a Stable Video Diffusion (SVD) UNet (diffusers layout)"``, ``"an image VAE (…)"``, ``"a CLIP ViT-L/14
        text encoder (SD 1.x) (768 wide)"``; None when nothing is recognised.
    """
    keys = list(sd)
    if not keys:
        return None
    if any("lora_down" in k or "lora_up" in k or "lora_A" in k or "lora_B" in k for k in keys):
        return "a LoRA (low-rank adapter weights), not a full model"
    if any(k.startswith("VideoControlNet.") for k in keys):
        return "a STAR checkpoint (I2VGen-XL UNet + VideoControlNet)"
    if any(k.startswith(_UNET_PREFIX) for k in keys):
        family = _sd_family(sd, _UNET_PREFIX, keys)
        parts = ["UNet"]
        if any(k.startswith(_VAE_PREFIXES) for k in keys):
            parts.append("VAE")
        if any(k.startswith(_TEXT_PREFIXES) for k in keys):
            parts.append("text encoder")
        kind = "full " if len(parts) > 1 else ""
        return _a(f"{kind}{family} checkpoint ({' + '.join(parts)}, ldm layout)")
    if any(k.startswith("down_blocks.") for k in keys) and any(k.startswith("time_embedding.") for k in keys):
        if any("temporal_res_block" in k or "temporal_transformer_blocks" in k for k in keys):
            return "a Stable Video Diffusion (SVD) UNet (diffusers UNetSpatioTemporalConditionModel)"
        if any("motion_modules" in k for k in keys):
            return "an AnimateDiff motion UNet (diffusers layout)"
        if any(k.startswith("add_embedding.") for k in keys):
            return "an SDXL UNet (diffusers layout)"
        width = _context_width(sd)
        family = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x"}.get(width, "Stable-Diffusion-style")
        return _a(f"{family} UNet (diffusers UNet2DConditionModel)")
    if any(k.startswith("input_blocks.") for k in keys) and any(k.startswith("time_embed.") for k in keys):
        if any(".local1." in k or k.startswith("input_blocks.0.1.") for k in keys):
            return ("an I2VGen-XL-style video UNet without STAR's VideoControlNet (an I2VGen-XL base model or an "
                    "incomplete STAR checkpoint)")
        return _a(f"{_sd_family(sd, '', keys)} UNet (ldm layout)")
    vae_prefix = next((p for p in ("", *_VAE_PREFIXES) if any(k.startswith(p + "encoder.") for k in keys)), None)
    if vae_prefix is not None:
        described = _describe_vae(sd, keys, vae_prefix)
        if described:
            return described
    return _describe_text(sd, keys)


def check_context_width(context: torch.Tensor, expected: int, name: str = "text context") -> None:
    """
    Raises a ValueError naming the text encoder behind a context whose width is not the one the UNet reads
    (e.g. 768-wide CLIP-L conditioning reaching STAR, which reads 1024-wide OpenCLIP ViT-H/14 features).

    Parameters:
        context (`torch.Tensor`): ``[B, L, W]`` text context.
        expected (`int`): the UNet's ``context_dim``.
        name (`str`): the input, for the message.
    """
    width = int(context.shape[-1])
    if width != expected:
        needs = TEXT_NEEDS if expected == 1024 else f"this model needs a {expected}-wide text encoder"
        raise ValueError(f"{name} is {width} wide, from {text_width_name(width)}, but this STAR model reads "
                         f"{expected}-wide text context. {needs}")
