"""Automatic sizing: the largest plan that fits a memory budget, the next smaller one after an out-of-memory error,
and the error that names what the smallest plan would need."""
from __future__ import annotations

import gc
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

from .estimate import GIB, STAGES, stage_peak
from .plan import Components, PlanSizes, valid_tile_sizes

T = TypeVar("T")

# The plan fields `choose_plan` may set, per stage; the others are taken from the base plan as given.
STAGE_FIELDS = {"sample": ("chunk_len", "tile", "state_on_device"), "encode": ("encode_tile", "encode_park"),
                "decode": ("decode_window", "decode_tile", "decode_park")}
AUTO_FIELDS = tuple(name for stage in STAGES for name in STAGE_FIELDS[stage])
# Chunk lengths tried below the base plan's (the official 32 is the usual maximum).
CHUNK_STEPS = (32, 24, 16, 12, 8, 6, 4, 3, 2, 1)
# Exact VAE tile edges tried, in pixels.
VAE_TILES = (1024, 768, 512, 384, 256)
# Smallest diffusion tile (latent cells, 208x256 px): smaller tiles see too little of the frame.
MIN_TILE = (26, 32)
# Fraction of the budget left free for what the model does not count (allocator fragmentation, kernel workspaces).
DEFAULT_MARGIN = 0.1
# Shortest chunk preferred over diffusion tiling: below it the temporal layers see too few frames to keep the
# video consistent, while overlapping tiles only cost some compute. 1 gives the strict order (tile last).
DEFAULT_MIN_CHUNK = 8


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
            head = f"nothing fits in {_amount(budget)}{where}: the smallest plan"
        super().__init__(f"{head} ({plan.describe(stage)}) needs {_amount(needed)}; free memory or lower the "
                         f"output size")


def _amount(size: int) -> str:
    """Bytes for a message: GiB with two decimals, MiB below a tenth of a GiB."""
    return f"{size / GIB:.2f} GiB" if size >= GIB / 10 else f"{size / 2**20:.1f} MiB"


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


