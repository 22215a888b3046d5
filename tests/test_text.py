"""Text conditioning: tokenizer ids, suffix modes, both weight layouts, fixture parity, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from star_core.text import (
    NEGATIVE_PROMPT,
    POSITIVE_SUFFIX,
    ClipTokenizer,
    build_caption,
    fetch_openclip_vocab,
    fit_prompt_tokens,
    load_text_encoder,
    load_tokenizer,
)
from star_core.text.tokenizer import clean_text
from star_core.text.weights import TextTowerSpec, default_run_layers
from star_core.verify.report import Report
from star_core.verify.text import run as verify_text

EXTRA_TEXTS = [
    "A cat's toy -- 32k, it's RED & blue!  Multiple   spaces\tand\nnewlines",
    "Café naïve façade, 日本語 and an emoji 🙂 &amp; html",
    "<start_of_text> literal specials <end_of_text>",
    "",
]


@pytest.fixture(scope="session")
def tokenizer() -> ClipTokenizer:
    """open_clip's real vocab, downloaded once into the star_vsr cache (test fails, never skips, without it)."""
    try:
        return ClipTokenizer.from_openclip_vocab(fetch_openclip_vocab())
    except RuntimeError as exc:
        pytest.fail(f"open_clip's CLIP vocab could not be obtained for the tokenizer tests: {exc}")


