"""Host glue between ComfyUI and star_core: memory management, cast layers, progress/interrupt, core objects.

Everything here is ComfyUI-specific plumbing; the numbers are computed by star_core.
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterator

import torch

import comfy.model_management as mm
import folder_paths
import comfy.ops
import comfy.utils
from comfy.model_patcher import ModelPatcher

from star_core import autosize, pipeline
from star_core.host import HostContext, ProgressEvent
from star_core.identify import check_context_width
from star_core.options import SpecError
from star_core.vae import SVDVideoVAE, build_vae

CATEGORY = "STAR"
# Keys the STAR nodes add to a ComfyUI LATENT dict (next to "samples").
GEOMETRY_KEY = "star_geometry"
SEED_KEY = "star_seed"  # the run's seed: LR Encode drew the posterior noise from it, the sampler continues it
SOURCE_KEY = "star_source"  # (FrameSource, audio file or None): the LR frames, read again by STAR Decode Video

# The node input that sets each run option (the same name on every node that shows it), for error messages; the CLI's
# counterpart is `star_core.cli.FLAG_OF`.
SPEC_INPUTS = {
    "output.scale": "scale", "output.target": "target_width/target_height", "output.padding": "padding",
    "encode.posterior": "posterior", "encode.tile": "tile", "encode.tile_overlap": "tile_overlap", "seed": "seed",
    "sampler.mode": "solver_mode", "sampler.steps": "steps", "sampler.cfg": "cfg", "sampler.rescale": "rescale",
    "sampler.t_max": "denoise", "sampler.chunk_len": "chunk_length", "sampler.overlap": "chunk_overlap",
    "sampler.fusion": "fusion", "sampler.tile": "diffusion_tile",
    "encode.tile_mode": "tile_mode", "decode.tile": "tile", "decode.tile_overlap": "tile_overlap",
    "decode.tile_mode": "tile_mode",
    "decode.window": "temporal_window", "decode.window_overlap": "temporal_overlap", "colour.method": "method",
    "colour.strength": "strength", "prompt.prompt": "prompt", "prompt.suffix": "suffix",
    "prompt.negative_prompt": "negative_prompt",
}
# Nodes whose input for a run option has another name than in `SPEC_INPUTS` (by display name).
RENAMED_INPUTS = {"STAR Upscale": {"encode.tile": "vae_tile", "decode.tile": "vae_tile"}}

WEIGHT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):  # fp8 storage where this torch has the dtype
        WEIGHT_DTYPES[_name.replace("float8", "fp8")] = getattr(torch, _name)


def pick_dtypes(choice: str, device: torch.device, params: int) -> tuple[torch.dtype, torch.dtype]:
    """
    Weight and compute dtype for a user choice, decided by ComfyUI's rules for the device.

    Parameters:
        choice (`str`): "auto" or a key of `WEIGHT_DTYPES`.
        device (`torch.device`): the load device.
        params (`int`): parameter count (ComfyUI's auto choice depends on free memory).
    """
    supported = [torch.float16, torch.bfloat16, torch.float32]
    weight = mm.unet_dtype(device=device, model_params=params, supported_dtypes=supported) if choice == "auto" \
        else WEIGHT_DTYPES[choice]
    # ComfyUI's rule: None when the device computes in the weight dtype, else the dtype to cast layers to.
    return weight, mm.unet_manual_cast(weight, device, supported) or weight


def operations_for(weight: torch.dtype, compute: torch.dtype, device: torch.device):
    """ComfyUI's cast-layer namespace for the dtypes, so ModelPatcher can load/offload/partially load layers."""
    return comfy.ops.pick_operations(weight, compute, load_device=device)


def wrap_model(model: torch.nn.Module) -> ModelPatcher:
    """Puts a STAR network under ComfyUI's memory manager (offloaded until `load_models_gpu`)."""
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device(), size=size)


def model_function(patcher: ModelPatcher) -> Callable:
    """Loads the patched model through ComfyUI and returns the sampler's `model_fn` (star_core's, in the model's
    compute dtype on ComfyUI's device)."""
    mm.load_models_gpu([patcher])
    return pipeline.model_function(patcher.model)


def check_model_file(folder: str, name: str, input_name: str) -> bool | str:
    """
    Validation of a model-file combo: True when `name` exists in the ComfyUI model folder, else a message listing
    what is there (ComfyUI 0.3.x does not check V3 combo values itself).
    """
    if folder_paths.get_full_path(folder, name) is not None:
        return True
    available = folder_paths.get_filename_list(folder)
    where = ", ".join(folder_paths.get_folder_paths(folder))
    listing = ", ".join(f"'{f}'" for f in available) if available else "none"
    message = f"{input_name}: '{name}' not found in {where}. Available: {listing}."
    for other in folder_paths.folder_names_and_paths:  # a file put in the wrong models folder: say where it is
        found = folder_paths.get_full_path(other, name) if other not in (folder, "custom_nodes") else None
        if found is not None:
            return f"{message} '{name}' is in {found} (the '{other}' folder): move it to {where}."
    return message


