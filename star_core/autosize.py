"""``auto`` run options: the largest plan that fits the host's memory budget, chosen per stage when it starts, and
smaller plans after an out-of-memory error.

The spec's sizing options — ``sampler.chunk_len``, ``sampler.tile`` (diffusion tiles), ``encode.tile``,
``decode.tile`` and ``decode.window`` — accept ``"auto"`` (their default). Each stage of
:mod:`star_core.pipeline` resolves its own auto options when it starts, from

* the run's geometry (frames, latent size) and the loaded models (parameters, architecture, dtypes), turned into a
  :class:`star_core.memory.PlanSizes` whose auto fields start at the official maxima (chunk 32, whole frames,
  3-frame decode windows);
* the host's budget (:attr:`star_core.host.HostContext.memory_budget`, bytes the run may use on its device,
  weights included): ``--memory-budget`` or the free device memory in the CLI, ComfyUI's free memory in the nodes.

It picks the most preferred plan whose estimate fits (:func:`star_core.memory.choose_plan`): untiled before
tiled, long chunks before short ones, so a budget that holds the official plan gets exactly the official
settings and numbers. Without a budget, or for a model the memory model does not know, auto is the official
plan. When a stage then runs out of memory anyway, its auto options shrink (:func:`star_core.memory.shrink`) and
the failed step (one denoiser evaluation, one VAE window) is repeated; user-set options never change.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

from .diffusion.star_sampling import SamplerSettings, network_levels, tile_cells
from .geometry import Geometry
from .host import HostContext
from .memory import Components as MemoryComponents
from .memory import NoPlanFits, PlanSizes, choose_plan, is_out_of_memory, run_with_retry, shrink, stage_peak
from .memory.auto import free_cached_memory
from .options import AUTO
from .spec import DecodeSpec, EncodeSpec
from .vae.base import OFFICIAL_WINDOW

T = TypeVar("T")

# spec option → PlanSizes field, and the value an auto option has when memory does not limit it (official).
AUTO_OPTIONS = {"sampler.chunk_len": "chunk_len", "sampler.tile": "tile", "encode.tile": "encode_tile",
                "decode.tile": "decode_tile", "decode.window": "decode_window"}
MAXIMUM = {"sampler.chunk_len": 32, "sampler.tile": None, "encode.tile": None, "decode.tile": None,
           "decode.window": OFFICIAL_WINDOW}
VAE_FACTOR = 8
# Latent cells shared by diffusion tiles in the estimate when the spec leaves the overlap automatic.
DEFAULT_TILE_OVERLAP = 8


def _auto_names(section: object, prefix: str) -> set[str]:
    return {f"{prefix}.{f.name}" for f in dataclasses.fields(section) if getattr(section, f.name) == AUTO}


def _dtype(module: object, default: torch.dtype = torch.float32) -> torch.dtype:
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(module, torch.nn.Module):
        return next(module.parameters(), torch.empty(0)).dtype
    return default


def memory_components(model: object = None, vae: object = None, *, resident: bool = True) -> MemoryComponents | None:
    """
    What the memory model needs to know about loaded models (:class:`star_core.memory.Components`); None when
    it does not know the network (a plain ``model_fn`` without a STAR ``config``).

    Parameters:
        model (`torch.nn.Module` or `Callable`, *optional*): the STAR network, a ``model_fn`` carrying it as
            ``module`` (`star_core.pipeline.model_function`), or one carrying only its ``config`` (then its
            parameter count is computed from the architecture on the meta device).
        vae (`star_core.vae.VideoVAE`, *optional*): the video VAE (its diffusers ``model`` gives the widths).
        resident (`bool`): every model stays on the device for the whole run (the CLI); False for a host that
            loads each stage's model in turn (ComfyUI).
    """
    model = getattr(model, "module", model)  # a model_fn of `pipeline.model_function` carries its network
    vae_model = getattr(vae, "model", None)
    if not isinstance(vae_model, torch.nn.Module) or not hasattr(vae_model, "config"):
        vae_model = None
    if isinstance(model, torch.nn.Module) and hasattr(model, "config"):
        return MemoryComponents.from_models(model, vae_model, resident=resident)
    config = getattr(model, "config", None)
    if model is not None and config is None:
        return None
    # without the network (a VAE stage on its own) its weights are not counted
    base = MemoryComponents.from_models(_Params(config), vae_model, resident=resident) if config is not None \
        else MemoryComponents(unet_params=0, resident=resident)
    if vae_model is None:
        return base
    return dataclasses.replace(base, vae_params=sum(p.numel() for p in vae_model.parameters()),
                               vae_widths=tuple(vae_model.config.block_out_channels))


class _Params(torch.nn.Module):
    """The parameters of a STAR network of ``config``, on the meta device (counts only)."""

    def __init__(self, config) -> None:
        super().__init__()
        from .model import STARUNet

        with torch.device("meta"):
            self.net = STARUNet(config)
        self.config = config


def latent_size(geometry: Geometry) -> tuple[int, int, int]:
    """(frames, latent height, latent width) of a run's geometry."""
    return (geometry.frames, *geometry.latent_size)