@pytest.fixture(scope="session")
def hf_tokenizer_folder(tokenizer, tmp_path_factory) -> Path:
    """The same vocabulary written as a Hugging Face CLIPTokenizer folder (vocab.json + merges.txt)."""
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    names = {tokenizer.start_id: "<|startoftext|>", tokenizer.end_id: "<|endoftext|>"}
    vocab = {names.get(i, s): i for s, i in tokenizer.vocab.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = sorted(tokenizer.ranks, key=tokenizer.ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def helpers(fixtures_dir) -> dict:
    return json.loads((fixtures_dir / "pipeline_helpers.json").read_text())


# --- tokenizer ---------------------------------------------------------------------------------------------------

def test_prompt_strings_are_official(helpers):
    assert POSITIVE_SUFFIX == helpers["positive_prompt"]
    assert NEGATIVE_PROMPT == helpers["negative_prompt"]


def test_token_ids_equal_open_clip(tokenizer, helpers):
    expected = helpers["open_clip_tokens"]
    assert tokenizer(build_caption("a good video")).tolist() == [expected["a good video + positive_prompt"]]
    assert tokenizer(NEGATIVE_PROMPT).tolist() == [expected["negative_prompt"]]
    assert tokenizer("").tolist() == [expected["empty"]]


def test_token_ids_equal_text_fixture(tokenizer, fixtures_dir):
    config = json.loads((fixtures_dir / "text_openclip_tiny_config.json").read_text())
    outputs = load_file(str(fixtures_dir / "text_openclip_tiny_outputs.safetensors"))
    for name, prompt in config["prompts"].items():
        assert torch.equal(tokenizer(prompt["text"]), outputs[f"{name}.tokens"]), name
        assert len(tokenizer.encode(prompt["text"])) == prompt["bpe_tokens_without_sot_eot"]


def test_long_prompt_is_cut_to_77_ending_with_eot(tokenizer, fixtures_dir):
    long_text = json.loads((fixtures_dir / "text_openclip_tiny_config.json").read_text())["prompts"]["long"]["text"]
    ids = tokenizer(long_text)[0]
    assert ids.shape == (77,) and ids[-1].item() == 49407 and ids[0].item() == 49406 and (ids != 0).all()


def test_hf_folder_gives_identical_ids(tokenizer, hf_tokenizer_folder, helpers):
    hf = load_tokenizer(hf_tokenizer_folder)
    texts = [build_caption("a good video"), NEGATIVE_PROMPT, *EXTRA_TEXTS]
    assert (hf.start_id, hf.end_id) == (49406, 49407)
    assert torch.equal(hf(texts), tokenizer(texts))


def test_transformers_clip_tokenizer_agrees(tokenizer, hf_tokenizer_folder):
    from transformers import CLIPTokenizer

    reference = CLIPTokenizer.from_pretrained(str(hf_tokenizer_folder))
    for text in [build_caption("a good video"), NEGATIVE_PROMPT, EXTRA_TEXTS[0]]:
        assert reference(text)["input_ids"] == [49406, *tokenizer.encode(text), 49407]


@pytest.mark.parametrize(
    ("raw", "cleaned"),  # what open_clip's ftfy + html + whitespace + lower-case pass gives (checked with ftfy 6)
    [
        ("It\u2019s a \u201cquoted\u201d \u2018thing\u2019", "it's a \"quoted\" 'thing'"),
        ("\ufb01ne \ufb02ow", "fine flow"),
        ("\uff21\uff22\uff23\u3000\uff44\uff45\uff46\uff01", "abc def!"),
        ("\uff76\uff80\uff76\uff85 \uff76\uff9e", "\u30ab\u30bf\u30ab\u30ca \u30ac"),
        ("\x1b[31mred\x1b[0m", "red"),
        ("&amp;lt; &quot;", '< "'),
        ("e\u0301le\u0301phant\tx\r\n  Y ", "\u00e9l\u00e9phant x y"),
    ],
)
def test_clean_text_matches_open_clip_normalisation(raw, cleaned):
    assert clean_text(raw) == cleaned


def test_decode_round_trips_ids(tokenizer):
    ids = tokenizer.encode(EXTRA_TEXTS[0])
    assert tokenizer.encode(tokenizer.decode(ids)) == ids


# --- captions ----------------------------------------------------------------------------------------------------

def test_build_caption_modes_without_tokenizer():
    assert build_caption("a good video") == "a good video" + POSITIVE_SUFFIX
    assert build_caption("a cat", suffix="none") == "a cat"
    with pytest.raises(ValueError, match="needs the tokenizer"):
        build_caption("a cat", suffix="protected")
    with pytest.raises(ValueError, match="'always' is not one of"):
        build_caption("a cat", suffix="always")


def test_fit_prompt_tokens_leaves_room_for_the_suffix():
    assert fit_prompt_tokens(list(range(100)), [7] * 53) == list(range(22))
    assert fit_prompt_tokens([1, 2], [7] * 53) == [1, 2]
    with pytest.raises(ValueError, match="suffix alone needs 80"):
        fit_prompt_tokens([1], [7] * 78)


def test_protected_keeps_the_suffix_official_truncates_it(tokenizer, fixtures_dir):
    prompt = json.loads((fixtures_dir / "text_openclip_tiny_config.json").read_text())["prompts"]["long"]["user_prompt"]
    suffix_ids = tokenizer.encode(POSITIVE_SUFFIX)
    official = tokenizer(build_caption(prompt, "official"))[0].tolist()
    protected_caption = build_caption(prompt, "protected", tokenizer)
    body = tokenizer.encode(protected_caption)
    assert official[-1] == 49407 and official[-1 - len(suffix_ids):-1] != suffix_ids  # suffix cut off
    assert len(body) <= 75 and body[-len(suffix_ids):] == suffix_ids  # whole suffix inside the 77 positions
    assert protected_caption.endswith(" " + POSITIVE_SUFFIX)
    # The prompt keeps its first whole words: all that fit ("...along a wet", not the "cob" of "cobblestone").
    kept = body[: -len(suffix_ids)]
    assert kept == tokenizer.encode(prompt)[: len(kept)] and tokenizer.decode(kept).endswith("along a wet")
    assert len(kept) == 75 - len(suffix_ids) - 1
    # A prompt short enough for the official caption is left exactly as the official code builds it.
    assert build_caption("a good video", "protected", tokenizer) == build_caption("a good video", "official")


def test_protected_works_with_a_transformers_tokenizer(tokenizer, hf_tokenizer_folder, fixtures_dir):
    """A host's CLIP tokenizer (anything with encode/decode of BPE ids) can drive the protected mode."""
    from transformers import CLIPTokenizer

    class HostTokenizer:
        hf = CLIPTokenizer.from_pretrained(str(hf_tokenizer_folder))

        def encode(self, text: str) -> list[int]:
            return self.hf(text, add_special_tokens=False)["input_ids"]

        def decode(self, ids: list[int]) -> str:
            return self.hf.decode(ids)

    prompt = json.loads((fixtures_dir / "text_openclip_tiny_config.json").read_text())["prompts"]["long"]["user_prompt"]
    caption = build_caption(prompt, "protected", HostTokenizer())
    body = tokenizer.encode(caption)
    suffix_ids = tokenizer.encode(POSITIVE_SUFFIX)
    assert len(body) <= 75 and body[-len(suffix_ids):] == suffix_ids
    assert body[: -len(suffix_ids)] == tokenizer.encode(prompt)[: len(body) - len(suffix_ids)]


# --- encoder: both weight layouts --------------------------------------------------------------------------------

WIDTH, HEADS, LAYERS = 64, 4, 3  # heads != width/64, so the loaders must take it from the config or argument


@pytest.fixture(scope="module")
def reference_model():
    """A tiny random transformers CLIPTextModel (every parameter drawn, so no layer is an identity)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=49408, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                            num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=77,
                            hidden_act="gelu", layer_norm_eps=1e-5)
    model = CLIPTextModel._from_config(config, attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(("layer_norm" in name) + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def _hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Canonical (prefix-free) HF keys, whichever transformers version built the model."""
    return {k.removeprefix("text_model."): v.contiguous() for k, v in model.state_dict().items()
            if not k.endswith("position_ids")}


def _to_openclip(hf: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The same weights in open_clip's layout (fused q/k/v), with the unused CLIP extras open_clip files hold."""
    g = torch.Generator().manual_seed(6)
    out = {
        "token_embedding.weight": hf["embeddings.token_embedding.weight"],
        "positional_embedding": hf["embeddings.position_embedding.weight"],
        "ln_final.weight": hf["final_layer_norm.weight"],
        "ln_final.bias": hf["final_layer_norm.bias"],
        "text_projection": torch.randn(WIDTH, 32, generator=g),
        "logit_scale": torch.tensor(4.6052),
        "visual.conv1.weight": torch.randn(32, 3, 16, 16, generator=g),
        "visual.transformer.resblocks.0.attn.in_proj_weight": torch.randn(96, 32, generator=g),
    }
    for i in range(LAYERS):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([hf[f"{src}self_attn.{n}_proj.{kind}"] for n in "qkv"])
            out[f"{dst}attn.out_proj.{kind}"] = hf[f"{src}self_attn.out_proj.{kind}"]
            out[f"{dst}ln_1.{kind}"] = hf[f"{src}layer_norm1.{kind}"]
            out[f"{dst}ln_2.{kind}"] = hf[f"{src}layer_norm2.{kind}"]
            out[f"{dst}mlp.c_fc.{kind}"] = hf[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.c_proj.{kind}"] = hf[f"{src}mlp.fc2.{kind}"]
    return {prefix + k: v for k, v in out.items()}


@pytest.fixture(scope="module")
def token_ids() -> torch.Tensor:
    ids = torch.zeros(2, 77, dtype=torch.long)
    ids[0, :6] = torch.tensor([49406, 320, 886, 1334, 267, 49407])
    ids[1, :] = torch.randint(1, 49406, (77,), generator=torch.Generator().manual_seed(3))
    ids[1, 0], ids[1, -1] = 49406, 49407
    return ids


@pytest.fixture(scope="module")
def star_reference(reference_model, token_ids) -> torch.Tensor:
    """STAR's context by definition: final_layer_norm(hidden_states[-2]) of the full tower."""
    with torch.no_grad():
        hidden = reference_model(input_ids=token_ids, output_hidden_states=True).hidden_states
        return getattr(reference_model, "text_model", reference_model).final_layer_norm(hidden[-2])


def test_open_clip_layout_equals_penultimate_reference(reference_model, star_reference, token_ids, tmp_path):
    path = tmp_path / "open_clip_text.safetensors"
    save_file(_to_openclip(_hf_state_dict(reference_model)), str(path))
    encoder = load_text_encoder(path, heads=HEADS, tokenizer=None)
    assert encoder.model.config.num_hidden_layers == LAYERS - 1
    out = encoder.encode_ids(token_ids)
    assert out.shape == (2, 77, WIDTH) and out.dtype == torch.float32
    assert (out - star_reference).abs().max().item() < 1e-5


def test_hf_layouts_equal_open_clip_layout(reference_model, star_reference, token_ids, tmp_path):
    hf = _hf_state_dict(reference_model)
    oc_path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(_to_openclip(hf, prefix="cond_stage_model.model."), oc_path)  # SD 2.x checkpoint prefix, torch file
    prefixed_path = tmp_path / "clip_h.safetensors"  # transformers 4.x key names, ComfyUI-style outer prefix
    save_file({f"clip_h.transformer.text_model.{k}": v for k, v in hf.items()}, str(prefixed_path))
    folder = tmp_path / "hf_folder"
    reference_model.save_pretrained(folder)  # config.json (heads from here) + model.safetensors
    from_open_clip = load_text_encoder(oc_path, heads=HEADS).encode_ids(token_ids)
    from_file = load_text_encoder(prefixed_path, heads=HEADS).encode_ids(token_ids)
    from_folder = load_text_encoder(folder).encode_ids(token_ids)
    assert torch.equal(from_file, from_open_clip) and torch.equal(from_folder, from_open_clip)
    assert (from_folder - star_reference).abs().max().item() < 1e-5


def test_encode_texts_uses_the_tokenizer(reference_model, tokenizer, tmp_path):
    folder = tmp_path / "with_tokenizer"
    reference_model.save_pretrained(folder)
    encoder = load_text_encoder(folder, tokenizer=tokenizer)
    texts = [build_caption("a good video"), NEGATIVE_PROMPT]
    assert torch.equal(encoder.encode(texts), encoder.encode_ids(tokenizer(texts)))


def test_sd2_text_encoder_file_runs_all_its_blocks():
    sd2 = TextTowerSpec(vocab_size=49408, width=1024, layers=23, heads=16, intermediate=4096, positions=77,
                        layout="hf")
    vit_h = TextTowerSpec(vocab_size=49408, width=1024, layers=24, heads=16, intermediate=4096, positions=77,
                          layout="open_clip")
    assert default_run_layers(sd2) == 23 and default_run_layers(vit_h) == 23
    assert default_run_layers(TextTowerSpec(49408, 1024, 24, 16, 4096, 77, "hf")) == 23


def test_fixture_text_group_passes(fixtures_dir, capsys):
    report = Report()
    assert verify_text(fixtures_dir, report) is True
    printed = capsys.readouterr().out
    assert report.failures == [], printed
    assert "PASS text_openclip_tiny_outputs/long.emb" in printed and "PASS text_openclip_tiny_outputs/long.tokens" in printed


# --- bad input ---------------------------------------------------------------------------------------------------

def test_missing_and_foreign_weights_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="text encoder .*nowhere.safetensors not found"):
        load_text_encoder(tmp_path / "nowhere.safetensors")
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 4)}, str(tmp_path / "unet.safetensors"))
    with pytest.raises(ValueError, match=r"unet\.safetensors holds no CLIP text tower: it looks like a "
                                         r"Stable-Diffusion-style checkpoint \(UNet, ldm layout\)"):
        load_text_encoder(tmp_path / "unet.safetensors")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(FileNotFoundError, match="no text encoder weights in"):
        load_text_encoder(tmp_path / "empty_folder")


