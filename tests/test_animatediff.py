"""The animatediff backbone: loaders, the verbs, and equivalence with diffusers' AnimateDiffPipeline."""

from __future__ import annotations

import pytest
import torch
from layerkit_plugins.animatediff.backbone import AnimateDiff, from_pretrained, tiny
from layerkit_plugins.animatediff.loading import diffusers_to_original, load_motion_adapter
from layerkit_plugins.animatediff.tiny import (
    TINY_DECODER,
    TINY_ENCODER,
    TINY_MOTION,
    save_tiny,
    tiny_components,
)

from layerkit.errors import LayerkitError
from layerkit.pipeline import Parts
from layerkit.protocols import Packed, Segment, Task
from layerkit.sampling.loop import SamplerOptions, denoise


@pytest.fixture(scope="module")
def backbone() -> AnimateDiff:
    return tiny(seed=0).eval()


def reference_latents(backbone: AnimateDiff, prompts: list[str], frames: int, steps: int, guidance: float,
                      seed: int) -> torch.Tensor:
    from diffusers import AnimateDiffPipeline

    pipe = AnimateDiffPipeline(vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer,
                               unet=backbone.denoiser, motion_adapter=None,
                               scheduler=backbone.make_scheduler("sample"))
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompts, num_frames=frames, height=32, width=32, num_inference_steps=steps, guidance_scale=guidance,
                generator=torch.Generator().manual_seed(seed), output_type="latent").frames


def test_sampler_reproduces_animatediff_pipeline(backbone):
    prompts = ["a red circle moving right", "a blue square"]
    ref = reference_latents(backbone, prompts, frames=8, steps=3, guidance=7.5, seed=3)
    packed = Packed([Segment("video", 8)], torch.zeros(2, 8, dtype=torch.bool), [[p] for p in prompts], 32, 32)
    out = denoise(Parts(backbone, Task()), packed, SamplerOptions(steps=3, guidance_scale=7.5, progress=False),
                  generator=torch.Generator().manual_seed(3)).latents
    assert out.shape == ref.shape == (2, 4, 8, 4, 4)
    assert (out - ref).abs().max().item() <= 1e-5


