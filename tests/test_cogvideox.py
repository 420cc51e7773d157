"""The CogVideoX backbone: tiny model saved and loaded through the real loader, and layerkit's
sampler pinned to diffusers' CogVideoXPipeline."""

from __future__ import annotations

import pytest
import torch

from layerkit.errors import LayerkitError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from layerkit_plugins.cogvideox.backbone import save_components, tiny_components

    return save_components(tiny_components(seed=0, layers=2), tmp_path_factory.mktemp("cogvideox") / "tiny")


def test_tiny_model_saves_and_loads_through_the_directory_loader(tiny_dir, registry):
    from layerkit_plugins.cogvideox.backbone import CogVideoX

    loaded = registry.build("backbone", "cogvideox", path=str(tiny_dir))
    built = CogVideoX(tiny=True, seed=0, tiny_layers=2)
    own, ref = loaded.state_dict(), built.state_dict()
    assert own.keys() == ref.keys()
    assert all(torch.equal(own[k], ref[k]) for k in own)
    prompt = "0, a red circle moving left"
    assert loaded.tokenizer(prompt).input_ids == built.tokenizer(prompt).input_ids
    assert loaded.tokenizer(prompt).input_ids[-1] == loaded.tokenizer.eos_token_id

    assert loaded.prediction_type == "v_prediction" and loaded.lora_prefix == "transformer"
    assert loaded.latent_frames(8) == 2 and loaded.latent_frames(9) == 3 and loaded.latent_size(32, 32) == (4, 4)
    with torch.no_grad():  # frame_windows describe the VAE's real chunking: counts match what it encodes
        for frames in (1, 8, 9, 16, 17, 32, 33, 36):
            clip = torch.zeros(1, frames, 3, 32, 32)
            assert loaded.eval().encode_video(clip).shape[2] == loaded.latent_frames(frames), frames
    assert loaded.frame_windows(33)[:3] == [(0, 1), (1, 5), (5, 9)]
    assert loaded.frame_windows(32)[:2] == [(0, 4), (4, 8)]
    video = torch.rand(1, 8, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = loaded.eval().encode_video(video)
        assert latents.shape == (1, 4, 2, 4, 4)
        assert loaded.decode_latents(latents).shape == (1, 8, 3, 32, 32)
        embeds = loaded.encode_prompt_blocks([["0, a", "1, b", "2, c"]])
    assert embeds["prompt_embeds"].shape == (1, 3 * 16, 32)
    assert embeds["prompt_block_index"].tolist() == [[0] * 16 + [1] * 16 + [2] * 16]


def test_the_old_stage_weights_key_names_init_from(tiny_dir, registry):
    with pytest.raises(LayerkitError, match=r"backbone.denoiser_weights was replaced by init_from"):
        registry.build("backbone", "cogvideox", path=str(tiny_dir), denoiser_weights=[None])


def test_missing_directory_or_subfolder_is_a_clear_error(tiny_dir, tmp_path):
    import shutil

    from layerkit_plugins.cogvideox.backbone import CogVideoX

    with pytest.raises(LayerkitError, match="is not a directory.*backbone.path"):
        CogVideoX(path=str(tmp_path / "nowhere"))
    with pytest.raises(LayerkitError, match="is not a directory"):
        CogVideoX(path="???")  # the Hydra default left unset
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    shutil.rmtree(broken / "vae")
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(LayerkitError, match=r"lacks the subfolder\(s\) vae/, tokenizer/"):
        CogVideoX(path=str(broken))


@pytest.mark.parametrize(("sampler", "rotary", "dynamic_cfg"), [("dpm", False, True), ("ddim", False, False),
                                                                ("dpm", True, False)])
def test_sampler_reproduces_cogvideox_pipeline(tiny_dir, sampler, rotary, dynamic_cfg):
    """One clip, no layer embedding, no LoRA: layerkit's loop == CogVideoXPipeline(output_type="latent")."""
    from layerkit_plugins.cogvideox.backbone import CogVideoX

    from layerkit.pipeline import Parts
    from layerkit.protocols import Packed, Segment
    from layerkit.sampling.loop import SamplerOptions, denoise

    if rotary:  # CogVideoX-5B style positions
        backbone = CogVideoX(tiny=True, tiny_layers=2, tiny_rotary=True, sampler=sampler)
    else:
        backbone = CogVideoX(path=str(tiny_dir), sampler=sampler)
    backbone.eval()
    with torch.no_grad():
        prompt = backbone.encode_prompts(["2, a red circle moving left over blue and white stripes"])["prompt_embeds"]
        negative = backbone.encode_prompts([""])["prompt_embeds"]
    pipe = backbone.diffusers_pipeline()
    reference = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, height=32, width=32, num_frames=9,
                     num_inference_steps=4, guidance_scale=6.0, use_dynamic_cfg=dynamic_cfg,
                     generator=torch.Generator().manual_seed(0), output_type="latent").frames  # [B, F, C, H, W]

    packed = Packed([Segment("video", 9)], torch.zeros(1, 9, dtype=torch.bool), [["unused"]], 32, 32)
    options = SamplerOptions(steps=4, guidance_scale=6.0, dynamic_cfg=dynamic_cfg, progress=False)
    ours = denoise(Parts(backbone, task=None), packed, options, generator=torch.Generator().manual_seed(0),
                   cond={"prompt_embeds": prompt}, negative_cond={"prompt_embeds": negative}).latents
    diff = (ours.permute(0, 2, 1, 3, 4) - reference).abs().max().item()
    print(f"max abs diff vs CogVideoXPipeline ({sampler}, rotary={rotary}): {diff:.3g}")
    assert ours.shape == (1, 4, 3, 4, 4)
    assert diff <= 1e-5


