"""STAR Text Encode: a core CLIP (SD 2.x CLIP-H) + prompt → STAR's positive and negative conditioning."""
from __future__ import annotations

from comfy_api.latest import io

from star_core.text.prompts import SUFFIX_MODES, build_caption
from star_core.spec import default

from . import host


class STARTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="STARTextEncode",
            display_name="STAR Text Encode",
            category=host.CATEGORY,
            description="Builds STAR's caption (prompt + the official quality suffix) and its negative prompt and "
                        "encodes both with an SD 2.x CLIP-H text encoder (penultimate layer, 77 tokens).",
            inputs=[
                io.Clip.Input("clip", tooltip="SD 2.x CLIP-H text encoder (Load CLIP type stable_diffusion, or the "
                                              "CLIP of any SD 2.x checkpoint)."),
                io.String.Input("prompt", default=default("prompt.prompt"), multiline=True,
                                tooltip="What the video shows; the official default is 'a good video'."),
                io.Combo.Input("suffix", options=list(SUFFIX_MODES), default=default("prompt.suffix"),
                               tooltip="official: the quality suffix is appended with no separator, as in STAR "
                                       "(a long prompt pushes its end past 77 tokens). protected: a long prompt is "
                                       "shortened so the whole suffix fits. none: the prompt alone."),
                io.String.Input("negative_prompt", default=default("prompt.negative_prompt"), multiline=True,
                                tooltip="Negative prompt for classifier-free guidance (official default shown)."),
            ],
            outputs=[io.Conditioning.Output(display_name="positive"),
                     io.Conditioning.Output(display_name="negative")],
        )

    @classmethod
    def execute(cls, clip, prompt: str, suffix: str, negative_prompt: str) -> io.NodeOutput:
        return io.NodeOutput(*conditioning(clip, prompt, suffix, negative_prompt, "STAR Text Encode"))


def conditioning(clip, prompt: str, suffix: str, negative_prompt: str, node: str) -> tuple[list, list]:
    """STAR's positive (caption = prompt + suffix) and negative CONDITIONING from a core CLIP."""
    if clip is None:
        raise ValueError(f"{node}: clip is empty; the checkpoint has no text encoder, load one with Load CLIP "
                         "(type stable_diffusion)")
    tokenizer = host.clip_tokenizer(clip) if suffix == "protected" else None
    caption = build_caption(prompt, suffix=suffix, tokenizer=tokenizer)
    return host.encode_text(clip, caption), host.encode_text(clip, negative_prompt)