class _RunsCode:
    def __reduce__(self):
        return (print, ("this would run at unpickling",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save({"token_embedding.weight": torch.zeros(2, 2), "payload": _RunsCode()}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        load_text_encoder(path)


def test_bad_heads_ids_and_missing_tokenizer(reference_model, tmp_path):
    path = tmp_path / "text.safetensors"
    save_file(_to_openclip(_hf_state_dict(reference_model)), str(path))
    with pytest.raises(ValueError, match="width 64 is not divisible by heads=3"):
        load_text_encoder(path, heads=3)
    partial = {k: v for k, v in _hf_state_dict(reference_model).items() if k != "final_layer_norm.bias"}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="not a complete CLIP text tower"):
        load_text_encoder(tmp_path / "partial.safetensors", heads=HEADS)
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(8, 64)}, str(tmp_path / "stub.safetensors"))
    with pytest.raises(ValueError, match="incomplete: missing"):
        load_text_encoder(tmp_path / "stub.safetensors")
    encoder = load_text_encoder(path, heads=HEADS)
    encoder.tokenizer = None
    with pytest.raises(ValueError, match="has no tokenizer"):
        encoder.encode(["a cat"])
    with pytest.raises(ValueError, match=r"must lie in \[0, 49408\)"):
        encoder.encode_ids(torch.full((1, 77), 50000))
    with pytest.raises(ValueError, match=r"integer tensor \[N, 77\]"):
        encoder.encode_ids(torch.zeros(1, 76, dtype=torch.long))