def test_encode_decode_rgb_and_rgba(backbone):
    torch.manual_seed(0)
    rgba = torch.rand(1, 3, 4, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = backbone.encode_video(rgba)
        assert latents.shape == (1, 4, 3, 4, 4)
        # the untrained offset head is zero: RGBA encodes as its RGB over LayerDiffuse's grey (127/255)
        alpha = (rgba[:, :, 3:] + 1) / 2
        grey = ((rgba[:, :, :3] + 1) / 2 * alpha + 127 / 255 * (1 - alpha)) * 2 - 1
        assert torch.allclose(latents, backbone.encode_video(grey), atol=1e-6)
        decoded = backbone.decode_latents(latents)
        assert decoded.shape == (1, 3, 4, 32, 32) and decoded.abs().max() <= 1
        backbone.rgba_decode = False
        assert backbone.decode_latents(latents).shape == (1, 3, 3, 32, 32)
    backbone.rgba_decode = True
    with pytest.raises(LayerkitError, match="RGB or RGBA"):
        backbone.encode_video(torch.zeros(1, 2, 2, 32, 32))
    with pytest.raises(LayerkitError, match="divisible by 8"):
        backbone.latent_size(30, 32)


def test_offset_encoder_moves_the_latent_by_std_times_offset(backbone):
    torch.manual_seed(0)
    rgba = torch.rand(1, 1, 4, 32, 32) * 2 - 1
    head = backbone.offset_encoder.blocks[16]
    with torch.no_grad():
        plain = backbone.encode_video(rgba)
        head.bias.fill_(1.0)
        shifted = backbone.encode_video(rgba)
        head.bias.zero_()
        alpha = (rgba[:, 0, 3:] + 1) / 2
        posterior = backbone.vae.encode(((rgba[:, 0, :3] + 1) / 2 * alpha + 127 / 255 * (1 - alpha)) * 2 - 1).latent_dist
    expected = plain + (posterior.std * backbone.scaling_factor).unsqueeze(2)
    assert torch.allclose(shifted, expected, atol=1e-5)


def test_prompts_and_memory_options(backbone):
    embeds = backbone.encode_prompts(["a red circle", ""])["prompt_embeds"]
    assert embeds.shape == (2, backbone.tokenizer.model_max_length, 32)
    backbone.enable_memory_options({"vae_slicing": True, "vae_tiling": True}, torch.device("cpu"))
    assert backbone.vae.use_slicing and backbone.vae.use_tiling
    backbone.vae.disable_slicing()
    backbone.vae.disable_tiling()
    assert backbone.prediction_type == "epsilon" and backbone.lora_prefix == "unet"


def test_loads_saved_folders_and_original_motion_modules(tmp_path):
    paths = save_tiny(tmp_path, seed=0)
    loaded = from_pretrained(path=str(paths["path"]), motion_adapter=str(paths["motion_adapter"]),
                             transparent_encoder=str(paths["transparent_encoder"]),
                             transparent_decoder=str(paths["transparent_decoder"]),
                             encoder_config=TINY_ENCODER, decoder_config=TINY_DECODER)
    built = tiny(seed=0)
    for name in ("denoiser", "vae", "text_encoder", "offset_encoder", "transparent_decoder"):
        a, b = getattr(loaded, name).state_dict(), getattr(built, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert loaded.make_scheduler("sample").config.beta_schedule == "linear"

    # an original AnimateDiff motion-module file (.safetensors, and .ckpt via weights_only)
    from safetensors.torch import save_file

    adapter = tiny_components(seed=0, transparent=False)["motion_adapter"]
    original = diffusers_to_original(adapter.state_dict())
    assert "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight" \
        in original and "mid_block.motion_modules.0.temporal_transformer.transformer_blocks.0.ff_norm.weight" in original
    save_file({k: v.contiguous() for k, v in original.items()}, str(tmp_path / "mm.safetensors"))
    torch.save({"state_dict": original}, str(tmp_path / "mm.ckpt"))
    config = {k: TINY_MOTION[k] for k in ("motion_norm_num_groups", "motion_num_attention_heads")}
    for name in ("mm.safetensors", "mm.ckpt"):
        got = load_motion_adapter(tmp_path / name, allow_pickle=True, config=config)
        assert got.config.use_motion_mid_block and got.config.motion_max_seq_length == 32
        ref = adapter.state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in got.state_dict().items())
    with pytest.raises(LayerkitError, match="allow_pickle"):
        load_motion_adapter(tmp_path / "mm.ckpt")


def test_missing_weights_fail_with_a_clear_message(tmp_path):
    with pytest.raises(LayerkitError, match="backbone.path"):
        from_pretrained(path=None, motion_adapter="x")
    with pytest.raises(LayerkitError, match="not a diffusers Stable Diffusion 1.5 folder"):
        from_pretrained(path=str(tmp_path), motion_adapter=str(tmp_path))


@pytest.mark.parametrize("reverse", [False, True])
def test_tiny_tokenizer_makes_each_word_one_token_whatever_the_order(reverse):
    """'green' after 'red': red's merge ``r e`` outranks ``g r``, which once left green four tokens;
    'cocoa' and 'aaaaa' repeat a pair. Words added later change no earlier word's tokens."""
    from layerkit_plugins.animatediff.tiny import tiny_tokenizer
    from layerkit_plugins.transparent.toy.model import WORDS

    words = ("red", "green", "greenery", "a", "aa", "cocoa", "aaaaa", *WORDS)
    words = tuple(reversed(words)) if reverse else words
    tokenizer = tiny_tokenizer(16, words=words)
    for word in words:
        ids = tokenizer(word)["input_ids"]
        assert len(ids) == 3, f"'{word}' is {len(ids) - 2} tokens"
    assert len({tuple(tokenizer(w)["input_ids"]) for w in words}) == len(set(words))
    assert len(tokenizer("a green cross moving up")["input_ids"]) == 7  # start, five words, end
    first = tiny_tokenizer(16, words=words[:4])
    for word in words[:4]:  # the earlier words' pieces are the same under the longer list
        assert first.tokenize(word) == tokenizer.tokenize(word)
