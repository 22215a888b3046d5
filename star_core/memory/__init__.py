"""Memory model and automatic sizing: estimate a run's peak device memory from its plan, choose the largest plan
that fits a budget, and retry a step with a smaller plan after an out-of-memory error.

* `PlanSizes` — the sizes that matter (video, chunk, diffusion tile, VAE tile/window, dtypes); `Components` —
  the resident models.
* `estimate_peak(plan, components) -> MemoryEstimate` — per-stage peaks (encode, sample, decode) with a breakdown.
* `choose_plan(budget, base, components, auto=...) -> PlanSizes` — the most preferred plan that fits; raises
  `NoPlanFits` naming the smallest plan and what it needs.
* `run_with_retry(step, plan, stage, ...)` — reruns a step with `shrink`-ed plans after out-of-memory errors.

The activation terms are fitted to FakeTensorMode measurements of the real modules (`calibrate`).
"""
from .activations import largest_slice
from .auto import (AUTO_FIELDS, STAGE_FIELDS, NoPlanFits, candidates, choose_plan, free_cached_memory,
                   is_out_of_memory, run_with_retry, shrink, tile_edge)
from .estimate import GIB, STAGES, MemoryEstimate, StagePeak, estimate_peak, stage_peak, unet_activation_bytes
from .plan import Components, PlanSizes, valid_tile_sizes

__all__ = [
    "AUTO_FIELDS", "Components", "GIB", "MemoryEstimate", "NoPlanFits", "PlanSizes", "STAGES", "STAGE_FIELDS",
    "StagePeak", "candidates", "choose_plan", "estimate_peak", "free_cached_memory", "is_out_of_memory",
    "largest_slice", "run_with_retry", "shrink", "stage_peak", "tile_edge", "unet_activation_bytes",
    "valid_tile_sizes",
]
