"""Memory model and automatic sizing: budgets, out-of-memory retries, the nothing-fits error, the estimate's shape,
the stored fit against a FakeTensorMode measurement of the tiny network, and the frame-sliced ResBlock."""
from __future__ import annotations

import importlib

import pytest
import torch

from star_core.memory import (GIB, STAGE_FIELDS, STAGES, Components, NoPlanFits, PlanSizes, candidates, choose_plan,
                              estimate_peak, is_out_of_memory, run_with_retry, shrink, stage_peak)
from star_core.memory.activations import unet_elements
from star_core.memory.auto import DEFAULT_MARGIN
from star_core.memory.estimate import unet_coefficients
from star_core.model import STARConfig
from star_core.model.resblock import ResBlock
from star_core.tiny_models import TINY_STAR

pytestmark = pytest.mark.usefixtures("one_thread")

# 1080x1920 output, official padding (1104x1984), 100 frames
BASE = PlanSizes(100, 138, 248)


def _sample(plan: PlanSizes) -> int:
    return stage_peak(plan, "sample").total


def _is_largest_fitting(plan: PlanSizes, budget: int) -> None:
    """In every stage the chosen plan fits, and every plan preferred to it does not."""
    usable = budget * (1 - DEFAULT_MARGIN)
    for stage in STAGES:
        # the stage's candidates start from the base plan's values of its fields (chunk 32, decode window 3)
        options = candidates(plan.replace(**{name: getattr(BASE, name) for name in STAGE_FIELDS[stage]}), stage)
        peaks = [stage_peak(p, stage).total for p in options]
        index = options.index(plan)
        assert peaks[index] <= usable
        assert all(peak > usable for peak in peaks[:index])


def test_smaller_budget_gives_smaller_plan():
    big, small = choose_plan(24 * GIB, BASE), choose_plan(8 * GIB, BASE)
    _is_largest_fitting(big, 24 * GIB)
    _is_largest_fitting(small, 8 * GIB)
    # 24 GiB runs the official denoiser plan; 8 GiB must give something up on both the denoiser and the VAE side.
    assert (big.chunk_len, big.tile, big.state_on_device) == (32, None, True)
    assert (small.tile is not None or small.chunk_len < big.chunk_len or not small.state_on_device)
    assert _sample(small) < _sample(big)
    assert estimate_peak(small).peak < 8 * GIB * (1 - DEFAULT_MARGIN) < estimate_peak(big).peak


def test_fixed_fields_are_kept():
    auto = ("tile", "state_on_device", "encode_tile", "encode_park", "decode_tile", "decode_park")
    plan = choose_plan(8 * GIB, BASE.replace(chunk_len=16), auto=auto)
    assert plan.chunk_len == 16 and plan.decode_window == 3
    assert estimate_peak(plan).peak <= 8 * GIB * (1 - DEFAULT_MARGIN)
    # with the chunk fixed at 32 the same budget needs diffusion tiles
    assert choose_plan(8 * GIB, BASE, auto=auto).tile is not None
    with pytest.raises(ValueError, match="cannot choose"):
        choose_plan(8 * GIB, BASE, auto=("frames",))


def test_injected_oom_is_retried_with_a_smaller_plan():
    class HostOOM(Exception):  # a host's own out-of-memory type (ComfyUI: model_management.OOM_EXCEPTION)
        pass

    limit = 7 * GIB
    tried, messages = [], []

    def step(plan: PlanSizes) -> str:
        tried.append(plan)
        if _sample(plan) > limit:
            raise (torch.OutOfMemoryError if len(tried) % 2 else HostOOM)("CUDA out of memory. Tried to allocate")
        return "done"

    start = choose_plan(24 * GIB, BASE)
    result, used = run_with_retry(step, start, "sample", oom_errors=(HostOOM,), log=messages.append,
                                  clear_cache=lambda: None)
    assert result == "done" and used == tried[-1] and len(tried) >= 3
    assert _sample(used) <= limit < _sample(start)
    assert all(_sample(b) < _sample(a) for a, b in zip(tried, tried[1:]))
    assert messages == [f"out of memory during sample with chunk 32, untiled; retrying with smaller plans, starting "
                        f"with {tried[1].describe('sample')}"]


def test_other_errors_are_not_retried():
    calls = []

    def step(plan: PlanSizes) -> None:
        calls.append(plan)
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        run_with_retry(step, BASE, "sample", clear_cache=lambda: None)
    assert len(calls) == 1
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_oom_with_nothing_smaller_names_the_plan():
    def step(plan: PlanSizes) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(NoPlanFits) as info:
        run_with_retry(step, BASE, "decode", clear_cache=lambda: None)
    error = info.value
    assert isinstance(error.__cause__, torch.OutOfMemoryError)
    assert error.plan.decode_tile == 256 and error.plan.decode_park == "host" and error.plan.decode_window == 1
    assert error.needed == stage_peak(error.plan, "decode").total
    assert str(error) == (f"out of memory (VAE decode) even with the smallest plan (decode tile 256 px parked on the "
                          f"host, 1-frame decode) needs {error.needed / GIB:.2f} GiB; free memory or lower the "
                          f"output size")


