"""The ``tooncrafter`` backbone: its conditioning, its DDIM step, its loaders (a LayerAnimate-style folder
and ToonCrafter's model.ckpt, written here from tiny components) and its keyframe tasks end to end."""

from __future__ import annotations

import json

import pytest
import torch

from layerkit.errors import LayerkitError


@pytest.fixture(scope="module")
def backbone():
    from layerkit_plugins.tooncrafter.backbone import tiny

    return tiny(seed=0).eval()


def _packed(mode: str, b: int = 2, frames: int = 4, size: int = 32):
    from layerkit_plugins.tooncrafter.task import KeyframeTask

    torch.manual_seed(1)
    video = torch.rand(b, frames, 3, size, size)
    return KeyframeTask(mode=mode).pack({"video": video, "prompt": ["a red circle"] * b}, training=False), video


@pytest.mark.parametrize("mode", ["i2v", "interpolate"])
def test_conditioning_concat_latent_image_tokens_and_the_unconditional_half(backbone, mode):
    from layerkit.pipeline import encode_packed

    packed, video = _packed(mode)
    with torch.no_grad():
        latents, layout = encode_packed(backbone, packed)
        cond = backbone.encode_conditions(packed, latents=latents)
        negative = backbone.negative_conditions(packed, cond, "")
        frame_latents = backbone.encode_video(video * 2 - 1)
    assert layout.given[0].tolist() == ([True, False, False, False] if mode == "i2v" else [True, False, False, True])
    image = cond["image_latents"]
    if mode == "i2v":  # frame 0's latent on every frame
        assert torch.allclose(image, frame_latents[:, :, :1].expand_as(image), atol=1e-6)
    else:  # zeros but the first and the last frame
        assert torch.allclose(image[:, :, [0, 3]], frame_latents[:, :, [0, 3]], atol=1e-6)
        assert not image[:, :, 1:3].any()
        assert backbone.__dict__["_references"] is not None, "the dual-reference decoder's maps are kept"
    assert cond["image_embeds"].shape == (2, 4 * 2, 32) and cond["fps"].tolist() == [24.0, 24.0]
    zero = backbone.encode_image_tokens(torch.zeros(2, 3, 32, 32))
    assert torch.equal(negative["image_embeds"], zero), "unconditional image tokens: those of an all-zero image"
    assert torch.equal(negative["image_latents"], image), "the same concatenated latent"
    assert not torch.equal(negative["prompt_embeds"], cond["prompt_embeds"])
    with torch.no_grad():
        out = backbone.predict(torch.randn_like(latents), torch.tensor([900, 20]), cond)
    assert out.shape == latents.shape


def test_wrong_frame_count_is_one_sentence(backbone):
    packed, _ = _packed("i2v", frames=6)
    from layerkit.pipeline import encode_packed

    with torch.no_grad():
        latents, _ = encode_packed(backbone, packed)
        cond = backbone.encode_conditions(packed, latents=latents)
        with pytest.raises(LayerkitError, match="animates 4 frames.*got 6"):
            backbone.predict(latents, torch.tensor([500, 500]), cond)


def test_ddim_step_is_diffusers_ddim_with_eta_and_finite_at_the_zero_snr_start(backbone):
    scheduler = backbone.make_scheduler("sample")
    scheduler.set_timesteps(10)
    torch.manual_seed(0)
    x, v = torch.randn(1, 4, 4, 4, 4), torch.randn(1, 4, 4, 4, 4)
    first = backbone.scheduler_step(scheduler, v, scheduler.timesteps[0], x, {}, torch.Generator().manual_seed(3))
    assert torch.isfinite(first).all(), "999 with zero terminal SNR and eta 1"
    t = scheduler.timesteps[3]
    ours = backbone.scheduler_step(scheduler, v, t, x, {}, torch.Generator().manual_seed(3))
    ref = scheduler.step(v, t, x, eta=1.0, generator=torch.Generator().manual_seed(3), return_dict=False)[0]
    assert (ours - ref).abs().max() <= 1e-5
    late = scheduler.timesteps[7]  # 299 -> 199: inside scale_arr's 1.0 -> 0.7 ramp
    plain = backbone.scheduler_step(scheduler, v, late, x, {}, torch.Generator().manual_seed(3))
    backbone.dynamic_rescale = True
    try:
        rescaled = backbone.scheduler_step(scheduler, v, late, x, {}, torch.Generator().manual_seed(3))
    finally:
        backbone.dynamic_rescale = False
    assert not torch.allclose(rescaled, plain), "ToonCrafter's scale_arr rescale changes the step"