def tiled_cells(length: int, edge: int, overlap: int) -> int:
    """Cells one axis evaluates with tiles of `edge` overlapping by at least `overlap` (`plan_windows`' count)."""
    if edge >= length:
        return length
    return -(-(length - overlap) // (edge - overlap)) * edge


def _tile_candidates(plan: PlanSizes, levels: int) -> list[tuple[int, int] | None]:
    """None (untiled), then the tiles of every rows x cols grid down to `MIN_TILE`, the least evaluated cells (the
    overlaps' extra work) first, then the larger tile: thin strips, which overlap the most, come late."""
    heights = _axis_edges(plan.latent_h, plan.tile_overlap, levels, "h", MIN_TILE[0])
    widths = _axis_edges(plan.latent_w, plan.tile_overlap, levels, "w", MIN_TILE[1])
    tiles = [(th, tw) for th in heights for tw in widths if th < plan.latent_h or tw < plan.latent_w]

    def key(tile: tuple[int, int]) -> tuple[int, int]:
        cells = (tiled_cells(plan.latent_h, tile[0], plan.tile_overlap)
                 * tiled_cells(plan.latent_w, tile[1], plan.tile_overlap))
        return cells, -tile[0] * tile[1]

    return [None] + sorted(tiles, key=key)


def _chunk_candidates(plan: PlanSizes) -> list[int]:
    top = min(plan.chunk_len, plan.frames)
    return [top] + [c for c in CHUNK_STEPS if c < top]


def _sample_candidates(base: PlanSizes, components: Components, auto: set[str], min_chunk: int) -> list[PlanSizes]:
    chunks = _chunk_candidates(base) if "chunk_len" in auto else [base.chunk_len]
    tiles = _tile_candidates(base, len(components.unet_config.dim_mult)) if "tile" in auto else [base.tile]
    states = [True, False] if "state_on_device" in auto else [base.state_on_device]
    plans = [base.replace(chunk_len=c, tile=t, state_on_device=s) for c in chunks for t in tiles for s in states]

    rank = {tile: i for i, tile in enumerate(tiles)}

    def key(p: PlanSizes) -> tuple:
        return (p.chunk_len < min_chunk, p.tile is not None, -p.chunk_len, rank[p.tile], not p.state_on_device)

    return sorted(plans, key=key)


def _vae_candidates(base: PlanSizes, stage: str, auto: set[str]) -> list[PlanSizes]:
    windows = [base.decode_window]
    if stage == "decode" and "decode_window" in auto:
        windows = list(range(base.decode_window, 0, -1))
    tile_name, park_name = f"{stage}_tile", f"{stage}_park"
    longest = max(base.pixel_size)
    tiles = [None] + [t for t in VAE_TILES if t < longest] if tile_name in auto else [getattr(base, tile_name)]
    parks = ["device", "host"] if park_name in auto else [getattr(base, park_name)]
    return [base.replace(decode_window=window, **{tile_name: tile, park_name: park})
            for window in windows for park in parks for tile in tiles
            if tile is not None or park == parks[0]]  # parking only applies to tiles


def candidates(base: PlanSizes, stage: str, components: Components | None = None,
               auto: Iterable[str] = AUTO_FIELDS, *, min_chunk: int = DEFAULT_MIN_CHUNK) -> list[PlanSizes]:
    """
    The plans `choose_plan` tries for one stage, most preferred first; only that stage's fields (`STAGE_FIELDS`)
    named in `auto` vary.

    * sample: untiled before tiled, longer chunks before shorter ones, tilings with less overlap work (larger,
      squarer tiles) before others, the sampler state on the device before on the host; chunks shorter than
      `min_chunk` only after every tiled plan with a longer chunk.
    * encode / decode: the longest decode window (up to the base plan's; the official 3 gives the official
      frames), whole frames, then exact tiles from large to small with the whole-frame buffers on the device, then
      the same on the host.

    Parameters:
        base (`PlanSizes`): the plan whose other fields are kept; its chunk length and decode window are maxima.
        stage (`str`): ``"sample"``, ``"encode"`` or ``"decode"``.
        components (`Components`, *optional*): the models (the tile rules follow the network's levels).
        auto (`Iterable[str]`): the fields that may vary (see `AUTO_FIELDS`).
        min_chunk (`int`): shortest chunk preferred over diffusion tiling.
    """
    components = Components() if components is None else components
    auto = set(auto)
    if stage == "sample":
        return _sample_candidates(base, components, auto, min_chunk)
    if stage in ("encode", "decode"):
        return _vae_candidates(base, stage, auto)
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


def choose_plan(budget: int, base: PlanSizes, components: Components | None = None, *,
                auto: Iterable[str] = AUTO_FIELDS, margin: float = DEFAULT_MARGIN,
                min_chunk: int = DEFAULT_MIN_CHUNK, overhead: int = 0, brownian: bool = True,
                stages: Iterable[str] = STAGES) -> PlanSizes:
    """
    The most preferred plan whose estimated peak fits `budget` (less a `margin`) in every stage of `stages`. The
    stages are independent (each has its own fields, `STAGE_FIELDS`), so each gets the most preferred of its
    `candidates` that fits, with the weights the components keep resident.

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
        stages (`Iterable[str]`): the stages to size (default all; a host that runs the stages separately, like
            the ComfyUI nodes, sizes each when it runs).

    Returns:
        `PlanSizes`: the chosen plan.

    Raises:
        NoPlanFits: when even the smallest plan of a stage does not fit; it names the stage whose smallest plan
            needs the most memory (what the run needs at least), that plan and its need.
    """
    components = Components() if components is None else components
    auto = set(auto)
    unknown = auto - set(AUTO_FIELDS)
    if unknown:
        raise ValueError(f"choose_plan: cannot choose {sorted(unknown)}; auto fields are {AUTO_FIELDS}")
    if not budget > 0:
        raise ValueError(f"choose_plan: the budget must be a positive number of bytes, got {budget!r}")
    usable = budget * (1 - margin)
    plan, failures = base, []
    stages = set(stages)
    for stage in (stage for stage in STAGES if stage in stages):
        smallest = None
        for candidate in candidates(plan, stage, components, auto, min_chunk=min_chunk):
            need = stage_peak(candidate, stage, components, overhead=overhead, brownian=brownian).total
            if need <= usable:
                plan = candidate
                break
            if smallest is None or need < smallest[1]:
                smallest = (candidate, need)
        else:
            failures.append((smallest[1], stage, smallest[0]))
    if failures:  # name the stage whose smallest plan needs the most: the least memory the run can work with
        need, stage, smallest = max(failures, key=lambda failure: failure[0])
        raise NoPlanFits(budget, smallest, need, stage=stage)
    return plan


def shrink(plan: PlanSizes, stage: str, components: Components | None = None, *,
           auto: Iterable[str] = AUTO_FIELDS, factor: float = 0.75, min_chunk: int = DEFAULT_MIN_CHUNK,
           brownian: bool = True) -> PlanSizes | None:
    """
    The next plan to try after `plan` ran out of memory in `stage`: the most preferred of the stage's
    `candidates` whose estimate is at most `factor` times `plan`'s, else the smallest candidate if it is smaller
    at all, else None.

    Parameters:
        plan (`PlanSizes`): the plan that failed.
        stage (`str`): ``"sample"``, ``"encode"`` or ``"decode"``.
        components (`Components`, *optional*): the models.
        auto (`Iterable[str]`): the fields that may change.
        factor (`float`): how much smaller (estimated) the next plan must be.
        min_chunk (`int`), brownian (`bool`): as for `choose_plan`.
    """
    def need(p: PlanSizes) -> int:
        return stage_peak(p, stage, components, brownian=brownian).total

    options = candidates(plan, stage, components, auto, min_chunk=min_chunk)
    current = need(plan)
    needs = [(need(p), p) for p in options]
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
            raise NoPlanFits(None, plan, stage_peak(plan, stage, components).total, stage) from failure
        if log is not None and not logged:
            log(f"out of memory during {stage} with {plan.describe(stage)}; retrying with smaller plans, starting "
                f"with {smaller.describe(stage)}")
            logged = True
        plan = smaller