def official(section):
    """A spec section (or `SamplerSettings`) with its ``auto`` options at their official values (:data:`MAXIMUM`)."""
    prefix = getattr(section, "PREFIX", "")
    changes = {f.name: MAXIMUM[f"{prefix}.{f.name}"] for f in dataclasses.fields(section)
               if getattr(section, f.name) == AUTO}
    return dataclasses.replace(section, **changes) if changes else section


def plan_sizes(size: tuple[int, int, int], *, sampler: SamplerSettings | None = None, encode: EncodeSpec | None = None,
               decode: DecodeSpec | None = None, model: object = None, vae: object = None,
               encode_window: int = 4) -> PlanSizes:
    """
    The memory model's plan of a run's options: auto options at their maxima (:data:`MAXIMUM`).

    Parameters:
        size (`tuple[int, int, int]`): latent frames, height and width (:func:`latent_size`).
        sampler (`SamplerSettings`, *optional*), encode (`EncodeSpec`, *optional*), decode (`DecodeSpec`,
            *optional*): the options (defaults where not given).
        model (`torch.nn.Module` or `Callable`, *optional*), vae (`VideoVAE`, *optional*): their dtypes.
        encode_window (`int`): LR frames per encode call.
    """
    sampler = SamplerSettings() if sampler is None else sampler
    encode = EncodeSpec() if encode is None else encode
    decode = DecodeSpec() if decode is None else decode
    frames, latent_h, latent_w = size

    def value(path: str, given):
        return MAXIMUM[path] if given == AUTO else given

    tile = value("sampler.tile", sampler.tile)
    if tile is not None:
        levels = network_levels(model)
        tile = (tile_cells(tile[0], latent_h, levels, "h"), tile_cells(tile[1], latent_w, levels, "w"))
    weights = _dtype(model)
    vae_dtype = _dtype(vae)
    return PlanSizes(
        frames=frames, latent_h=latent_h, latent_w=latent_w,
        chunk_len=min(frames, MAXIMUM["sampler.chunk_len"]) if sampler.chunk_len == AUTO else sampler.chunk_len,
        fusion=sampler.fusion, tile=tile,
        tile_overlap=DEFAULT_TILE_OVERLAP if sampler.tile_overlap is None else max(1, sampler.tile_overlap // 8),
        batch_cfg=sampler.batch_cfg, unet_dtype=weights, vae_dtype=vae_dtype,
        decode_dtype=getattr(vae, "decode_autocast", None) or vae_dtype,
        encode_tile=value("encode.tile", encode.tile), decode_tile=value("decode.tile", decode.tile),
        decode_window=value("decode.window", decode.window), encode_window=encode_window)


def _spec_value(path: str, plan: PlanSizes):
    """The spec's value of an auto option for a chosen plan."""
    value = getattr(plan, AUTO_OPTIONS[path])
    if path == "sampler.chunk_len" and value >= min(MAXIMUM[path], plan.frames):
        return MAXIMUM[path]  # a chunk covering a short video is the official chunk length
    if path == "sampler.tile" and value is not None:
        return (value[0] * VAE_FACTOR, value[1] * VAE_FACTOR)
    return value


def _with_plan(section, prefix: str, auto: set[str], plan: PlanSizes):
    changes = {path.partition(".")[2]: _spec_value(path, plan) for path in auto if path.startswith(prefix + ".")}
    overlap = getattr(section, "overlap", None)
    if "chunk_len" in changes and overlap is not None and section.fusion != "official":
        changes["chunk_len"] = max(changes["chunk_len"], overlap + 1)  # a chunk longer than the user's overlap
    if "window" in changes:
        changes["window"] = max(changes["window"], section.window_overlap + 1)  # windows longer than their overlap
    return dataclasses.replace(section, **changes) if changes else section


def _fields(stage: str, auto: set[str]) -> set[str]:
    """The plan fields a stage's auto options let the memory model choose: an auto VAE tile also chooses where the
    exact tiles park their whole-frame values (the device, or the host when even small tiles do not fit), an auto
    chunk length or diffusion tile also where the sampler keeps its whole-video state (the device, or the host with
    one window at a time on the device)."""
    fields = {AUTO_OPTIONS[path] for path in auto}
    if f"{stage}.tile" in auto:
        fields.add(f"{stage}_park")
    if stage == "sample" and fields:
        fields.add("state_on_device")
    return fields


def park(plan: PlanSizes, stage: str) -> str:
    """`SpatialTiling.park` of a plan's VAE stage: ``"host"``, or ``"auto"`` (the device while a tile fits)."""
    return "host" if getattr(plan, f"{stage}_park") == "host" else "auto"


def _choose(stage: str, base: PlanSizes, auto: set[str], components: MemoryComponents | None,
            host: HostContext) -> PlanSizes:
    fields = _fields(stage, auto)
    if not fields or host.memory_budget is None or components is None:
        return base
    plan = choose_plan(host.memory_budget, base, components, auto=fields, stages=(stage,))
    if plan != base and any(getattr(plan, name) != getattr(base, name) for name in fields):
        host.log(f"auto sizing for {host.memory_budget / 2**30:.1f} GiB: {plan.describe(stage)}")
    return plan


class Sizing:
    """
    One stage's auto options: the concrete options to run with, and the smaller ones after an out-of-memory error.

    Parameters:
        stage (`str`): ``"encode"``, ``"sample"`` or ``"decode"``.
        plan (`PlanSizes`): the plan the stage runs with.
        auto (`set[str]`): the stage's options that were ``auto`` (only these ever change).
        components (`star_core.memory.Components`, *optional*): the models (None: the memory model does not know
            them; out-of-memory errors are then not retried).
        host (`HostContext`): budget, log and the host's out-of-memory types.
    """

    def __init__(self, stage: str, plan: PlanSizes, auto: set[str], components: MemoryComponents | None,
                 host: HostContext) -> None:
        self.stage, self.plan, self.auto, self.components, self.host = stage, plan, auto, components, host
        self._logged = False

    @property
    def fields(self) -> set[str]:
        """The plan fields that may shrink."""
        return _fields(self.stage, self.auto)

    @property
    def can_shrink(self) -> bool:
        """Whether an out-of-memory error can be answered with a smaller plan (auto options, a known model)."""
        return bool(self.auto) and self.components is not None

    def matches(self, error: BaseException) -> bool:
        """Whether ``error`` is an out-of-memory error this stage can answer with a smaller plan."""
        return self.can_shrink and is_out_of_memory(error, self.host.oom_errors)

    def _next(self, failed: PlanSizes, fields: Iterable[str] | None = None) -> PlanSizes | None:
        """The plan after ``failed`` ran out of memory (logged once per stage), or None when none is smaller."""
        fields = self.fields if fields is None else set(fields) & self.fields
        smaller = shrink(failed, self.stage, self.components, auto=fields) if fields else None
        if smaller is not None and not self._logged:
            self.host.log(f"out of memory during {self.stage} with {failed.describe(self.stage)}; retrying with "
                          f"{smaller.describe(self.stage)}")
            self._logged = True
        return smaller

    def smaller(self, error: BaseException, fields: Iterable[str] | None = None) -> PlanSizes:
        """
        The next smaller plan after ``error`` (kept, and logged once per stage); raises
        `star_core.memory.NoPlanFits` (chained to ``error``) when none is left. For a caller with its own retry
        loop (the sampler's `Replan`).

        Parameters:
            error (`BaseException`): the out-of-memory error.
            fields (`Iterable[str]`, *optional*): the plan fields that may change now (default all auto ones).
        """
        free_cached_memory()
        smaller = self._next(self.plan, fields)
        if smaller is None:
            raise NoPlanFits(None, self.plan, stage_peak(self.plan, self.stage, self.components).total,
                             self.stage) from error
        self.plan = smaller
        return smaller

    def retry(self, step: Callable[[PlanSizes], T], fields: Iterable[str] | None = None) -> T:
        """
        Runs ``step(plan)``; after an out-of-memory error that this stage can answer, runs it again with the next
        smaller plan (`star_core.memory.run_with_retry`), which is kept for the following steps.

        Parameters:
            step (`Callable[[PlanSizes], T]`): restartable work sized by the plan (one VAE window).
            fields (`Iterable[str]`, *optional*): the plan fields that may change between tries.
        """
        if not self.can_shrink:
            return step(self.plan)
        result, self.plan = run_with_retry(step, self.plan, self.stage, components=self.components,
                                           next_plan=lambda failed: self._next(failed, fields),
                                           oom_errors=self.host.oom_errors)
        return result


def sampler_sizing(settings: SamplerSettings, size: tuple[int, int, int], model: object,
                   host: HostContext, *, vae: object = None) -> tuple[SamplerSettings, Sizing]:
    """
    The sampler settings to run with (auto chunk length and diffusion tile chosen for the budget) and their
    :class:`Sizing` (smaller windows after an out-of-memory error).

    Parameters:
        settings (`SamplerSettings`): the spec's sampler options, possibly with ``auto`` values.
        size (`tuple[int, int, int]`): latent frames, height and width.
        model (`torch.nn.Module` or `Callable`): the network (or ``model_fn`` with its ``config``).
        host (`HostContext`): budget, residency, log.
        vae (`VideoVAE`, *optional*): the VAE, counted when the models stay resident.
    """
    auto = _auto_names(settings, "sampler")
    components = memory_components(model, vae, resident=host.resident) if auto else None
    base = plan_sizes(size, sampler=settings, model=model, vae=vae)
    plan = _choose("sample", base, auto, components, host)
    return sampler_settings(settings, plan, auto), Sizing("sample", plan, auto, components, host)


def sampler_settings(settings: SamplerSettings, plan: PlanSizes, auto: set[str]) -> SamplerSettings:
    """``settings`` with its auto options set from ``plan``."""
    return _with_plan(settings, "sampler", auto, plan)


def vae_sizing(stage: str, options: EncodeSpec | DecodeSpec, geometry: Geometry, vae: object, host: HostContext,
               *, model: object = None, encode_window: int = 4) -> tuple[EncodeSpec | DecodeSpec, Sizing]:
    """
    The encode or decode options to run with (auto tile and decode window chosen for the budget) and their
    :class:`Sizing`.

    Parameters:
        stage (`str`): ``"encode"`` or ``"decode"``.
        options (`EncodeSpec` or `DecodeSpec`): the spec's section, possibly with ``auto`` values.
        geometry (`Geometry`): the run's geometry.
        vae (`VideoVAE`): the video VAE.
        host (`HostContext`): budget, residency, log.
        model (`torch.nn.Module`, *optional*): the network, counted when the models stay resident.
        encode_window (`int`): LR frames per encode call.
    """
    auto = _auto_names(options, stage)
    components = memory_components(model, vae, resident=host.resident) if auto else None
    base = plan_sizes(latent_size(geometry), model=model, vae=vae, encode_window=encode_window, **{stage: options})
    plan = _choose(stage, base, auto, components, host)
    return vae_options(options, stage, plan, auto), Sizing(stage, plan, auto, components, host)


def vae_options(options: EncodeSpec | DecodeSpec, stage: str, plan: PlanSizes, auto: set[str]):
    """``options`` with its auto values set from ``plan``."""
    return _with_plan(options, stage, auto, plan)


def device_budget(device: torch.device, modules: Iterable[torch.nn.Module] = (), *,
                  free: Callable[[torch.device], int] | None = None) -> int | None:
    """
    Bytes a run may use on ``device``, weights included: the device's free memory plus what ``modules`` already
    occupy there. None when the free memory is unknown.

    Parameters:
        device (`torch.device`): the run's device.
        modules (`Iterable[torch.nn.Module]`): the run's models (their bytes on ``device`` count as available).
        free (`Callable[[torch.device], int]`, *optional*): the host's free-memory function (e.g. ComfyUI's
            ``model_management.get_free_memory``); default: CUDA's ``mem_get_info``, the CPU's available memory.
    """
    device = torch.device(device)
    if free is not None:
        available = int(free(device))
    elif device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    elif device.type == "cpu":
        available = _cpu_available()
    else:
        return None
    if available is None:
        return None
    held = 0
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.device.type == device.type:
                held += tensor.numel() * tensor.element_size()
    return available + held


def _cpu_available() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