def test_scale_arr_is_tooncrafters():
    from layerkit_plugins.tooncrafter.backbone import scale_arr

    s = scale_arr()
    assert s.shape == (1000,) and s[0] == 1.0 and abs(float(s[399]) - 0.7) < 1e-6 and float(s[999]) == pytest.approx(0.7)


def test_a_layeranimate_style_folder_loads_back_equal(tmp_path):
    from layerkit_plugins.tooncrafter.backbone import ToonCrafter, save_components, tiny_components

    from layerkit.pipeline import encode_packed

    root = save_components(tiny_components(seed=3), tmp_path / "la")
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["unet", "vae", "vae_dualref", "image_projector", "scheduler", "text_encoder", "image_encoder", "tokenizer"])
    loaded = ToonCrafter(path=str(root)).eval()
    built = ToonCrafter(tiny=True, seed=3).eval()
    packed, _ = _packed("interpolate")
    with torch.no_grad():
        outs = []
        for bb in (loaded, built):
            latents, _ = encode_packed(bb, packed)
            cond = bb.encode_conditions(packed, latents=latents)
            torch.manual_seed(0)
            outs.append(bb.predict(torch.randn_like(latents), torch.tensor([700, 300]), cond))
    assert (outs[0] - outs[1]).abs().max() <= 1e-5
    import shutil

    shutil.rmtree(root / "vae_dualref")
    with pytest.raises(LayerkitError, match=r"lacks the subfolder\(s\) vae_dualref/"):
        ToonCrafter(path=str(root))
    assert ToonCrafter(path=str(root), dual_ref=False).vae_dualref is None


def test_tooncrafter_model_ckpt_loads_every_component(tmp_path):
    """A ToonCrafter-layout Lightning checkpoint (model.diffusion_model., first_stage_model., cond_stage_model.model.,
    embedder.model., image_proj_model. and the DDPM buffers), pickled, read with weights_only=True."""
    from layerkit_plugins.tooncrafter.backbone import (
        TINY_RESAMPLER,
        TINY_UNET,
        ToonCrafter,
        save_components,
        tiny_components,
    )
    from layerkit_plugins.tooncrafter.convert import unet_to_tooncrafter
    from layerkit_plugins.tooncrafter.encoders import tiny_encoders

    parts = tiny_components(seed=5)
    state = dict(unet_to_tooncrafter(parts["unet"].state_dict()))  # model.diffusion_model.*
    state.update({f"image_proj_model.{k}": v for k, v in parts["image_projector"].state_dict().items()})
    state.update({f"first_stage_model.{k}": v for k, v in parts["vae_dualref"].state_dict().items()})
    openclip = tiny_encoders(5)["openclip_state"]
    state.update({f"cond_stage_model.model.{k}": v for k, v in openclip.items() if not k.startswith("visual.")})
    state.update({f"embedder.model.{k}": v for k, v in openclip.items() if k.startswith("visual.")})
    for name in ("betas", "alphas_cumprod", "scale_arr"):
        state[name] = torch.zeros(1000)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "epoch": 3}, ckpt)
    save_components(parts, tmp_path / "aside")  # its tokenizer/ folder
    tok = str(tmp_path / "aside" / "tokenizer")
    configs = {"unet_config": TINY_UNET, "image_projector_config": TINY_RESAMPLER}
    with pytest.raises(LayerkitError, match="not a safetensors file"):
        ToonCrafter(checkpoint=str(ckpt), tokenizer=tok, **configs)
    with pytest.raises(LayerkitError, match="time_embed"):  # the released 512 architecture: the tiny file does not fit
        ToonCrafter(checkpoint=str(ckpt), tokenizer=tok, allow_pickle=True)
    loaded = ToonCrafter(checkpoint=str(ckpt), tokenizer=tok, allow_pickle=True, **configs)
    for name in ("denoiser", "image_projector", "vae_dualref"):
        ours = getattr(loaded, name).state_dict()
        theirs = (parts["unet"] if name == "denoiser" else parts[name]).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    with pytest.raises(LayerkitError, match="tokenizer"):
        ToonCrafter(checkpoint=str(ckpt), allow_pickle=True, **configs)


