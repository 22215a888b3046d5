"""Automatic sizing: the largest plan that fits a memory budget, the next smaller one after an out-of-memory error,
and the error that names what the smallest plan would need."""
from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch

from .estimate import GIB, estimate_peak
from .plan import Components, PlanSizes, valid_tile_sizes

T = TypeVar("T")

# The plan fields `choose_plan` may set; the others are taken from the base plan as given.
AUTO_FIELDS = ("chunk_len", "tile", "state_on_device", "vae_tile", "vae_park", "decode_window")
# Chunk lengths tried below the base plan's (the official 32 is the usual maximum).
CHUNK_STEPS = (32, 24, 16, 12, 8, 6, 4, 3, 2, 1)
# VAE tile edges tried, in pixels.
VAE_TILES = (1024, 768, 512, 384, 256)
# Smallest diffusion tile (latent cells, 208x256 px): smaller tiles see too little of the frame.
MIN_TILE = (26, 32)
# Fraction of the budget left free for what the model does not count (allocator fragmentation, kernel workspaces).
DEFAULT_MARGIN = 0.1
# Shortest chunk preferred over diffusion tiling: below it the temporal layers see too few frames to keep the
# video consistent, while overlapping tiles only cost some compute. 1 gives the strict order (tile last).
DEFAULT_MIN_CHUNK = 8
# Stages and the plan fields that act on them.
SAMPLE_FIELDS = ("chunk_len", "tile", "state_on_device")
VAE_FIELDS = ("vae_tile", "vae_park", "decode_window")


class NoPlanFits(MemoryError):
    """
    No plan fits the memory available: names the smallest plan tried and what it needs.

    Parameters:
        budget (`int`, *optional*): bytes available (None when an out-of-memory error, not a budget, stopped it).
        plan (`PlanSizes`): the smallest plan tried.
        needed (`int`): its estimated peak in bytes.
        stage (`str`, *optional*): the stage that did not fit.
    """

    def __init__(self, budget: int | None, plan: PlanSizes, needed: int, stage: str | None = None) -> None:
        self.budget, self.plan, self.needed, self.stage = budget, plan, needed, stage
        where = f" ({_STAGE_NAMES.get(stage, stage)})" if stage else ""
        if budget is None:
            head = f"out of memory{where} even with the smallest plan"
        else:
            head = f"nothing fits in {budget / GIB:.2f} GiB{where}: the smallest plan"
        super().__init__(f"{head} ({plan.describe(stage)}) needs {needed / GIB:.2f} GiB; free memory or lower the "
                         f"output size")


_STAGE_NAMES = {"sample": "sampling", "encode": "VAE encode", "decode": "VAE decode"}


