"""ToonCrafter's OpenCLIP text/image encoders as transformers CLIP models.

Full-size ViT-H-14 towers are built on the meta device from the OpenCLIP key layout; numerics are
compared with ``open_clip`` itself on a tiny random model when open-clip-torch is installed, and the
image pre-processing with ``kornia`` when that is installed.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from layerkit_plugins.tooncrafter import encoders as enc

from layerkit.errors import LayerkitError, ShapeError


def _meta(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


@pytest.fixture(scope="module")
def tiny():
    return enc.tiny_encoders(seed=0)


# ----------------------------------------------------------------------------------------------
# full size (meta)
# ----------------------------------------------------------------------------------------------


def test_vit_h_text_encoder_full_size_from_openclip_layout():
    from transformers import CLIPTextModel

    full = enc.openclip_state_shapes(enc.VIT_H_14_TEXT, enc.VIT_H_14_VISION)
    cond_stage = {k: s for k, s in full.items() if not k.startswith("visual.")}  # cond_stage_model.model.*
    assert len(cond_stage) == 24 * 12 + 6
    config = enc.text_config(**enc.VIT_H_14_TEXT)
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (23, 1024, 4096)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    converted = enc.openclip_to_clip_text_state(_meta(cond_stage), model=model)
    assert converted.keys() == model.state_dict().keys()  # no missing, no unexpected
    model.load_state_dict(converted, strict=True, assign=True)
    # resblocks.23 (12 tensors), text_projection and logit_scale are the only keys left out
    assert len(cond_stage) - 12 - 2 == 23 * 12 + 4 and len(converted) == 23 * 16 + 4
    assert sum(v.numel() for v in converted.values()) == 340_387_840
    built = enc.text_encoder_from_openclip(_meta(cond_stage))
    assert built.config.num_hidden_layers == 23 and built.config.num_attention_heads == 16


def test_vit_h_image_encoder_full_size_from_openclip_layout():
    from transformers import CLIPVisionModel

    full = enc.openclip_state_shapes(enc.VIT_H_14_TEXT, enc.VIT_H_14_VISION)
    embedder = {k: s for k, s in full.items() if not k.startswith("transformer.")}  # embedder.model.*
    assert full["visual.positional_embedding"] == (257, 1280) and full["visual.conv1.weight"] == (1280, 3, 14, 14)
    config = enc.vision_config(**enc.VIT_H_14_VISION)
    with torch.device("meta"):
        model = CLIPVisionModel(config)
    converted = enc.openclip_to_clip_vision_state(_meta(embedder), model=model)
    assert converted.keys() == model.state_dict().keys()
    model.load_state_dict(converted, strict=True, assign=True)
    assert sum(v.numel() for v in converted.values()) == 630_766_080
    built = enc.image_encoder_from_openclip(_meta(embedder))
    assert (built.config.num_hidden_layers, built.config.hidden_size, built.config.image_size) == (32, 1280, 224)


def test_openclip_layout_matches_open_clip_vit_h():
    open_clip = pytest.importorskip("open_clip")
    with torch.device("meta"):
        model = open_clip.CLIP(**open_clip.get_model_config("ViT-H-14"))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == enc.openclip_state_shapes()


# ----------------------------------------------------------------------------------------------
# numerics (tiny)
# ----------------------------------------------------------------------------------------------


def _open_clip_tiny(tiny):
    open_clip = pytest.importorskip("open_clip")
    t, v = enc.TINY_TEXT, enc.TINY_VISION
    model = open_clip.CLIP(
        embed_dim=enc.TINY_EMBED_DIM,
        vision_cfg={"image_size": v["image_size"], "layers": v["layers"], "width": v["width"],
                    "head_width": v["width"] // v["heads"], "patch_size": v["patch_size"]},
        text_cfg={"context_length": t["context_length"], "vocab_size": len(tiny["tokenizer"]), "width": t["width"],
                  "heads": t["heads"], "layers": t["layers"]},
    ).eval()
    model.load_state_dict(tiny["openclip_state"], strict=True)
    return model


def test_text_encoder_matches_open_clip_penultimate(tiny):
    model = _open_clip_tiny(tiny)
    ids = enc.tokenize(tiny["tokenizer"], ["a red circle moving", "", "the blue square! " * 30])
    with torch.no_grad():
        # ToonCrafter's FrozenOpenCLIPEmbedder.encode_with_transformer, layer="penultimate"
        x = model.token_embedding(ids) + model.positional_embedding
        batch_first = getattr(model.transformer, "batch_first", False)
        if not batch_first:
            x = x.permute(1, 0, 2)
        for block in model.transformer.resblocks[:-1]:
            x = block(x, attn_mask=model.attn_mask)
        if not batch_first:
            x = x.permute(1, 0, 2)
        expected = model.ln_final(x)
        got = enc.encode_text(tiny["text_encoder"], tiny["tokenizer"], ["a red circle moving", "", "the blue square! " * 30])
    assert got.shape == (3, 77, enc.TINY_TEXT["width"])
    diff = (got - expected).abs().max().item()
    print(f"text penultimate max |diff| vs open_clip: {diff:.2e}")
    assert diff <= 1e-5


def test_image_encoder_matches_open_clip_tokens(tiny):
    model = _open_clip_tiny(tiny)
    frames = torch.rand(2, 3, 40, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        pixels = enc.preprocess_images(frames, size=enc.TINY_VISION["image_size"])
        # ToonCrafter's FrozenOpenCLIPImageEmbedderV2.encode_with_vision_transformer
        visual = model.visual
        x = visual.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
        x = visual.ln_pre(x + visual.positional_embedding)
        batch_first = getattr(visual.transformer, "batch_first", False)
        expected = visual.transformer(x if batch_first else x.permute(1, 0, 2))
        expected = expected if batch_first else expected.permute(1, 0, 2)
        got = enc.encode_images(tiny["image_encoder"], frames)
    assert got.shape == (2, (enc.TINY_VISION["image_size"] // 14) ** 2 + 1, enc.TINY_VISION["width"])
    diff = (got - expected).abs().max().item()
    print(f"vision tokens max |diff| vs open_clip: {diff:.2e}")
    assert diff <= 1e-5


def test_preprocessing_matches_kornia_resize():
    kornia = pytest.importorskip("kornia")
    for shape in [(2, 3, 320, 512), (1, 3, 100, 90), (1, 3, 224, 224), (1, 3, 64, 64)]:
        x = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
        expected = kornia.geometry.resize(x, (224, 224), interpolation="bicubic", align_corners=True, antialias=True)
        torch.testing.assert_close(enc.resize_like_kornia(x, (224, 224)), expected, atol=1e-6, rtol=1e-6)
        normalised = kornia.enhance.normalize((expected + 1) / 2, torch.tensor(enc.CLIP_MEAN), torch.tensor(enc.CLIP_STD))
        torch.testing.assert_close(enc.preprocess_images(x), normalised, atol=1e-6, rtol=1e-6)


def test_tokenize_matches_open_clip_tokenize():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()  # open_clip's own BPE vocabulary, shipped with the package
    vocab = dict(simple.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    prompts = ["A Cat, sitting on the mat!", "", "an anime girl running through fields of flowers; wind! " * 12]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in merges))
        for pad in ("!", "<|endoftext|>"):  # SD 2.x pads with "!" (id 0), OpenAI CLIP with the end token
            tokenizer = CLIPTokenizer(vocab=str(Path(tmp) / "vocab.json"), merges=str(Path(tmp) / "merges.txt"),
                                      pad_token=pad)
            assert torch.equal(enc.tokenize(tokenizer, prompts), open_clip.tokenize(prompts))


def test_tiny_tokenizer_zero_padding_and_local_loading(tiny, tmp_path):
    tokenizer = tiny["tokenizer"]
    ids = enc.tokenize(tokenizer, ["a red cat", "x" * 300])
    assert ids.shape == (2, 77) and ids[0, 0] == tokenizer.bos_token_id
    end = (ids[0] == tokenizer.eos_token_id).nonzero()[0, 0]
    assert torch.all(ids[0, end + 1:] == 0) and ids[1, -1] == tokenizer.eos_token_id
    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    assert torch.equal(enc.tokenize(enc.load_tokenizer(tmp_path / "tokenizer"), ["a red cat"]), ids[:1])
    with pytest.raises(LayerkitError, match="vocab.json"):
        enc.load_tokenizer(tmp_path)


def test_encoders_load_from_folders_and_openclip_files(tiny, tmp_path):
    from layerkit.io.weights import save_weights

    frames = torch.rand(1, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        text = enc.encode_text(tiny["text_encoder"], tiny["tokenizer"], ["a cat"])
        image = enc.encode_images(tiny["image_encoder"], frames)
        uncond = enc.encode_images(tiny["image_encoder"], torch.zeros_like(frames))
        assert not torch.equal(image, uncond)
        tiny["text_encoder"].save_pretrained(str(tmp_path / "text_encoder"))
        tiny["image_encoder"].save_pretrained(str(tmp_path / "image_encoder"))
        save_weights(tmp_path / "open_clip_model.safetensors", {k: v.clone() for k, v in tiny["openclip_state"].items()})
        for source in (tmp_path / "text_encoder", tmp_path / "open_clip_model.safetensors"):
            model = enc.load_text_encoder(source, heads=enc.TINY_TEXT["heads"])
            torch.testing.assert_close(enc.encode_text(model, tiny["tokenizer"], ["a cat"]), text)
        for source in (tmp_path / "image_encoder", tmp_path / "open_clip_model.safetensors"):
            loaded = enc.load_image_encoder(source, heads=enc.TINY_VISION["heads"])
            torch.testing.assert_close(enc.encode_images(loaded, frames), image)
        half = enc.load_image_encoder(tmp_path / "open_clip_model.safetensors", dtype=torch.bfloat16)
        assert enc.encode_images(half, frames).dtype == torch.bfloat16


def test_converter_errors_name_the_key(tiny):
    state = dict(tiny["openclip_state"])
    with pytest.raises(LayerkitError, match="'transformer.extra.weight'"):
        enc.text_encoder_from_openclip({**state, "transformer.extra.weight": torch.zeros(1)})
    with pytest.raises(LayerkitError, match="'visual.attnpool.weight'"):
        enc.image_encoder_from_openclip({**state, "visual.attnpool.weight": torch.zeros(1)})
    with pytest.raises(LayerkitError, match="visual.conv1.weight"):
        enc.image_encoder_from_openclip({k: v for k, v in state.items() if not k.startswith("visual.")})
    with pytest.raises(ShapeError):
        enc.preprocess_images(torch.zeros(1, 4, 8, 8))