def test_another_models_checkpoint_and_a_truncated_file_are_one_sentence(tmp_path):
    from layerkit_plugins.tooncrafter.backbone import ToonCrafter
    from safetensors.torch import save_file

    other = tmp_path / "layerflow.safetensors"
    save_file({"backbone.denoiser.transformer_blocks.5.attn1.to_q.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(LayerkitError, match="not a ToonCrafter checkpoint") as err:
        ToonCrafter(checkpoint=str(other), tokenizer=str(tmp_path))
    assert "\n" not in str(err.value)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(other.read_bytes()[:40])
    with pytest.raises(LayerkitError, match="broken.safetensors"):
        ToonCrafter(checkpoint=str(broken), tokenizer=str(tmp_path))
    with pytest.raises(LayerkitError, match="exactly one of"):
        ToonCrafter(path=str(tmp_path), tiny=True)


@pytest.mark.parametrize("mode", ["i2v", "interpolate"])
def test_the_experiments_sample_on_cpu_with_no_other_argument(registry, mode, tmp_path):
    from layerkit.io.video import read_video
    from layerkit.sampling.run import sample

    out = sample([f"+experiment=tooncrafter_{mode}", "backbone=tooncrafter_tiny", "sampler.steps=3",
                  "sampler.progress=false", f"output_dir={tmp_path / mode}"], registry=registry)
    video = read_video(out / "video.mp4")
    assert video.frames.shape == (4, 32, 32, 3)
    record = json.loads((out / "record.json").read_text())
    assert record["metrics"]["frame_error"] >= 0


def test_user_keyframes_and_bad_inputs(registry, tmp_path):
    import numpy as np
    from PIL import Image

    from layerkit.sampling.run import sample

    first, last = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(first)
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(last)
    common = ["backbone=tooncrafter_tiny", "sampler.steps=2", "sampler.progress=false"]
    out = sample(["+experiment=tooncrafter_interpolate", *common, f"+inputs.first_frame={first}",
                  f"+inputs.last_frame={last}", "+inputs.prompt=a cat", f"output_dir={tmp_path / 'ok'}"],
                 registry=registry)
    assert json.loads((out / "record.json").read_text())["metrics"] is None, "a user's frames: no shapes metrics"
    cases = [
        (["+experiment=tooncrafter_interpolate", f"+inputs.first_frame={first}"], "needs inputs.last_frame"),
        (["+experiment=tooncrafter_i2v", f"+inputs.first_frame={tmp_path / 'nope.png'}"], "nope.png' does not exist"),
        (["+experiment=tooncrafter_i2v", f"+inputs.first_frame={first}", f"+inputs.last_frame={last}"],
         "task=tooncrafter_interpolate"),
        (["+experiment=tooncrafter_i2v", "sampler.num_frames=6"], "animates 4 frames"),
    ]
    for i, (overrides, message) in enumerate(cases):
        with pytest.raises(LayerkitError, match=message):
            sample([*overrides, *common, f"output_dir={tmp_path / f'bad{i}'}"], registry=registry)
        assert not (tmp_path / f"bad{i}").exists(), "nothing written"
