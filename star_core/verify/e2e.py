"""Verify group ``e2e``: the official ``VideoToVideo_sr.test()`` path end to end (``e2e_tiny*``).

Runs the star_core pipeline stages — official preprocessing, bilinear upscale, official padding, VAE encode with
the recorded posterior noise, diffuse with the recorded start noise, fast sampling with CFG rescale and the
torchsde Brownian tree from the recorded entropy, windowed decode, crop, AdaIN — on the tiny UNet, VAE and text
encoder of the fixture directory, and compares every stored tensor it reproduces. Every setting (sizes, upscale,
chunking, prompts, seeds, decode window) comes from ``<stem>_info.json``.

The one non-official step is the fixture's text width adapter: the tiny text tower's embedding is tiled along
channels up to the UNet's context width (fixtures README, "Text width adapter"). The VAE encoder runs in float64
(see ``ENCODER_DTYPE``).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..checkpoint import load_star_model
from ..diffusion.chunking import plan_chunks
from ..diffusion.noise import BrownianTreeNoiseSampler
from ..diffusion.schedule import diffuse, discretized_timesteps, k_sigmas
from ..diffusion.star_sampling import SamplerSettings
from ..model import STARConfig, config_from_state_dict
from ..frames import to_uint8
from ..pipeline import (
    colour_fix, decode_pixels, encode_lr, encode_prompts, frames_to_pixels, pixels_to_frames, prepare_lr, sample,
)
from ..seeds import RunNoise
from ..spec import DecodeSpec
from ..text import NEGATIVE_PROMPT, build_caption, fetch_openclip_vocab, load_text_encoder, openclip_text_options
from ..vae import load_svd_vae
from .report import Report

INFO_SUFFIX = "_info.json"
# Component files of the fixture set (same names in every set, fixtures README).
UNET_FILES = ("tiny_config.json", "tiny_state_dict.safetensors")
TEXT_FILES = ("text_openclip_tiny.safetensors", "text_openclip_tiny_config.json")
VAE_FILES = ("vae_tiny.safetensors", "vae_tiny_config.json")
# Tolerances of the issue: latents and [-1, 1] video; 0..255 output; truncated uint8 output.
TOL_LATENT, TOL_0_255, TOL_UINT8 = 1e-4, 1e-2, 1.0
# The VAE encoder's GroupNorms see mostly flat white padding (ill-conditioned statistics), so fp32 rounding
# differences between diffusers releases (fixtures: 0.30) reach 7.6e-5 on posterior_mean at 720x1280 — too close to
# the bound for unseen sets. In float64 the check lands within the official fp32 run's own rounding (2.5e-5 of the
# exact value). Users' runs keep the official fp32 encoder; decode stays fp32 here too (2e-6).
ENCODER_DTYPE = torch.float64
# The recorded posterior is itself one fp32 run, off the exact value by its own rounding, and the official code
# rerun on another thread count or machine lands farther still: on the shipped set the official code rerun on the
# verify machine lands 6.6e-5 (2 threads) … 1.16e-4 (1 thread) from the recorded posterior_std, past TOL_LATENT,
# while float64 lands 3.4e-5 … 3.6e-5 (tests/fixtures/official_posterior/README.md). How far one fp32 run lands
# from float64 (the "floor") moves ~3x with the process's thread setup alone (2.8e-5 … 8.6e-5 on that std), so
# a floor measured in one process under-reads the recording's. The posterior budget is therefore
# POSTERIOR_FLOOR_FACTOR (two fp32 roundings: the recording's and a rerun's) × the larger of the floor measured on
# the set's frames (our fp32 encoder, bit-equal to the official one at equal thread setup, at 1 thread and at the
# run's thread count) and the largest floor measured for the official code (POSTERIOR_MIN_FLOOR), at most
# POSTERIOR_TOL_MAX: 1.7e-4 on every set studied (five geometries, floors 2.0e-5 … 8.6e-5), which the official
# code's own reruns stay within (≤ 1.16e-4) and ours in float64 lands well inside (≤ 5.9e-5).
POSTERIOR_FLOOR_FACTOR, POSTERIOR_MIN_FLOOR, POSTERIOR_TOL_MAX = 2.0, 8.6e-5, 5e-4
# The only solver configuration STAR's test() uses.
OFFICIAL_SOLVER = {"solver": "dpmpp_2m_sde", "discretization": "trailing", "t_min": 0}


class _TiledWidth:
    """The fixture's text width adapter: ``embedding.repeat(1, 1, width // W)`` (a pure copy)."""

    def __init__(self, encoder, width: int) -> None:
        self.encoder = encoder
        self.tokenizer = encoder.tokenizer
        self.width = width

    def encode(self, texts: list[str]) -> torch.Tensor:
        emb = self.encoder.encode(texts)
        if self.width % emb.shape[-1]:
            raise ValueError(f"text width {emb.shape[-1]} does not divide the UNet context width {self.width}")
        return emb.repeat(1, 1, self.width // emb.shape[-1])


def _unet_config(fixture_dir: Path, sd: dict[str, torch.Tensor], files: list[str]) -> STARConfig:
    """Config inferred from the weights, with the head split (invisible in shapes) from the constructor args."""
    config = config_from_state_dict(sd)
    args = json.loads((fixture_dir / files[0]).read_text())["constructor_args"]
    return dataclasses.replace(config, num_heads=args["num_heads"], head_dim=args["head_dim"])


POSTERIOR_KEYS = ("posterior_mean", "posterior_std")


def fp32_posterior_floor(vae, pixels: torch.Tensor, exact: dict[str, torch.Tensor]
                         ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """
    How far the fp32 encoder lands from the float64 one on these frames: the rounding any fp32 run of the official
    encoder (the recording included) carries here. Measured at 1 thread and at the current thread count (other
    reduction orders, other rounding), the larger of the two.

    Parameters:
        vae: the fp32 `SVDVideoVAE`.
        pixels (`torch.Tensor`): ``[T,3,H,W]`` padded frames in [-1, 1].
        exact (`dict[str, torch.Tensor]`): ``posterior_mean`` and ``posterior_std`` of the float64 encoder.

    Returns:
        `tuple[dict[str, float], dict[str, torch.Tensor]]`: per key the floor (max|Δ|), and the fp32 posterior at
        the current thread count (what users' runs compute).
    """
    threads = torch.get_num_threads()
    floors = dict.fromkeys(POSTERIOR_KEYS, 0.0)
    production: dict[str, torch.Tensor] = {}
    for count in sorted({1, threads}, reverse=True):
        torch.set_num_threads(count)
        try:
            moments = dict(zip(POSTERIOR_KEYS, vae.posterior(pixels)))
        finally:
            torch.set_num_threads(threads)
        production = production or moments
        for key in POSTERIOR_KEYS:
            floors[key] = max(floors[key], (moments[key].double() - exact[key].double()).abs().max().item())
    return floors, production


def check_posterior(report: Report, stem: str, data: dict[str, torch.Tensor], vae, encoder,
                    pixels: torch.Tensor) -> None:
    """
    The recorded ``posterior_mean`` / ``posterior_std`` against the float64 encoder, and against the fp32 one users
    run, within the budget measured on these frames (`fp32_posterior_floor`, `posterior_budget`).

    Parameters:
        report (`Report`): where the lines go.
        stem (`str`): the set's name, for the lines.
        data (`dict[str, torch.Tensor]`): the recorded tensors (keys absent from it are not checked).
        vae, encoder: the fp32 and the float64 `SVDVideoVAE`.
        pixels (`torch.Tensor`): ``[T,3,H,W]`` padded frames in [-1, 1].
    """
    keys = [key for key in POSTERIOR_KEYS if key in data]
    if not keys:
        return
    exact = dict(zip(POSTERIOR_KEYS, encoder.posterior(pixels)))
    floors, production = fp32_posterior_floor(vae, pixels, exact)
    for key in keys:
        tol = posterior_budget(floors[key])
        print(f"      {stem}/{key}: our fp32 encoder lands {floors[key]:.2e} from float64 on these frames "
              f"(threads: {' and '.join(map(str, sorted({1, torch.get_num_threads()})))}): budget {tol:.1e}",
              flush=True)
        if POSTERIOR_FLOOR_FACTOR * floors[key] > POSTERIOR_TOL_MAX:
            report.fail(f"{stem}/{key} fp32 floor", f"our fp32 encoder lands {floors[key]:.2e} from float64, more "
                        f"than any fp32 rounding measured: the fp32 path is wrong or the set cannot be checked at "
                        f"fp32 precision")
        report.compare(f"{stem}/{key}", exact[key], data[key], tol)
        report.compare(f"{stem}/{key} (fp32, as users run it)", production[key], data[key], tol)


def posterior_budget(floor: float) -> float:
    """The posterior tolerance for a set whose measured fp32 floor is ``floor`` (see POSTERIOR_FLOOR_FACTOR)."""
    return min(POSTERIOR_FLOOR_FACTOR * max(floor, POSTERIOR_MIN_FLOOR), POSTERIOR_TOL_MAX)


def _settings(info: dict, report: Report, stem: str) -> SamplerSettings | None:
    kwargs = info["sample_sr_kwargs"]
    unsupported = {k: kwargs.get(k) for k, v in OFFICIAL_SOLVER.items() if kwargs.get(k, v) != v}
    if unsupported:
        report.fail(f"{stem}/sample_sr_kwargs", f"unsupported official arguments {unsupported}")
        return None
    return SamplerSettings(mode=kwargs["solver_mode"], steps=kwargs["steps"], cfg=kwargs["guide_scale"],
                           rescale=kwargs["guide_rescale"], t_max=kwargs["t_max"], chunk_len=info["max_chunk_len"],
                           fusion="official")


def _check_set(fixture_dir: Path, data_path: Path, info: dict, report: Report) -> None:
    stem = data_path.stem
    data = load_file(str(data_path))

    def check(key: str, actual: torch.Tensor, tol: float = TOL_LATENT) -> None:
        if key in data:
            report.compare(f"{stem}/{key}", actual, data[key], tol)

    unet_files = info.get("unet", {}).get("fixture_files", list(UNET_FILES))
    missing = [n for n in (*unet_files, *TEXT_FILES, *VAE_FILES) if not (fixture_dir / n).is_file()]
    if missing:
        report.fail(stem, f"component files {missing} missing beside {data_path.name}")
        return
    settings = _settings(info, report, stem)
    if settings is None:
        return

    # LR frames and geometry (inference_sr.py preprocess; test() interpolate + pad_to_fit).
    lr = data["lr_frames_uint8_rgb"].to(torch.float32) / 255
    check("lr_frames", frames_to_pixels(lr))
    pixels, geometry = prepare_lr(lr, scale=info["upscale"], padding="official")
    report.equal(f"{stem}/target_res", list(geometry.target_size), list(info["target_res"]))
    report.equal(f"{stem}/pad_to_fit", list(geometry.padding), list(info["pad_to_fit"]))
    plan = plan_chunks(geometry.frames, settings.chunk_len, fusion="official")
    report.equal(f"{stem}/chunk_inds", [list(w) for w in plan.spans] if len(plan.spans) > 1 else None,
                 info["chunk_inds"])

    # Seeds: RunNoise(global seed) draws the recorded CPU noises in the official order.
    seeded = RunNoise(info["global_seed"])
    latent_shape = (4, *geometry.latent_size)
    check("posterior_eps", seeded.posterior_eps_window(0, geometry.frames, latent_shape))
    check("diffuse_eps", seeded.diffuse_eps((1, *latent_shape[:1], geometry.frames, *latent_shape[1:])))
    entropy = int(data["brownian_tree_entropy_seed"].item())
    report.equal(f"{stem}/brownian_tree_entropy_seed", seeded.brownian(), entropy)

    # Text: official caption and negative prompt through the tiny tower + width adapter.
    text_config = json.loads((fixture_dir / TEXT_FILES[1]).read_text())
    text = load_text_encoder(fixture_dir / TEXT_FILES[0], tokenizer=fetch_openclip_vocab(),
                             **openclip_text_options(text_config))
    report.equal(f"{stem}/caption", build_caption(info["prompt"]), info["caption"])
    report.equal(f"{stem}/negative_prompt", NEGATIVE_PROMPT, info["negative_prompt"])
    raw = text.encode([info["caption"], info["negative_prompt"]])
    check("text_emb_caption", raw[0:1])
    check("text_emb_negative", raw[1:2])
    sd = load_file(str(fixture_dir / unet_files[1]))
    config = _unet_config(fixture_dir, sd, unet_files)
    positive, negative = encode_prompts(_TiledWidth(text, config.context_dim), info["prompt"],
                                        negative_prompt=info["negative_prompt"])
    check("y", positive)
    check("negative_y", negative)
    del text

    # VAE encode with the recorded posterior noise (encoder in float64, see ENCODER_DTYPE; budget POSTERIOR_*).
    vae = load_svd_vae(fixture_dir / VAE_FILES[0], config=fixture_dir / VAE_FILES[1])
    encoder = load_svd_vae(fixture_dir / VAE_FILES[0], config=fixture_dir / VAE_FILES[1], dtype=ENCODER_DTYPE)
    check_posterior(report, stem, data, vae, encoder, pixels)
    noise = RunNoise(posterior_eps=data["posterior_eps"], diffuse_eps=data["diffuse_eps"], brownian=entropy)
    feature = encode_lr(encoder, pixels, geometry, noise)
    del pixels, encoder
    check("video_data_feature", feature)
    check("noised_lr", diffuse(feature, int(info["diffuse_t"][0]), data["diffuse_eps"]))
    sigmas = k_sigmas(discretized_timesteps(settings.mode, settings.steps, settings.t_max))
    positive_sigmas = sigmas[sigmas > 0]
    bounds = [positive_sigmas.min().item(), positive_sigmas.max().item()]
    report.compare(f"{stem}/brownian_tree_bounds", torch.tensor(bounds), torch.tensor(info["brownian_tree_bounds"]),
                   1e-6)
    tree = BrownianTreeNoiseSampler(feature, positive_sigmas.min(), positive_sigmas.max(), entropy)
    for step in range(len(sigmas) - 2):
        key = f"brownian_noise_step{step:02d}"
        if key in data:
            check(key, tree(sigmas[step], sigmas[step + 1]))

    # Sampling on the tiny UNet (fp32, as the CPU fixture run).
    model = load_star_model(sd, dtype=torch.float32, config=config)
    del sd
    final = sample(model, feature, positive, negative, settings, noise)
    del model
    check("final_latent", final)

    # Decode in the official windows, crop, tensor2vid, AdaIN against the LR frames, uint8 truncation.
    window = DecodeSpec(window=int(info["vae_decode_chunk_size"]), window_overlap=0)
    decoded = torch.cat(list(decode_pixels(vae, final, geometry, window)))
    check("video_decoded", decoded.transpose(0, 1).unsqueeze(0))
    restored = colour_fix(pixels_to_frames(decoded), lr, "adain")
    check("output_float", restored * 255, TOL_0_255)
    check("output_uint8", to_uint8(restored), TOL_UINT8)


def run(fixture_dir: Path, report: Report) -> bool:
    """
    Reproduces every `e2e_tiny*.safetensors` set that has its `<stem>_info.json` in `fixture_dir`.

    Parameters:
        fixture_dir (`Path`): a fixture directory.
        report (`Report`): where the lines go.

    Returns:
        `bool`: False when the directory holds no end-to-end set.
    """
    fixture_dir = Path(fixture_dir)
    found = False
    for data_path in sorted(fixture_dir.glob("e2e_tiny*.safetensors")):
        info_path = data_path.with_name(data_path.stem + INFO_SUFFIX)
        if not info_path.is_file():
            continue
        found = True
        with torch.inference_mode():
            _check_set(fixture_dir, data_path, json.loads(info_path.read_text()), report)
    return found