def input_name(node: str, path: str) -> str:
    """The input of node `node` (display name) that sets the run option `path` (its dotted spec name)."""
    return RENAMED_INPUTS.get(node, {}).get(path) or SPEC_INPUTS.get(path, path)


@contextlib.contextmanager
def inputs_of(node: str) -> Iterator[None]:
    """Turns a run-spec validation error into one that names the node (display name) and its input, e.g. ``STAR
    Sampler: chunk_overlap (8) must be smaller than the chunk length (8)``."""
    try:
        yield
    except SpecError as exc:
        raise ValueError(f"{node}: {input_name(node, exc.path)} {exc.problem}") from None


class Progress:
    """star_core's progress events → a ComfyUI progress bar per stage; the sampler's x0 as the bar's preview image
    where the host makes previews (``--preview-method``, or the frontend's choice on 0.33)."""

    def __init__(self) -> None:
        self.bars: dict[str, comfy.utils.ProgressBar] = {}
        self._previewer = None

    def __call__(self, event: ProgressEvent) -> None:
        bar = self.bars.get(event.stage)
        if bar is None:
            bar = self.bars[event.stage] = comfy.utils.ProgressBar(event.total)
        bar.update_absolute(event.done, event.total, self.preview(event.x0))

    def preview(self, x0: torch.Tensor | None):
        """("JPEG", PIL image, max size) of the first frame of an x0 [1,4,F,h,w], or None without a previewer."""
        if x0 is None:
            return None
        if self._previewer is None:
            self._previewer = previewer() or False
        if self._previewer is False:
            return None
        return self._previewer.decode_latent_to_preview_image("JPEG", x0[:, :, 0].float())


def previewer():
    """ComfyUI's latent previewer for STAR's latent space (the SD 2.x VAE's: SD15 latent format), or None when
    previews are off."""
    import latent_preview
    from comfy import latent_formats

    return latent_preview.get_previewer(mm.get_torch_device(), latent_formats.SD15())


def attention_for(device: torch.device):
    """ComfyUI's attention (the one its flags chose: sage, flash, xformers, pytorch, ...) on accelerators; on the CPU
    star_core's SDPA, which is faster there than ComfyUI's CPU choice (sub-quadratic)."""
    if device.type == "cpu":
        return None
    from comfy.ldm.modules.attention import optimized_attention

    return lambda q, k, v, heads: optimized_attention(q, k, v, heads)


def context(*models: torch.nn.Module) -> HostContext:
    """The host context of one node execution: ComfyUI's device, attention and memory budget (its free memory plus
    what the node's loaded `models` occupy there; the 'auto' sizes are chosen for it), progress bars with previews,
    Cancel, ComfyUI's out-of-memory type. ComfyUI loads one stage's model at a time (not resident)."""
    device = mm.get_torch_device()
    return HostContext(device=device, progress=Progress(), interrupt=mm.throw_exception_if_processing_interrupted,
                       attention=attention_for(device),
                       memory_budget=autosize.device_budget(device, models, free=mm.get_free_memory),
                       resident=False, log=logging.getLogger("star_vsr").info, oom_errors=(mm.OOM_EXCEPTION,))