def test_nothing_fits_names_the_smallest_plan_and_its_need():
    with pytest.raises(NoPlanFits) as info:
        choose_plan(2 * GIB, BASE)
    error = info.value
    # what the run needs at least: over the stages, the largest of each stage's smallest need (with every model
    # resident, the VAE decode: the UNet's weights stay while the decoder works)
    smallest = {stage: min(stage_peak(p, stage).total for p in candidates(BASE, stage)) for stage in STAGES}
    assert error.needed == max(smallest.values()) == stage_peak(error.plan, error.stage).total > 2 * GIB
    assert error.stage == "decode"
    assert (error.plan.decode_tile, error.plan.decode_park, error.plan.decode_window) == (256, "host", 1)
    assert str(error) == (f"nothing fits in 2.00 GiB (VAE decode): the smallest plan (decode tile 256 px parked on "
                          f"the host, 1-frame decode) needs {error.needed / GIB:.2f} GiB; free memory or lower the "
                          f"output size")
    # a host that offloads: the VAE stages fit, the sampler does not
    offloading = Components(resident=False)
    with pytest.raises(NoPlanFits) as info:
        choose_plan(3 * GIB, BASE, offloading)
    error = info.value
    assert error.stage == "sample" and error.needed == stage_peak(error.plan, "sample", offloading).total > 3 * GIB
    assert (error.plan.chunk_len, error.plan.tile, error.plan.state_on_device) == (1, (26, 32), False)
    assert str(error) == (f"nothing fits in 3.00 GiB (sampling): the smallest plan (chunk 1, tile 26x32 latent, "
                          f"sampler state on the host) needs {error.needed / GIB:.2f} GiB; free memory or lower "
                          f"the output size")


def test_estimate_grows_with_every_size():
    def peak(**changes) -> int:
        return _sample(BASE.replace(**changes))

    assert peak(frames=50) < peak(frames=100) < peak(frames=200)
    assert peak(chunk_len=8) < peak(chunk_len=16) < peak(chunk_len=32)
    assert peak(tile=(34, 64)) < peak(tile=(66, 120)) < peak(tile=(98, 184)) < peak()
    assert peak(latent_h=90, latent_w=160) < peak() < peak(latent_h=274, latent_w=488)
    assert peak(batch_cfg=False) < peak(batch_cfg=True)
    assert peak(unet_dtype=torch.float16) < peak(unet_dtype=torch.float32)
    for stage in ("encode", "decode"):
        peaks = [stage_peak(BASE.replace(**{f"{stage}_tile": t}), stage).total for t in (256, 512, 1024, None)]
        assert peaks == sorted(peaks) and len(set(peaks)) == 4
    assert (stage_peak(BASE.replace(decode_tile=512, decode_park="host"), "decode").total
            < stage_peak(BASE.replace(decode_tile=512), "decode").total)
    assert peak(state_on_device=False) < peak()
    assert PlanSizes(8, 34, 64, tile=(34, 64)).tile is None  # one tile covering the latent is the untiled run


def test_plan_sizes_name_bad_values():
    with pytest.raises(ValueError, match="chunk_len must be a positive integer"):
        PlanSizes(10, 34, 64, chunk_len=0)
    with pytest.raises(ValueError, match="decode_tile must be None or a multiple of 8"):
        PlanSizes(10, 34, 64, decode_tile=100)
    with pytest.raises(ValueError, match="encode_park must be one of"):
        PlanSizes(10, 34, 64, encode_park="disk")
    with pytest.raises(ValueError, match="stage must be one of"):
        shrink(BASE, "train")


def test_tiny_network_measurement_matches_stored_fit():
    """Re-measures the fixtures' tiny network under FakeTensorMode: a model change that alters its memory behaviour
    (a tensor kept alive longer, a different slicing) makes the stored fit stale (python bench/memory.py calibrate)."""
    from star_core.memory.calibrate import measure_unet

    config = STARConfig(**TINY_STAR)
    for batch, frames, h, w in ((1, 1, 10, 16), (2, 8, 34, 64)):
        measured = measure_unet(config, batch, frames, h, w)
        predicted = 4 * unet_elements(unet_coefficients(config), config, batch, frames, h, w)
        assert abs(predicted - measured) <= 0.1 * measured, (batch, frames, h, w, measured, predicted)


def test_resblock_frame_slices_match_whole(monkeypatch):
    torch.manual_seed(0)
    block = ResBlock(64, 128, 32).eval()
    x, emb = torch.randn(6, 64, 12, 20), torch.randn(6, 128)
    with torch.inference_mode():
        whole = block(x, emb, 2)
        monkeypatch.setattr(importlib.import_module("star_core.model.slicing"), "SLICE_ELEMENTS", 2 * 64 * 12 * 20)
        sliced = block(x, emb, 2)  # two frames per slice: slices cross the two samples' frames
    assert (sliced - whole).abs().max().item() <= 1e-6 * whole.abs().max().item()


def test_components_from_loaded_models():
    from diffusers import AutoencoderKLTemporalDecoder

    from star_core.memory.estimate import vae_coefficients
    from star_core.model import STARUNet
    from star_core.tiny_models import TINY_VAE

    with torch.device("meta"):
        unet = STARUNet(STARConfig(**TINY_STAR), dtype=torch.float16)
        vae = AutoencoderKLTemporalDecoder(down_block_types=("DownEncoderBlock2D",) * 4, **TINY_VAE)
    components = Components.from_models(unet, vae, resident=False)
    assert components.unet_config == STARConfig(**TINY_STAR)
    assert components.unet_params == 9_001_992  # the fixture's num_params
    assert components.vae_params == sum(p.numel() for p in vae.parameters())
    narrow, svd = vae_coefficients(components.vae_widths), vae_coefficients((128, 256, 512, 512))
    assert narrow.decode_per_pixel < svd.decode_per_pixel
    plan = PlanSizes(8, 18, 32, unet_dtype=torch.float16)
    sample = dict(stage_peak(plan, "sample", components).parts)
    assert sample["UNet weights"] == 2 * 9_001_992 and sample["VAE weights"] == 0  # not resident: offloaded