def tile_edge(length: int, count: int, overlap: int, levels: int, axis: str, minimum: int = 1) -> int | None:
    """
    The smallest tile edge the network accepts on this axis with which `count` tiles, neighbours sharing at least
    `overlap` cells, cover `length` cells; None when no valid edge of at least `minimum` does (the whole axis
    for ``count == 1``). Place the tiles with `star_core.windows.plan_windows(length, edge, overlap)`.

    Parameters:
        length (`int`): latent cells on the axis.
        count (`int`): tiles on the axis.
        overlap (`int`): cells shared by neighbouring tiles.
        levels (`int`): resolution levels of the network.
        axis (`str`): ``"h"`` or ``"w"``.
        minimum (`int`): smallest acceptable edge.
    """
    if count == 1:
        return length
    need = max(-(-(length + (count - 1) * overlap) // count), minimum)
    fitting = [size for size in valid_tile_sizes(length, levels, axis) if size >= need]
    return min(fitting) if fitting else None


def _axis_edges(length: int, overlap: int, levels: int, axis: str, minimum: int) -> list[int]:
    """Every distinct tile edge of 1, 2, 3, ... tiles on an axis, down to the smallest valid edge >= `minimum`."""
    edges, count = [], 1
    while True:
        edge = tile_edge(length, count, overlap, levels, axis, minimum)
        if edge is None:
            return edges
        if edge not in edges:
            edges.append(edge)
        if edge <= minimum or edge <= overlap + 1 or count > length:
            return edges
        count += 1


def _tile_candidates(plan: PlanSizes, levels: int) -> list[tuple[int, int] | None]:
    """None (untiled), then the tiles of every rows x cols grid down to `MIN_TILE`, largest tile first."""
    heights = _axis_edges(plan.latent_h, plan.tile_overlap, levels, "h", MIN_TILE[0])
    widths = _axis_edges(plan.latent_w, plan.tile_overlap, levels, "w", MIN_TILE[1])
    tiles = [(th, tw) for th in heights for tw in widths if th < plan.latent_h or tw < plan.latent_w]
    return [None] + sorted(tiles, key=lambda t: (-t[0] * t[1], t))


def _chunk_candidates(plan: PlanSizes) -> list[int]:
    top = min(plan.chunk_len, plan.frames)
    return [top] + [c for c in CHUNK_STEPS if c < top]


def sample_candidates(base: PlanSizes, components: Components, auto: Iterable[str] = AUTO_FIELDS, *,
                      min_chunk: int = DEFAULT_MIN_CHUNK) -> list[PlanSizes]:
    """
    The denoiser plans `choose_plan` tries, most preferred first: untiled before tiled, longer chunks before
    shorter ones, larger tiles before smaller ones, the sampler state on the device before on the host. Chunks
    shorter than `min_chunk` come only after every tiled plan with a longer chunk.

    Parameters:
        base (`PlanSizes`): the plan whose non-auto fields are kept.
        components (`Components`): the models (the tile rules follow the network's levels).
        auto (`Iterable[str]`): the fields to choose (see `AUTO_FIELDS`).
        min_chunk (`int`): shortest chunk preferred over tiling.
    """
    auto = set(auto)
    chunks = _chunk_candidates(base) if "chunk_len" in auto else [base.chunk_len]
    tiles = _tile_candidates(base, len(components.unet_config.dim_mult)) if "tile" in auto else [base.tile]
    states = [True, False] if "state_on_device" in auto else [base.state_on_device]
    plans = [base.replace(chunk_len=c, tile=t, state_on_device=s) for c in chunks for t in tiles for s in states]

    def key(p: PlanSizes) -> tuple:
        area = p.latent_h * p.latent_w if p.tile is None else p.tile[0] * p.tile[1]
        return (p.chunk_len < min_chunk, p.tile is not None, -p.chunk_len, -area, not p.state_on_device)

    return sorted(plans, key=key)


def vae_candidates(base: PlanSizes, auto: Iterable[str] = AUTO_FIELDS) -> list[PlanSizes]:
    """
    The VAE plans `choose_plan` tries, most preferred first: the longest decode window (up to the base plan's; the
    official 3 gives the official frames), whole frames, then exact tiles from large to small with whole-frame
    buffers on the device, then the same on the host.

    Parameters:
        base (`PlanSizes`): the plan whose non-auto fields are kept.
        auto (`Iterable[str]`): the fields to choose.
    """
    auto = set(auto)
    windows = list(range(base.decode_window, 0, -1)) if "decode_window" in auto else [base.decode_window]
    longest = max(base.pixel_size)
    tiles = ([None] + [t for t in VAE_TILES if t < longest]) if "vae_tile" in auto else [base.vae_tile]
    parks = ["device", "host"] if "vae_park" in auto else [base.vae_park]
    plans = []
    for window in windows:
        for park in parks:
            for tile in tiles:
                if tile is None and park != parks[0]:
                    continue  # parking only applies to tiles
                plans.append(base.replace(decode_window=window, vae_tile=tile, vae_park=park))
    return plans


def _vae_peak(plan: PlanSizes, components: Components, overhead: int, brownian: bool) -> int:
    estimate = estimate_peak(plan, components, overhead=overhead, brownian=brownian)
    return max(estimate.stage("encode").total, estimate.stage("decode").total)


def choose_plan(budget: int, base: PlanSizes, components: Components | None = None, *,
                auto: Iterable[str] = AUTO_FIELDS, margin: float = DEFAULT_MARGIN, min_chunk: int = DEFAULT_MIN_CHUNK,
                overhead: int = 0, brownian: bool = True) -> PlanSizes:
    """
    The most preferred plan whose estimated peak fits `budget` (less a `margin`): the denoiser settings (chunk,
    diffusion tile, where the sampler state lives) and the VAE settings (tile, parking, decode window) are chosen
    independently, each for its own stages, with the weights the components keep resident.

    Parameters:
        budget (`int`): bytes available on the device (e.g. ComfyUI's ``model_management.get_free_memory()``, the
            CLI's ``--memory-budget`` or the free CUDA memory).
        base (`PlanSizes`): the run's sizes and dtypes; its values of the auto fields are the maxima (e.g.
            ``chunk_len=32``, ``decode_window=3``) and the values of the other fields are kept.
        components (`Components`, *optional*): the models (default: released, all resident).
        auto (`Iterable[str]`): fields to choose, a subset of `AUTO_FIELDS`; the user fixed the others.
        margin (`float`): fraction of `budget` kept free for what the estimate does not count.
        min_chunk (`int`): shortest chunk preferred over diffusion tiling (1: tile only when even one frame
            does not fit untiled).
        overhead (`int`), brownian (`bool`): see `estimate_peak`.

    Returns:
        `PlanSizes`: the chosen plan.

    Raises:
        NoPlanFits: when even the smallest plan does not fit; it names that plan and the memory it needs.
    """
    components = Components() if components is None else components
    auto = set(auto)
    unknown = auto - set(AUTO_FIELDS)
    if unknown:
        raise ValueError(f"choose_plan: cannot choose {sorted(unknown)}; auto fields are {AUTO_FIELDS}")
    if not budget > 0:
        raise ValueError(f"choose_plan: the budget must be a positive number of bytes, got {budget!r}")
    usable = budget * (1 - margin)

    def sample_peak(plan: PlanSizes) -> int:
        return estimate_peak(plan, components, overhead=overhead, brownian=brownian).stage("sample").total

    sample = _first_fitting(sample_candidates(base, components, auto, min_chunk=min_chunk), sample_peak, usable)
    if isinstance(sample, tuple):
        raise NoPlanFits(budget, *sample, stage="sample")
    vae = _first_fitting(vae_candidates(sample, auto), lambda p: _vae_peak(p, components, overhead, brownian),
                         usable)
    if isinstance(vae, tuple):
        plan, needed = vae
        estimate = estimate_peak(plan, components, overhead=overhead, brownian=brownian)
        raise NoPlanFits(budget, plan, needed, stage=max(("encode", "decode"),
                                                         key=lambda s: estimate.stage(s).total))
    return vae


def _first_fitting(candidates: list[PlanSizes], peak: Callable[[PlanSizes], int],
                   usable: float) -> PlanSizes | tuple[PlanSizes, int]:
    """The first candidate within `usable`, else (the smallest candidate, its peak)."""
    smallest = None
    for plan in candidates:
        need = peak(plan)
        if need <= usable:
            return plan
        if smallest is None or need < smallest[1]:
            smallest = (plan, need)
    assert smallest is not None
    return smallest


def shrink(plan: PlanSizes, stage: str, components: Components | None = None, *,
           auto: Iterable[str] = AUTO_FIELDS, factor: float = 0.75, min_chunk: int = DEFAULT_MIN_CHUNK,
           brownian: bool = True) -> PlanSizes | None:
    """
    The next plan to try after `plan` ran out of memory in `stage`: the most preferred candidate for that stage
    whose estimate is at most `factor` times `plan`'s, else the smallest candidate if it is smaller at all, else
    None.

    Parameters:
        plan (`PlanSizes`): the plan that failed.
        stage (`str`): ``"sample"``, ``"encode"`` or ``"decode"``.
        components (`Components`, *optional*): the models.
        auto (`Iterable[str]`): the fields that may change.
        factor (`float`): how much smaller (estimated) the next plan must be.
        min_chunk (`int`), brownian (`bool`): as for `choose_plan`.
    """
    components = Components() if components is None else components
    if stage == "sample":
        candidates = sample_candidates(plan, components, auto, min_chunk=min_chunk)
    elif stage in ("encode", "decode"):
        candidates = vae_candidates(plan, auto)
    else:
        raise ValueError(f"shrink: stage must be 'sample', 'encode' or 'decode', got {stage!r}")

    def need(p: PlanSizes) -> int:
        return estimate_peak(p, components, brownian=brownian).stage(stage).total

    current = need(plan)
    needs = [(need(p), p) for p in candidates]
    preferred = next((p for n, p in needs if n <= current * factor), None)
    if preferred is not None:
        return preferred
    smallest_need, smallest = min(needs, key=lambda item: item[0])
    return smallest if smallest_need < current else None


def is_out_of_memory(error: BaseException, extra: tuple[type[BaseException], ...] = ()) -> bool:
    """
    Whether `error` is an allocation failure: ``torch.OutOfMemoryError`` (CUDA and others), a host's own type
    (`extra`, e.g. ComfyUI's ``model_management.OOM_EXCEPTION``), or a CPU allocator / MPS out-of-memory
    ``RuntimeError``.
    """
    if isinstance(error, (torch.OutOfMemoryError, *extra)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_cached_memory() -> None:
    """Collects garbage and returns cached blocks of the accelerator allocator (CUDA, MPS) to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()


def run_with_retry(step: Callable[[PlanSizes], T], plan: PlanSizes, stage: str, *,
                   next_plan: Callable[[PlanSizes], PlanSizes | None] | None = None,
                   components: Components | None = None, auto: Iterable[str] = AUTO_FIELDS,
                   oom_errors: tuple[type[BaseException], ...] = (), log: Callable[[str], None] | None = None,
                   clear_cache: Callable[[], None] = free_cached_memory) -> tuple[T, PlanSizes]:
    """
    Runs ``step(plan)``; when it runs out of memory, frees the cache and runs it again with the next smaller plan
    (`shrink`), until it succeeds or no smaller plan is left. The first retry is logged once.

    The step must be restartable: it gets the plan to use and must not keep a half-done result (e.g. one denoiser
    evaluation, one decode window). The caller should keep the returned plan for the following steps.

    Parameters:
        step (`Callable[[PlanSizes], T]`): the work, sized by the plan it is given.
        plan (`PlanSizes`): the plan to try first.
        stage (`str`): ``"sample"``, ``"encode"`` or ``"decode"`` (which fields shrink, and for messages).
        next_plan (`Callable`, *optional*): the plan after a failed one (default `shrink` for `stage`).
        components (`Components`, *optional*), auto (`Iterable[str]`): passed to `shrink`.
        oom_errors (`tuple[type, ...]`): the host's out-of-memory exception types, besides torch's.
        log (`Callable[[str], None]`, *optional*): where the one retry message goes.
        clear_cache (`Callable[[], None]`): frees memory between tries (default: gc + the allocator's cache).

    Returns:
        `tuple[T, PlanSizes]`: the step's result and the plan it succeeded with.

    Raises:
        NoPlanFits: when the smallest plan also ran out of memory (chained to the last out-of-memory error).
    """
    if next_plan is None:
        def next_plan(failed: PlanSizes) -> PlanSizes | None:
            return shrink(failed, stage, components, auto=auto)

    logged = False
    while True:
        failure: BaseException | None = None
        try:
            return step(plan), plan
        except BaseException as error:  # noqa: BLE001 - only out-of-memory errors are handled, others re-raised
            if not is_out_of_memory(error, oom_errors):
                raise
            failure = error.with_traceback(None)  # the traceback's frames would keep the failed step's tensors
        clear_cache()
        smaller = next_plan(plan)
        if smaller is None:
            needed = estimate_peak(plan, components).stage(stage).total
            raise NoPlanFits(None, plan, needed, stage) from failure
        if log is not None and not logged:
            log(f"out of memory during {stage} with {plan.describe()}; retrying with smaller plans, starting with "
                f"{smaller.describe()}")
            logged = True
        plan = smaller