class SVD_VAE(torch.nn.Module):  # noqa: N801 - ComfyUI logs "Requested to load <class name>" to the user
    """A plain container, so ComfyUI's ModelPatcher can move the diffusers VAE (whose `device` is read-only)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.vae = model


_converted: "weakref.WeakKeyDictionary[object, SVDVideoVAE]" = weakref.WeakKeyDictionary()
_patchers: "weakref.WeakKeyDictionary[SVDVideoVAE, ModelPatcher]" = weakref.WeakKeyDictionary()


def _to_video_vae(vae) -> SVDVideoVAE:
    if isinstance(vae, SVDVideoVAE):
        return vae
    inner = getattr(vae, "first_stage_model", None)
    if inner is None:
        raise ValueError(f"vae: expected a ComfyUI VAE or a STAR VAE, got {type(vae).__name__}")
    cached = _converted.get(vae)
    if cached is None:
        try:
            model = build_vae(inner.state_dict(), source="vae: the connected ComfyUI VAE")
        except ValueError as exc:
            raise ValueError(f"{exc}; load it with Load VAE or STAR VAE Loader") from None
        cached = _converted[vae] = SVDVideoVAE(model.to(mm.vae_offload_device()))
    return cached


def video_vae(vae) -> SVDVideoVAE:
    """
    The STAR video VAE behind a node's VAE input, loaded on ComfyUI's VAE device through its memory manager:
    a STAR VAE as is, or a core ComfyUI `VAE` that holds the SVD temporal-decoder VAE (its weights are re-read
    once into star_core's SVD adapter).
    """
    video = _to_video_vae(vae)
    patcher = _patchers.get(video)
    if patcher is None:
        size = sum(p.numel() * p.element_size() for p in video.model.parameters())
        patcher = _patchers[video] = ModelPatcher(SVD_VAE(video.model), load_device=mm.vae_device(),
                                                  offload_device=mm.vae_offload_device(), size=size)
    mm.load_models_gpu([patcher], force_full_load=True)  # diffusers layers cannot be partially loaded
    return video


def conditioning_context(conditioning, name: str, width: int | None = None) -> torch.Tensor:
    """The [1,77,W] text context from a CONDITIONING (first entry; prompts longer than 77 tokens are cut); with
    `width`, a context of another width (another text encoder than STAR's CLIP-H) is refused naming it."""
    try:
        context = conditioning[0][0]
    except (TypeError, IndexError, KeyError):
        raise ValueError(f"{name}: expected CONDITIONING from STAR Text Encode or CLIP Text Encode") from None
    if not isinstance(context, torch.Tensor) or context.ndim != 3 or context.shape[1] < 77:
        shape = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
        raise ValueError(f"{name}: conditioning tensor {shape} is not [1,77·n,width] from a CLIP text encoder")
    if width is not None:
        check_context_width(context, width, f"{name} conditioning")
    return context[:1, :77]


def geometry_of(latent: dict, name: str):
    """The `Geometry` a STAR LR Encode attached to a LATENT."""
    from star_core.geometry import Geometry

    if not isinstance(latent, dict) or GEOMETRY_KEY not in latent:
        raise ValueError(f"{name}: this LATENT has no STAR geometry; make it with STAR LR Encode (and STAR Sampler)")
    return Geometry.from_dict(latent[GEOMETRY_KEY])


def seed_of(latent: dict, name: str) -> int:
    """
    The run's seed STAR LR Encode stored in the latent: the sampler re-seeds the run's stream with it, so the start
    noise and the SDE noise follow the posterior noise in the documented order (`star_core.seeds`).
    """
    seed = latent.get(SEED_KEY) if isinstance(latent, dict) else None
    if seed is None:
        raise ValueError(f"{name}: this LATENT has no STAR seed; make it with STAR LR Encode (which holds the run's "
                         "seed)")
    return int(seed)


def encode_latent(vae, source, audio_from: str | None, spec) -> dict:
    """
    Encodes a `FrameSource` window by window (`pipeline.encode_source`) into a STAR LATENT: the samples plus the
    geometry, the run's seed and the source (with the file holding its audio) for decoding later.
    """
    geometry = pipeline.plan(source.info, spec)
    video = video_vae(vae)
    ctx = context(video.model)
    with ctx.scope():
        latent = pipeline.encode_source(source, geometry, video, spec, host=ctx)
    return {"samples": to_output(latent), GEOMETRY_KEY: geometry.to_dict(), SEED_KEY: spec.seed,
            SOURCE_KEY: (source, audio_from)}


def source_of(latent: dict, name: str):
    """(FrameSource, audio file or None) of the LR frames a STAR latent was encoded from."""
    if not isinstance(latent, dict) or SOURCE_KEY not in latent:
        raise ValueError(f"{name}: this LATENT does not remember its video; make it with STAR Encode Video or STAR LR "
                         "Encode (and STAR Sampler)")
    return latent[SOURCE_KEY]


def star_keys(latent: dict) -> dict:
    """The STAR entries of a LATENT (everything but the samples)."""
    return {key: value for key, value in latent.items() if key.startswith("star_")}


def to_output(frames: torch.Tensor) -> torch.Tensor:
    """Node outputs live on ComfyUI's intermediate device, float32."""
    return frames.to(mm.intermediate_device(), torch.float32)


def store_cast_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Stores the matmul/conv weights of ComfyUI cast layers in `dtype` (fp8); they are cast back per call."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if getattr(module, "comfy_cast_weights", False) and weight is not None and weight.ndim >= 2:
            module.weight = torch.nn.Parameter(weight.detach().to(dtype), requires_grad=False)


def encode_text(clip, text: str) -> list:
    """CONDITIONING for `text` from a core CLIP, cut to its first 77-token window like the official encoder."""
    tokens = clip.tokenize(text)
    first_window = {name: windows[:1] for name, windows in tokens.items()}
    return clip.encode_from_tokens_scheduled(first_window)


class _HostTokenizer:
    """star_core's tokenizer interface (`encode`/`decode` of BPE ids) over a core CLIP's HF tokenizer."""

    def __init__(self, hf_tokenizer) -> None:
        self.hf = hf_tokenizer

    def encode(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids)


def clip_tokenizer(clip) -> _HostTokenizer:
    """The CLIP-H BPE tokenizer inside a core CLIP (needed to shorten prompts for the protected suffix)."""
    inner = getattr(getattr(clip, "tokenizer", None), "clip_h", None)
    hf = getattr(inner, "tokenizer", None)
    if hf is None:
        raise ValueError("STAR Text Encode: suffix 'protected' needs an SD 2.x CLIP-H (its tokenizer was not found "
                         "in this CLIP); use suffix 'official' or load the CLIP with type stable_diffusion")
    return _HostTokenizer(hf)