def test_bad_tokenizer_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer at"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="missing merges.txt"):
        ClipTokenizer.from_hf_folder(tmp_path)
    bad = tmp_path / "bpe.txt"
    bad.write_text("header\na b\n")
    with pytest.raises(ValueError, match="is not a CLIP BPE merges file"):
        ClipTokenizer.from_openclip_vocab(bad)


def test_vit_h_shapes_give_the_released_text_tower():
    """OpenCLIP ViT-H/14 key shapes (on the meta device, no memory): 1024 wide, 16 heads, 23 of 24 blocks run."""
    from star_core.text import build_text_model
    from star_core.text.weights import canonical_text_state_dict

    w = 1024
    shapes = {"token_embedding.weight": (49408, w), "positional_embedding": (77, w), "ln_final.weight": (w,),
              "ln_final.bias": (w,), "text_projection": (w, w), "logit_scale": (), "visual.proj": (1280, w)}
    for i in range(24):
        block = f"transformer.resblocks.{i}."
        shapes.update({block + "attn.in_proj_weight": (3 * w, w), block + "attn.in_proj_bias": (3 * w,),
                       block + "attn.out_proj.weight": (w, w), block + "attn.out_proj.bias": (w,),
                       block + "mlp.c_fc.weight": (4 * w, w), block + "mlp.c_fc.bias": (4 * w,),
                       block + "mlp.c_proj.weight": (w, 4 * w), block + "mlp.c_proj.bias": (w,)})
        shapes.update({block + f"{n}.{k}": (w,) for n in ("ln_1", "ln_2") for k in ("weight", "bias")})
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    text_sd, spec = canonical_text_state_dict(sd)
    assert (spec.width, spec.layers, spec.heads, spec.intermediate, spec.positions) == (1024, 24, 16, 4096, 77)
    model = build_text_model(text_sd, spec, default_run_layers(spec))
    assert (model.config.num_hidden_layers, model.config.num_attention_heads) == (23, 16)
    assert sum(p.numel() for p in model.parameters()) == 49408 * w + 77 * w + 2 * w + 23 * (12 * w * w + 13 * w)