def test_prompt_blocks_keep_every_video_token_at_its_position():
    """2B's sincos table spans max_text_seq_length text rows: with K blocks (K*L tokens) the video
    patches keep their positions and text tokens get none (as LayerFlow)."""
    from layerkit_plugins.cogvideox.backbone import CogVideoX

    backbone = CogVideoX(tiny=True, tiny_layers=2).eval()
    embed = backbone.denoiser.patch_embed
    seen: list[torch.Tensor] = []
    handle = embed.register_forward_hook(lambda m, a, out: seen.append(out))
    noisy, t = torch.randn(1, 4, 2, 4, 4), torch.tensor([500])
    with torch.no_grad():
        one = backbone.encode_prompt_blocks([["0, a red circle"]])
        three = backbone.encode_prompt_blocks([["0, a red circle", "1, blue stripes", "2, a red circle over stripes"]])
        backbone.predict(noisy, t, one)
        out = backbone.predict(noisy, t, three)
        projected = embed.text_proj(three["prompt_embeds"])
    handle.remove()
    assert out.shape == noisy.shape
    assert torch.equal(seen[0][:, 16:], seen[1][:, 48:]), "video tokens unchanged by the text length"
    assert torch.allclose(seen[1][:, :48], projected), "text tokens carry no positional embedding"
    assert embed.max_text_seq_length == 16 and embed.pos_embedding.shape[1] == 16 + 2 * 2 * 3  # restored


def test_schedulers_and_memory_options():
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler
    from layerkit_plugins.cogvideox.backbone import CogVideoX

    backbone = CogVideoX(tiny=True, tiny_layers=2)
    train = backbone.make_scheduler("train")
    assert isinstance(train, CogVideoXDDIMScheduler)
    assert train.config.prediction_type == "v_prediction" and train.config.rescale_betas_zero_snr
    assert isinstance(backbone.make_scheduler("sample"), CogVideoXDPMScheduler)
    assert isinstance(backbone.make_scheduler("sample", "ddim"), CogVideoXDDIMScheduler)
    with pytest.raises(LayerkitError, match="no sampler 'euler'"):
        backbone.make_scheduler("sample", "euler")
    noise = backbone.prepare_noise((2, 4, 3, 4, 4), torch.Generator().manual_seed(0), torch.device("cpu"), torch.float32)
    drawn = torch.randn((2, 3, 4, 4, 4), generator=torch.Generator().manual_seed(0))  # diffusers' [B, F, C, H, W]
    assert torch.equal(noise, drawn.permute(0, 2, 1, 3, 4))
    backbone.enable_memory_options({"vae_tiling": True, "vae_slicing": True}, torch.device("cpu"))
    assert backbone.vae.use_tiling and backbone.vae.use_slicing
