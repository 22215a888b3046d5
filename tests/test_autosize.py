"""``auto`` sizes: the official plan when it fits (bit for bit), smaller plans for smaller budgets, out-of-memory
errors retried with smaller auto plans (logged once), and a clear error when nothing fits."""
from __future__ import annotations

import pytest
import torch

from star_core import autosize
from star_core.geometry import plan_geometry
from star_core.host import HostContext
from star_core.memory import GIB, NoPlanFits, stage_peak
from star_core.model.config import STARConfig
from star_core.pipeline import Components, decode_pixels, sample, upscale_video
from star_core.seeds import RunNoise
from star_core.spec import DEFAULTS

pytestmark = pytest.mark.usefixtures("one_thread")

OFFICIAL = {"sampler.chunk_len": 32, "sampler.tile": None, "encode.tile": None, "decode.tile": None,
            "decode.window": 3}


@pytest.fixture(scope="module")
def tiny_model(fixtures_dir):
    from star_core.checkpoint import load_star_model

    return load_star_model(fixtures_dir / "tiny_state_dict.safetensors", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_vae(fixtures_dir):
    from star_core.vae import load_svd_vae

    return load_svd_vae(fixtures_dir / "vae_tiny.safetensors", config=fixtures_dir / "vae_tiny_config.json")


def _contexts(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = model.config.context_dim
    return torch.randn(1, 77, width, generator=g), torch.randn(1, 77, width, generator=g)


def test_auto_is_the_official_plan_when_it_fits(tiny_model, tiny_vae):
    """No budget, or one that holds the official plan: the auto defaults give the official settings' frames."""
    assert {path: DEFAULTS.get(path) for path in OFFICIAL} == dict.fromkeys(OFFICIAL, "auto")
    parts = Components(tiny_model, tiny_vae, *_contexts(tiny_model))
    frames = torch.rand(5, 12, 10, 3, generator=torch.Generator().manual_seed(1))
    spec = DEFAULTS.with_options({"output.scale": 2.0, "output.padding": "minimal", "sampler.mode": "normal",
                                  "sampler.steps": 2})
    official = upscale_video(frames, spec.with_options(OFFICIAL), parts)
    assert torch.equal(upscale_video(frames, spec, parts), official)
    logs = []
    roomy = HostContext(memory_budget=64 * GIB, log=logs.append)
    assert torch.equal(upscale_video(frames, spec, parts, roomy), official)
    assert logs == []  # nothing to say when the official plan fits


def _full_size_model_fn():
    def model_fn(x, t, context, hint):  # never called: sizing only reads the architecture
        raise AssertionError("not called")

    model_fn.config, model_fn.dtype = STARConfig(), torch.float16  # the released network in fp16
    return model_fn


def test_smaller_budget_gives_smaller_plans():
    """Released network, 1080p x4-padded latent, 32 frames: the official plan at 80 GiB, then shorter chunks and
    diffusion tiles as the budget shrinks; the decoder gets exact tiles; user-set sizes never change."""
    model_fn = _full_size_model_fn()
    size = (32, 136, 240)  # 1088x1920 padded
    chosen = {}
    for budget in (80, 24, 12, 8):
        host = HostContext(memory_budget=budget * GIB, resident=False, log=lambda message: None)
        settings, sizing = autosize.sampler_sizing(DEFAULTS.sampler, size, model_fn, host)
        chosen[budget] = (settings.chunk_len, settings.tile, sizing.plan)
    assert chosen[80][:2] == (32, None)
    needs = [stage_peak(chosen[b][2], "sample", autosize.memory_components(model_fn, resident=False)).total
             for b in (80, 24, 12, 8)]
    assert needs == sorted(needs, reverse=True) and needs[-1] < needs[0]
    for budget in (24, 12, 8):
        assert needs[(80, 24, 12, 8).index(budget)] <= 0.9 * budget * GIB
    assert chosen[8][:2] != (32, None)
    fixed = DEFAULTS.sampler.__class__(chunk_len=16, tile="auto")
    settings, _ = autosize.sampler_sizing(fixed, size, model_fn,
                                          HostContext(memory_budget=8 * GIB, resident=False, log=lambda m: None))
    assert settings.chunk_len == 16

    geometry = plan_geometry(8, 540, 960, scale=4.0)  # 2160x3840 output
    decode_8, _ = autosize.vae_sizing("decode", DEFAULTS.decode, geometry, None,
                                      HostContext(memory_budget=8 * GIB, log=lambda m: None))
    decode_big, _ = autosize.vae_sizing("decode", DEFAULTS.decode, geometry, None,
                                        HostContext(memory_budget=512 * GIB, log=lambda m: None))
    assert (decode_big.tile, decode_big.window) == (None, 3)
    assert decode_8.tile is not None and decode_8.tile < 3840


def test_nothing_fits_names_the_smallest_plan():
    host = HostContext(memory_budget=2 * GIB, resident=False, log=lambda message: None)
    with pytest.raises(NoPlanFits) as info:
        autosize.sampler_sizing(DEFAULTS.sampler, (32, 136, 240), _full_size_model_fn(), host)
    error = info.value
    assert error.stage == "sample" and error.plan.chunk_len == 1 and error.needed > 2 * GIB
    assert str(error).startswith("nothing fits in 2.00 GiB (sampling): the smallest plan (chunk 1, tile ")
    assert str(error).endswith(f"needs {error.needed / GIB:.2f} GiB; free memory or lower the output size")


class _Hungry(torch.nn.Module):
    """The tiny network, out of memory for windows of more than ``limit`` latent frames."""

    def __init__(self, model, limit: int) -> None:
        super().__init__()
        self.model, self.limit, self.config, self.frames = model, limit, model.config, []

    def forward(self, x, t, context, hint):
        if x.shape[2] > self.limit:
            raise torch.OutOfMemoryError(f"injected: {x.shape[2]} frames")
        self.frames.append(x.shape[2])
        return self.model(x, t, context, hint)


def test_out_of_memory_in_sampling_retries_with_a_shorter_chunk(tiny_model):
    latent = torch.randn(1, 4, 6, 10, 8, generator=torch.Generator().manual_seed(2))
    positive, negative = _contexts(tiny_model, 3)
    settings = DEFAULTS.sampler.__class__(mode="normal", steps=2, chunk_len="auto", tile="auto")
    hungry, logs = _Hungry(tiny_model, 3), []
    out = sample(hungry, latent, positive, negative, settings, RunNoise(4), host=HostContext(log=logs.append))
    used = max(hungry.frames)
    assert used <= 3
    assert len(logs) == 1 and logs[0].startswith("out of memory during sample with chunk 6, untiled; retrying with")
    explicit = DEFAULTS.sampler.__class__(mode="normal", steps=2, chunk_len=used, tile=None)
    assert torch.equal(out, sample(tiny_model, latent, positive, negative, explicit, RunNoise(4)))
    # a chunk length the user set is never changed: the error propagates
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        sample(_Hungry(tiny_model, 3), latent, positive, negative,
               DEFAULTS.sampler.__class__(mode="normal", steps=2, chunk_len=6), RunNoise(4))


def test_out_of_memory_in_decode_retries_with_exact_tiles(tiny_vae):
    geometry = plan_geometry(2, 320, 320, scale=2.0, padding="minimal")  # 640x640 frames
    latent = torch.randn(1, 4, 2, *geometry.latent_size, generator=torch.Generator().manual_seed(5))
    whole = torch.cat(list(decode_pixels(tiny_vae, latent, geometry, DEFAULTS.decode.__class__(tile=None))))

    class OneTileOnly:
        """The tiny VAE, out of memory for whole frames."""

        def __getattr__(self, name):
            return getattr(tiny_vae, name)

        def decode(self, latent, window, overlap, *, tiling=None, callback=None):
            if tiling is None:
                raise torch.OutOfMemoryError("injected: whole frame")
            return tiny_vae.decode(latent, window, overlap, tiling=tiling, callback=callback)

    logs = []
    tiled = torch.cat(list(decode_pixels(OneTileOnly(), latent, geometry, DEFAULTS.decode,
                                         host=HostContext(log=logs.append))))
    assert (tiled - whole).abs().max().item() <= 1e-4  # exact tiles
    assert len(logs) == 1, logs
    assert logs[0].startswith("out of memory during decode with decode whole frames, 3-frame decode; retrying with "
                              "decode tile ") and logs[0].endswith(" px, 3-frame decode")
