"""Widget groups several STAR nodes share (encode, seed, decode, colour), each with the spec's defaults, and the
`RunSpec` they stand for: one definition per option, whichever node shows it."""
from __future__ import annotations

from comfy_api.latest import io

from star_core.colour import COLOUR_METHODS
from star_core.geometry import PADDING_MODES
from star_core.options import AUTO
from star_core.spec import DEFAULTS, RunSpec, default

from . import host


def seed_input() -> io.Int.Input:
    """The run's one seed (with the frontend's randomize/fixed control)."""
    return io.Int.Input("seed", default=default("seed"), min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                        tooltip="The run's one seed (official: 666): the VAE posterior sample, then the start and "
                                "SDE noise of the sampler, which reads it from the latent. The same seed gives the "
                                "command line's result.")


def geometry_inputs() -> list:
    """Output size and padding."""
    return [
        io.Float.Input("scale", default=default("output.scale"), min=1.0, max=8.0, step=0.25,
                       tooltip="Upscale factor (official 4). Ignored when target width and height are set."),
        io.Int.Input("target_width", default=0, min=0, max=8192, step=2,
                     tooltip="Exact output width in pixels; 0 = use scale. Set both width and height."),
        io.Int.Input("target_height", default=0, min=0, max=8192, step=2,
                     tooltip="Exact output height in pixels; 0 = use scale. Set both width and height."),
        io.Combo.Input("padding", options=list(PADDING_MODES), default=default("output.padding"),
                       tooltip="official: pad to at least 720x1280 with white, as STAR does (results match the "
                               "reference). minimal: pad only what the network needs (much less memory and time "
                               "for small outputs)."),
    ]


def encode_inputs() -> list:
    """Posterior, the seed and the encoder's spatial tiles."""
    return [
        io.Combo.Input("posterior", options=["sample", "mean"], default=default("encode.posterior"),
                       tooltip="sample: the official VAE posterior sample (uses seed). mean: the posterior mean (no "
                               "randomness)."),
        seed_input(),
        io.Int.Input("tile", default=0, min=0, max=8192, step=8,
                     tooltip="Spatial encoder tile in pixels (multiple of 8); 0 = auto: whole frames (official) "
                             "when they fit ComfyUI's free memory, else the largest exact tile that does."),
        io.Int.Input("tile_overlap", default=default("encode.tile_overlap"), min=0, max=1024, step=8,
                     tooltip="Overlap of neighbouring encoder tiles in pixels (multiple of 8)."),
    ]


def decode_inputs() -> list:
    """The decoder's spatial tiles and temporal windows."""
    return [
        io.Int.Input("tile", default=0, min=0, max=8192, step=8,
                     tooltip="Spatial tile edge in output pixels (multiple of 8); 0 = auto: whole frames "
                             "(official) when they fit ComfyUI's free memory, else the largest exact tile that "
                             "does. Smaller tiles need less memory."),
        io.Int.Input("tile_overlap", default=default("decode.tile_overlap"), min=0, max=1024, step=8,
                     tooltip="Overlap of neighbouring tiles in pixels (multiple of 8), feather-blended."),
        io.Int.Input("temporal_window", default=0, min=0, max=256,
                     tooltip="Frames per temporal-decoder call (official 3); 0 = auto: 3, or fewer when 3 do not "
                             "fit ComfyUI's free memory."),
        io.Int.Input("temporal_overlap", default=default("decode.window_overlap"), min=0, max=255,
                     tooltip="Frames shared by neighbouring windows, blended (official 0)."),
    ]


def colour_inputs() -> list:
    """Colour correction against the LR frames."""
    return [
        io.Combo.Input("method", options=list(COLOUR_METHODS), default=default("colour.method"),
                       tooltip="adain: per-frame mean/std matching (official). wavelet: keeps the restored detail, "
                               "takes low frequencies from the LR frames. none: no change."),
        io.Float.Input("strength", default=default("colour.strength"), min=0.0, max=1.0, step=0.05,
                       tooltip="1 = the colour-fixed restored frames; 0 = the bilinear-upscaled LR frames; values "
                               "between blend (tones down over-sharpened or invented detail)."),
    ]


def target_of(target_width: int, target_height: int, node: str) -> tuple[int, int] | None:
    """(height, width) from the two widgets, None for 'use scale'."""
    if (target_width > 0) != (target_height > 0):
        raise ValueError(f"{node}: set both target_width and target_height, or leave both 0 to use scale")
    return (target_height, target_width) if target_width > 0 else None


def encode_spec(node: str, *, scale: float, target_width: int, target_height: int, padding: str, posterior: str,
                seed: int, tile: int, tile_overlap: int, spec: RunSpec = DEFAULTS) -> RunSpec:
    """The run spec of the geometry and encode widgets (0 = auto for tiles, 0 = off for targets); errors name
    `node`'s input."""
    target = target_of(target_width, target_height, node)
    with host.inputs_of(node):
        return spec.with_options({"output.scale": scale, "output.target": target, "output.padding": padding,
                                  "encode.posterior": posterior, "encode.tile": tile or AUTO,
                                  "encode.tile_overlap": tile_overlap, "seed": seed})


def decode_spec(node: str, *, tile: int, tile_overlap: int, temporal_window: int, temporal_overlap: int,
                method: str = default("colour.method"), strength: float = default("colour.strength"),
                spec: RunSpec = DEFAULTS) -> RunSpec:
    """The run spec of the decode (and colour) widgets (0 = auto for the tile and the window); errors name `node`'s
    input."""
    with host.inputs_of(node):
        return spec.with_options({"decode.tile": tile or AUTO, "decode.tile_overlap": tile_overlap,
                                  "decode.window": temporal_window or AUTO, "decode.window_overlap": temporal_overlap,
                                  "colour.method": method, "colour.strength": strength})
