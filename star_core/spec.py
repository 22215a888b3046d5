"""The run specification: every option of a STAR run, its default, help and valid range, in one place.

:class:`RunSpec` is frozen and validated on creation; its dataclass defaults are the official ``inference_sr.py``
settings except where a field's help says otherwise, and they are the single source of truth: the command line's
argparse defaults and the ComfyUI node-schema defaults are read from it (``tests/test_spec.py`` walks both and
fails on any difference). Build one with :meth:`RunSpec.with_options` from dotted names::

    spec = RunSpec().with_options({"sampler.cfg": 5.0, "output.scale": 2.0, "seed": 1})
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .colour import COLOUR_METHODS
from .diffusion.star_sampling import SamplerSettings
from .geometry import PADDING_MODES
from .options import AUTO, OptionInfo, Section, SpecError, option
from .text.prompts import DEFAULT_PROMPT, NEGATIVE_PROMPT, SUFFIX_MODES
from .vae.base import OFFICIAL_WINDOW, TILING_MODES, validate_tile

OFFICIAL_SEED = 666
# The official fast mode always runs this many steps (inference_sr.py forces --steps 15 with solver_mode fast).
FAST_MODE_STEPS = 15
MAX_SIZE = 16384  # pixels per side of an output; far beyond any GPU today
TILE_HELP = ("Spatial VAE {what} tile in pixels (multiple of 8); none = whole frames (official); auto = whole frames "
             "when they fit the memory budget, else the largest tile that does. Smaller tiles need less memory.")
TILE_MODE_HELP = ("exact: the tiles give the untiled VAE's result (up to float rounding; whole-frame normalisation "
                  "and attention). fast: independent overlapping tiles blended over the overlap (less memory traffic, "
                  "visibly different on non-uniform content).")
OVERLAP_HELP = "Overlap of neighbouring VAE tiles in pixels (multiple of 8); fast tiles only (exact tiles need none)."


@dataclass(frozen=True)
class OutputSpec(Section):
    """
    Output size and the padding the network sees.

    Parameters:
        scale (`float`): upscale factor (official 4); ignored when ``target`` is set.
        target (`tuple[int, int]`, *optional*): exact output (height, width) instead of ``scale``.
        padding (`str`): ``"official"`` (pad to ≥ 720x1280 with white) or ``"minimal"``.
    """

    PREFIX = "output"

    scale: float = option(4.0, "Upscale factor (official 4). Ignored when a target size is given.",
                          minimum=1.0, maximum=8.0, step=0.25)
    target: tuple[int, int] | None = option(None, "Exact output size (height, width) instead of the scale.",
                                            kind=tuple)
    padding: str = option("official", "official: pad every frame to at least 720x1280 with white, as STAR does "
                          "(results match the reference). minimal: pad only what the network needs (much less "
                          "memory and time for small outputs).", choices=PADDING_MODES)

    def check(self) -> None:
        if self.target is not None:
            if len(self.target) != 2 or any(not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_SIZE
                                            for v in self.target):
                raise SpecError(self.path("target"), f"must be two integers (height, width) in [1, {MAX_SIZE}], "
                                f"got {self.target!r}")

    @property
    def scale_or_none(self) -> float | None:
        """The scale when no target size overrides it."""
        return None if self.target is not None else self.scale


@dataclass(frozen=True)
class PromptSpec(Section):
    """
    The text conditioning.

    Parameters:
        prompt (`str`): what the video shows (official ``"a good video"``).
        suffix (`str`): ``"official"``, ``"protected"`` or ``"none"`` (see :func:`star_core.text.build_caption`).
        negative_prompt (`str`): the negative prompt (official default).
    """

    PREFIX = "prompt"

    prompt: str = option(DEFAULT_PROMPT, "What the video shows; the official default is 'a good video'.")
    suffix: str = option("official", "official: the quality suffix is appended with no separator, as in STAR (a "
                         "long prompt pushes its end past 77 tokens). protected: a long prompt is shortened so the "
                         "whole suffix fits. none: the prompt alone.", choices=SUFFIX_MODES)
    negative_prompt: str = option(NEGATIVE_PROMPT, "Negative prompt for classifier-free guidance (official default).")


@dataclass(frozen=True)
class EncodeSpec(Section):
    """
    The VAE encode of the upscaled, padded LR frames.

    Parameters:
        posterior (`str`): ``"sample"`` (official, uses the seed) or ``"mean"``.
        tile (`int` or ``"auto"``, *optional*): spatial tile in pixels; None encodes whole frames (official); auto
            (default) chooses for the memory budget (`star_core.autosize`).
        tile_overlap (`int`): overlap of neighbouring tiles in pixels (``"fast"`` tiles only).
        tile_mode (`str`): ``"exact"`` (equals untiled) or ``"fast"`` (see `star_core.vae.base.SpatialTiling`).
    """

    PREFIX = "encode"

    posterior: str = option("sample", "sample: the official VAE posterior sample (uses the seed). mean: the "
                            "posterior mean (no randomness).", choices=("sample", "mean"))
    tile: int | None = option(AUTO, TILE_HELP.format(what="encode"), minimum=8, maximum=MAX_SIZE, step=8, kind=int,
                              optional=True)
    tile_overlap: int = option(64, OVERLAP_HELP, minimum=0, maximum=MAX_SIZE, step=8)
    tile_mode: str = option("exact", TILE_MODE_HELP, choices=TILING_MODES)

    def check(self) -> None:
        _check_tile(self)


@dataclass(frozen=True)
class DecodeSpec(Section):
    """
    How the VAE decodes the sampled latent.

    Parameters:
        window (`int` or ``"auto"``): frames per temporal-decoder call (official 3; auto chooses for the budget).
        window_overlap (`int`): frames shared by neighbouring windows, cross-faded (official 0 = hard cuts).
        tile (`int` or ``"auto"``, *optional*): spatial tile edge in output pixels (None: whole frames, official;
            auto, the default, chooses for the memory budget).
        tile_overlap (`int`): spatial tile overlap in pixels (``"fast"`` tiles only).
        tile_mode (`str`): ``"exact"`` (equals untiled) or ``"fast"`` (see `star_core.vae.base.SpatialTiling`).
    """

    PREFIX = "decode"

    window: int = option(AUTO, "Frames per temporal-decoder call (official 3); auto: 3, or fewer when 3 do not "
                         "fit the memory budget.", minimum=1, maximum=256, kind=int)
    window_overlap: int = option(0, "Frames shared by neighbouring decoder windows, cross-faded (official 0).",
                                 minimum=0, maximum=255)
    tile: int | None = option(AUTO, TILE_HELP.format(what="decode"), minimum=8, maximum=MAX_SIZE, step=8, kind=int,
                              optional=True)
    tile_overlap: int = option(64, OVERLAP_HELP, minimum=0, maximum=MAX_SIZE, step=8)
    tile_mode: str = option("exact", TILE_MODE_HELP, choices=TILING_MODES)

    def check(self) -> None:
        window = OFFICIAL_WINDOW if self.window == AUTO else self.window  # auto chooses at most the official 3
        if self.window_overlap >= window:
            raise SpecError(self.path("window_overlap"), f"({self.window_overlap}) must be smaller than the "
                            f"decoder window ({window if self.window != AUTO else f'auto: at most {window}'})")
        _check_tile(self)


@dataclass(frozen=True)
class ColourSpec(Section):
    """
    Colour correction of the restored frames against the LR frames.

    Parameters:
        method (`str`): ``"adain"`` (official), ``"wavelet"`` or ``"none"``.
        strength (`float`): 1 = fully restored, 0 = the bilinear-upscaled source.
    """

    PREFIX = "colour"

    method: str = option("adain", "adain: per-frame mean/std matching (official). wavelet: keeps the restored "
                         "detail, takes low frequencies from the LR frames. none: no change.",
                         choices=COLOUR_METHODS)
    strength: float = option(1.0, "1 = the colour-fixed restored frames; 0 = the bilinear-upscaled LR frames; "
                             "values between blend (tones down over-sharpened or invented detail).",
                             minimum=0.0, maximum=1.0, step=0.05)


def _check_tile(section: EncodeSpec | DecodeSpec) -> None:
    """The VAE tile of a section; its overlap matters (and is checked) only for fast tiles."""
    if section.tile is None or section.tile == AUTO:
        return
    try:
        validate_tile("tile", section.tile, section.tile_overlap if section.tile_mode == "fast" else 0)
    except ValueError as exc:
        raise SpecError(section.path("tile"), str(exc).removeprefix("tile ")) from None


@dataclass(frozen=True)
class RunSpec(Section):
    """
    Everything that decides a STAR run's output (the models aside).

    Parameters:
        output (`OutputSpec`), prompt (`PromptSpec`), encode (`EncodeSpec`), sampler
        (`star_core.diffusion.SamplerSettings`), decode (`DecodeSpec`), colour (`ColourSpec`): the sections. The
            sizing options (chunk length, diffusion tile, VAE tiles, decode window) default to ``"auto"``: the
            official values when they fit the host's memory budget, else the largest that fit
            (`star_core.autosize`). ``SamplerSettings`` used on its own keeps the official values as defaults.
        seed (`int`): seed of every random draw of the run (official 666), see :class:`star_core.seeds.RunNoise`.
    """

    output: OutputSpec = field(default_factory=OutputSpec)
    prompt: PromptSpec = field(default_factory=PromptSpec)
    encode: EncodeSpec = field(default_factory=EncodeSpec)
    sampler: SamplerSettings = field(default_factory=lambda: SamplerSettings(chunk_len=AUTO, tile=AUTO))
    decode: DecodeSpec = field(default_factory=DecodeSpec)
    colour: ColourSpec = field(default_factory=ColourSpec)
    seed: int = option(OFFICIAL_SEED, "Seed of every random draw of the run: VAE posterior noise, start noise and "
                       "SDE noise (official 666). The same seed gives the same video on every device.",
                       minimum=0, maximum=2**64 - 1)

    def check(self) -> None:
        if self.sampler.mode == "fast" and self.sampler.steps != FAST_MODE_STEPS:
            raise SpecError("sampler.steps", f"({self.sampler.steps}) is only used by solver mode 'normal': 'fast' "
                            f"always runs the official {FAST_MODE_STEPS}-step schedule (14 model evaluations). "
                            f"Set steps to {FAST_MODE_STEPS} or choose solver mode normal")

    def with_options(self, options: Mapping[str, Any]) -> "RunSpec":
        """
        A copy with options replaced by dotted name (``"sampler.cfg"``, ``"seed"``); validated like a new spec.

        Parameters:
            options (`Mapping[str, Any]`): dotted names → values.
        """
        sections: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        for path, value in options.items():
            head, _, name = path.partition(".")
            if name:
                if head not in SECTIONS:
                    raise KeyError(f"unknown run option {path!r}")
                if name not in {f.name for f in dataclasses.fields(SECTIONS[head])}:
                    raise KeyError(f"unknown run option {path!r}")
                sections.setdefault(head, {})[name] = value
            else:
                if head not in {f.name for f in dataclasses.fields(RunSpec)}:
                    raise KeyError(f"unknown run option {path!r}")
                top[head] = value
        replaced = {head: dataclasses.replace(getattr(self, head), **values) for head, values in sections.items()}
        return dataclasses.replace(self, **replaced, **top)

    def get(self, path: str) -> Any:
        """The value of a dotted option name."""
        head, _, name = path.partition(".")
        return getattr(getattr(self, head), name) if name else getattr(self, head)


SECTIONS: dict[str, type] = {"output": OutputSpec, "prompt": PromptSpec, "encode": EncodeSpec,
                             "sampler": SamplerSettings, "decode": DecodeSpec, "colour": ColourSpec}
DEFAULTS = RunSpec()


def option_info(path: str) -> OptionInfo:
    """The default-independent facts (help, range, choices) of a dotted option name."""
    head, _, name = path.partition(".")
    section = SECTIONS[head] if name else RunSpec
    for f in dataclasses.fields(section):
        if f.name == (name or head):
            return f.metadata["option"]
    raise KeyError(f"unknown run option {path!r}")


def default(path: str) -> Any:
    """The spec's default of a dotted option name: what every entry point shows as its default."""
    return DEFAULTS.get(path)
