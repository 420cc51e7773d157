"""Protocols v2 for every plugin: the backbone contract over each registered tiny backbone, every
experiment config composed and fast-run, user inputs kept the user's, the per-frame given mask."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import TINY, TINY_SAMPLE

from layerkit.config import compose, list_group
from layerkit.errors import LayerkitError

# ----------------------------------------------------------------------------------------
# the backbone contract, over every registered backbone that has a tiny build
# ----------------------------------------------------------------------------------------
#: registered backbone name -> keyword arguments of a tiny build, and the video channels it encodes
TINY_BACKBONES = {
    "toy.dit": ({"hidden": 32, "heads": 2, "layers": 2, "sample_size": 16}, 3, 16, 4),
    "cogvideox": ({"tiny": True, "tiny_layers": 2}, 3, 32, 8),
    "animatediff.tiny": ({}, 4, 32, 4),
    "tooncrafter": ({"tiny": True}, 3, 32, 4),
}
NO_TINY_BUILD = {"animatediff": "needs a local SD 1.5 folder (its tiny twin is animatediff.tiny)"}


def test_every_registered_backbone_has_a_tiny_build_in_the_contract(registry):
    names = set(registry.names("backbone"))
    covered = set(TINY_BACKBONES) | set(NO_TINY_BUILD)
    assert names <= covered, f"backbones without a contract entry: {sorted(names - covered)}"


@pytest.mark.parametrize("name", sorted(TINY_BACKBONES))
def test_backbone_contract(registry, name, tmp_path):
    from safetensors.torch import load_file, save_file

    from layerkit.protocols import Backbone, Packed, Segment

    kwargs, channels, size, frames = TINY_BACKBONES[name]
    backbone = registry.build("backbone", name, **kwargs).eval()
    assert isinstance(backbone, Backbone)
    torch.manual_seed(0)
    video = torch.rand(2, frames, channels, size, size) * 2 - 1
    with torch.no_grad():
        latents = backbone.encode_video(video)
        h, w = backbone.latent_size(size, size)
        assert latents.shape == (2, backbone.latent_channels, backbone.latent_frames(frames), h, w)
        assert len(backbone.frame_windows(frames)) == latents.shape[2]
        decoded = backbone.decode_latents(latents)
        assert decoded.shape[:2] == (2, frames) and decoded.shape[-2:] == (size, size)
        given = torch.zeros(2, frames, dtype=torch.bool)
        given[:, 0] = True  # a keyframe, for backbones conditioned on one (tooncrafter)
        packed = Packed([Segment("video", frames, video)], given, [["a red circle"], ["a blue square"]], size, size)
        cond = backbone.encode_conditions(packed, latents=latents)
        negative = backbone.negative_conditions(packed, cond, "")
        for key, value in cond.items():
            if isinstance(value, torch.Tensor):
                assert negative[key].shape == value.shape, key
        t = torch.tensor([900, 100])
        out = backbone.predict(latents, t, cond)
        again = backbone.predict(latents, t, cond)
        assert out.shape == latents.shape and torch.isfinite(out).all()
        assert torch.equal(out, again), "the denoiser is deterministic"
    assert backbone.make_scheduler("train").config.num_train_timesteps > 0
    assert backbone.make_scheduler("sample") is not None
    # save and reload: the weights written to safetensors load back into a fresh build, equal
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in backbone.state_dict().items()}, str(path))
    fresh = registry.build("backbone", name, **kwargs).eval()
    for p in fresh.parameters():
        torch.nn.init.zeros_(p)
    fresh.load_state_dict(load_file(str(path)))
    with torch.no_grad():
        assert torch.equal(fresh.predict(latents, t, cond), out)


def test_cogvideox_frame_windows_and_the_given_mask_in_latent_frames():
    from layerkit_plugins.cogvideox.backbone import CogVideoX

    from layerkit.pipeline import latent_layout
    from layerkit.protocols import Packed, Segment

    backbone = CogVideoX(tiny=True, tiny_layers=2)
    segments = [Segment(n, 8) for n in ("a", "b", "c", "d")]
    given = torch.zeros(1, 32, dtype=torch.bool)
    given[:, 8:16] = True
    layout = latent_layout(backbone, Packed(segments, given, [["x"]], 32, 32))
    assert layout.lengths == [2, 2, 2, 2] and layout.given[0].tolist() == [False, False, True, True] + [False] * 4
    given[:, 9] = False  # one frame of a 4-frame latent window: inexpressible
    with pytest.raises(LayerkitError, match=r"frames 8..11 share one latent frame"):
        latent_layout(backbone, Packed(segments, given, [["x"]], 32, 32))
    odd = [Segment(n, 9) for n in ("a", "b", "c", "d")]  # 36 frames in one pass: windows straddle segments
    with pytest.raises(LayerkitError, match="across the segments"):
        latent_layout(backbone, Packed(odd, torch.zeros(1, 36, dtype=torch.bool), [["x"]], 32, 32))
    backbone.vae_pass = "segment"  # each 9-frame sub-clip on its own: 3 latent frames each
    assert latent_layout(backbone, Packed(odd, torch.zeros(1, 36, dtype=torch.bool), [["x"]], 32, 32)).lengths == [3] * 4


def test_one_vae_pass_over_the_packed_clip_equals_the_whole_clip_encoding():
    """LayerFlow's authors encode [fg, alpha, bg, blended] in one pass: the latents of sub-clip 3 are the
    corresponding slice of the whole-clip encoding, not the encoding of sub-clip 3 alone."""
    from layerkit_plugins.cogvideox.backbone import CogVideoX

    from layerkit.pipeline import encode_packed
    from layerkit.protocols import Packed, Segment

    backbone = CogVideoX(tiny=True, tiny_layers=2).eval()
    torch.manual_seed(0)
    clips = [torch.rand(1, 8, 3, 32, 32) * 2 - 1 for _ in range(4)]
    packed = Packed([Segment(str(i), 8, c) for i, c in enumerate(clips)], torch.zeros(1, 32, dtype=torch.bool),
                    [["x"]], 32, 32)
    with torch.no_grad():
        latents, layout = encode_packed(backbone, packed, training=True)
        whole = backbone.encode_video(torch.cat(clips, dim=1))
        alone = backbone.encode_video(clips[2])
    assert layout.lengths == [2, 2, 2, 2]
    assert torch.equal(latents[:, :, 4:6], whole[:, :, 4:6])
    assert (alone - whole[:, :, 4:6]).abs().max() > 1e-3, "the causal VAE sees the earlier sub-clips"


def test_a_latent_norm_diffuses_the_named_segments_per_channel_and_decoding_undoes_it():
    """``Packed.latent_norm``: the named segments' latent frames come out of encode_packed as
    (z - mean) / std per channel, the others untouched; decode_packed decodes the same clip as without it."""
    from layerkit_plugins.cogvideox.backbone import CogVideoX

    from layerkit.pipeline import decode_packed, encode_packed
    from layerkit.protocols import Packed, Segment

    backbone = CogVideoX(tiny=True, tiny_layers=2).eval()
    torch.manual_seed(0)
    clips = [torch.rand(1, 8, 3, 32, 32) * 2 - 1 for _ in range(4)]
    c = backbone.latent_channels
    mean, std = torch.linspace(-1, 1, c), torch.linspace(0.1, 0.5, c)

    def packed(norm):
        return Packed([Segment(str(i), 8, v) for i, v in enumerate(clips)], torch.zeros(1, 32, dtype=torch.bool),
                      [["x"]], 32, 32, latent_norm=norm)

    with torch.no_grad():
        plain, layout = encode_packed(backbone, packed(None), training=True)
        normed, _ = encode_packed(backbone, packed({"1": (mean, std)}), training=True)
        assert torch.equal(normed[:, :, :2], plain[:, :, :2]) and torch.equal(normed[:, :, 4:], plain[:, :, 4:])
        expected = (plain[:, :, 2:4] - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
        assert torch.allclose(normed[:, :, 2:4], expected, atol=1e-5)
        a = decode_packed(backbone, plain, packed(None), layout)
        b = decode_packed(backbone, normed, packed({"1": (mean, std)}), layout)
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    with pytest.raises(LayerkitError, match="segment '1' has 3 means and 3 stds; the backbone's latents have"):
        encode_packed(backbone, packed({"1": (torch.zeros(3), torch.ones(3))}), training=True)
    from layerkit.pipeline import normalised  # only the frames a sampler encoded; the rest stay zeros

    zeros = torch.zeros_like(plain)
    some = normalised(zeros, packed({"1": (mean, std)}), layout, frames=torch.tensor([False] * 3 + [True] * 5))
    assert torch.equal(some[:, :, :3], zeros[:, :, :3])
    assert torch.allclose(some[:, :, 3], (-mean / std).view(1, -1, 1, 1).expand_as(some[:, :, 3]))


def test_a_latent_residual_diffuses_a_segment_as_its_difference_from_its_base():
    """``Packed.latent_residual``: the named segment comes out of encode_packed as its latents minus
    its base segment's (before any latent_norm), the others untouched; decode_packed decodes the same
    clip as without it; a base of another length or a missing segment is one sentence."""
    from layerkit_plugins.cogvideox.backbone import CogVideoX

    from layerkit.pipeline import decode_packed, encode_packed, normalised
    from layerkit.protocols import Packed, Segment

    backbone = CogVideoX(tiny=True, tiny_layers=2).eval()
    torch.manual_seed(0)
    clips = [torch.rand(1, 8, 3, 32, 32) * 2 - 1 for _ in range(4)]
    c = backbone.latent_channels
    mean, std = torch.linspace(-1, 1, c), torch.linspace(0.1, 0.5, c)

    def packed(residual, norm=None, frames=(8, 8, 8, 8)):
        return Packed([Segment(str(i), n, v[:, :n]) for i, (n, v) in enumerate(zip(frames, clips, strict=True))],
                      torch.zeros(1, sum(frames), dtype=torch.bool), [["x"]], 32, 32, latent_norm=norm,
                      latent_residual=residual)

    with torch.no_grad():
        plain, layout = encode_packed(backbone, packed(None), training=True)
        diff, _ = encode_packed(backbone, packed({"2": "3"}), training=True)
        assert torch.equal(diff[:, :, :4], plain[:, :, :4]) and torch.equal(diff[:, :, 6:], plain[:, :, 6:])
        assert torch.allclose(diff[:, :, 4:6], plain[:, :, 4:6] - plain[:, :, 6:8], atol=1e-6)
        both, _ = encode_packed(backbone, packed({"2": "3"}, {"2": (mean, std)}), training=True)
        expected = (plain[:, :, 4:6] - plain[:, :, 6:8] - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
        assert torch.allclose(both[:, :, 4:6], expected, atol=1e-5)
        a = decode_packed(backbone, plain, packed(None), layout)
        b = decode_packed(backbone, both, packed({"2": "3"}, {"2": (mean, std)}), layout)
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    # only the frames a sampler encoded; the rest stay as they are
    some = normalised(plain, packed({"2": "3"}), layout, frames=torch.tensor([False] * 5 + [True] * 3))
    assert torch.equal(some[:, :, 4], plain[:, :, 4]) and torch.allclose(some[:, :, 5], plain[:, :, 5] - plain[:, :, 7])
    with pytest.raises(LayerkitError, match=re.escape("the latent residual 2 - 9 names a segment this packed clip")):
        normalised(plain, packed({"2": "9"}), layout)
    short = packed({"2": "3"}, frames=(8, 8, 8, 4))
    with pytest.raises(LayerkitError, match=re.escape("needs segments of as many latent frames; they have 2 and 1")):
        normalised(plain[:, :, :7], short, encode_packed(backbone, short, training=True)[1])


def test_weights_trained_with_a_latent_residual_load_only_into_a_task_with_the_same(tmp_path):
    from types import SimpleNamespace

    from layerkit.io.weights import save_weights
    from layerkit.pipeline import check_latent_transform

    trained = save_weights(tmp_path / "w.safetensors", {"x": torch.zeros(1)},
                           metadata={"layerkit_latent_residual": {"background": "blended"}})
    plain = save_weights(tmp_path / "plain.safetensors", {"x": torch.zeros(1)})
    check_latent_transform(trained, SimpleNamespace(latent_residual={"background": "blended"}))
    check_latent_transform(plain, SimpleNamespace())
    with pytest.raises(LayerkitError, match=re.escape("was trained with the latent residuals background - blended, "
                                                      "but this run's task has no latent residual; set task.latent_residual")):
        check_latent_transform(trained, SimpleNamespace(latent_residual=None))
    with pytest.raises(LayerkitError, match=re.escape("trained with no latent residual, but this run's task "
                                                      "has the latent residuals background - blended")):
        check_latent_transform(plain, SimpleNamespace(latent_residual={"background": "blended"}))


def test_weights_trained_with_a_latent_norm_load_only_into_a_task_with_the_same(tmp_path):
    """A run records its task's latent normalisation in the weights' metadata; loading them into a
    task without it (or with other statistics) is one sentence, not latents decoded the wrong way."""
    from types import SimpleNamespace

    from layerkit.io.weights import save_weights
    from layerkit.pipeline import check_latent_transform, latent_norm_record

    norm = {"alpha": (torch.tensor([0.5, -1.0]), torch.tensor([0.2, 0.3]))}
    trained = save_weights(tmp_path / "w.safetensors", {"x": torch.zeros(1)},
                           metadata={"layerkit_latent_norm": latent_norm_record(norm)})
    plain = save_weights(tmp_path / "plain.safetensors", {"x": torch.zeros(1)})
    check_latent_transform(trained, SimpleNamespace(latent_norm=norm))
    check_latent_transform(plain, SimpleNamespace(latent_norm=None))
    check_latent_transform(plain, SimpleNamespace())  # a task that knows nothing of it
    other = {"alpha": (torch.tensor([0.5, -1.0]), torch.tensor([0.2, 0.4]))}
    cases = [(trained, None, "was trained with a latent normalisation of ['alpha'], but this run's task has none"),
             (trained, other, "but this run's task has one of ['alpha']"),
             (plain, norm, "was trained with no latent normalisation, but this run's task has one of ['alpha']")]
    for path, task_norm, message in cases:
        with pytest.raises(LayerkitError, match=re.escape(message)):
            check_latent_transform(path, SimpleNamespace(latent_norm=task_norm))


# ----------------------------------------------------------------------------------------
# every experiment config composes and runs a step
# ----------------------------------------------------------------------------------------
SMALL_LAYERED = [*TINY]
COG_TINY = ["backbone=cogvideox_tiny", "train.batch_size=1", "data.size=4", "data.num_frames=8", "data.height=32",
            "data.width=32"]
ANIM_TINY = ["backbone=animatediff_tiny", "data.num_frames=4", "data.height=32", "data.width=32"]
TOY_LF = ["train.batch_size=1", "data.size=4"]
TOY_LF1 = [*TOY_LF, "train.compile=false"]  # stage 1 compiles: a minute of inductor, not this test's
TOY_T = ["train.batch_size=1", "data.size=4"]
#: experiment -> (what a fast run does, overrides)
EXPERIMENTS: dict[str, tuple[str, list[str]]] = {
    "toy_layered": ("train", SMALL_LAYERED),
    "layerflow_stage1": ("train", COG_TINY),
    "layerflow_stage2": ("train", COG_TINY),
    "layerflow_stage3": ("train", COG_TINY),
    "toy_layerflow_common": ("compose", []),
    "toy_layerflow_base": ("train", TOY_LF),
    "toy_layerflow_stage1": ("train", TOY_LF1),
    "toy_layerflow_stage2": ("train", TOY_LF),
    "toy_layerflow_stage3": ("train", TOY_LF),
    "toy_transparent": ("train", TOY_T),
    "toy_transparent_base": ("compose", []),
    "toy_transparent_baseline": ("train", TOY_T),
    "toy_transparent_rgb_base": ("train", TOY_T),
    "transparent_stage2": ("train", ANIM_TINY),
    "transparent_baseline": ("sample", ["backbone=animatediff_tiny", "backbone.transparent_attn=random"]),
    "transparent_t2v": ("sample", ["backbone=animatediff_tiny", "backbone.transparent_attn=random"]),
    "tooncrafter_i2v": ("train", ["backbone=tooncrafter_tiny"]),
    "layeranimate": ("train", ["backbone=tooncrafter_tiny"]),
    "layeranimate_demo": ("compose", ["backbone=tooncrafter_tiny"]),
    "tooncrafter_interpolate": ("train", ["backbone=tooncrafter_tiny"]),
    # the toy LayerAnimate: its stages train on the committed toy base (test_toy_layeranimate.py
    # samples it); the base stage needs the folder its VAE step writes under runs/
    "toy_layeranimate": ("train", ["data.size=4", "train.batch_size=2"]),
    "toy_layeranimate_no_ma": ("train", ["data.size=4", "train.batch_size=2"]),
    "toy_layeranimate_common": ("compose", []),
    "toy_layeranimate_base": ("compose", []),
}
FAST_SAMPLE = ["sampler.steps=1", "sampler.progress=false", "sampler.num_frames=4", "sampler.height=32",
               "sampler.width=32", "device=cpu"]


def test_every_experiment_on_the_search_path_is_in_the_table(registry):
    names = set(list_group("experiment", registry))
    missing = sorted(names - set(EXPERIMENTS))
    assert not missing, f"experiments without a fast-run entry: {missing}"


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_composes_and_fast_runs(registry, name, tmp_path):
    from layerkit.sampling.run import sample
    from layerkit.training.run import train

    what, overrides = EXPERIMENTS[name]
    for primary in ("train", "sample"):
        compose(primary, [f"+experiment={name}", *overrides], registry)
    if what == "train":
        out = train([f"+experiment={name}", *overrides, "trainer.max_steps=1", "train.checkpoint_every=1",
                     f"output_dir={tmp_path / 'run'}"], registry=registry)
        record = json.loads((out / "record.json").read_text())
        assert record["global_step"] == 1
        cache = record.get("latent_cache")  # what a run with train.cache_latents encoded (one step: everything)
        assert (cache is not None) == bool(record["config"]["train"].get("cache_latents"))
        assert cache is None or (cache["passes_encoded"] >= 1 and cache["passes_cached"] == 0)
    elif what == "sample":
        out = sample([f"+experiment={name}", *overrides, *FAST_SAMPLE, f"output_dir={tmp_path / 'out'}"],
                     registry=registry)
        assert (out / "record.json").is_file()


# ----------------------------------------------------------------------------------------
# the user's inputs stay the user's
# ----------------------------------------------------------------------------------------
def _write(path, frames):
    from layerkit.io.video import write_video

    return write_video(path, (frames.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def toy_sampler():
    from layerkit.registry import Registry
    from layerkit.sampling.run import build_sampler

    registry = Registry().load_entry_points()
    cfg = compose("sample", ["+experiment=toy_layered", *TINY_SAMPLE], registry)
    return build_sampler(cfg, registry)


def test_prompt_only_uses_no_shapes_world_prompt_or_truth(toy_sampler):
    result = toy_sampler.run(toy_sampler.samples({"prompt": "a cat, a dog and a bird"}))
    assert result.metrics is None and "ground_truth" not in result.batch
    assert result.batch["prompt"] == ["a cat, a dog and a bird"]
    assert result.batch["foreground_prompt"] == [""] and result.batch["background_prompt"] == [""]
    assert any("foreground_prompt not given" in n for n in result.notes)


def test_blended_only_decomposes_the_users_video_without_shapes_prompts(toy_sampler, tmp_path):
    from layerkit.data.shapes import ShapesConfig, make_sample

    truth = make_sample(123, ShapesConfig(num_frames=4, height=16, width=16))
    path = _write(tmp_path / "blended", truth["blended"])
    batch = toy_sampler.samples({"blended": str(path)})
    assert batch["mode"] == ["decompose"] and "ground_truth" not in batch
    assert batch["prompt"] == [""] and batch["foreground_prompt"] == [""]
    result = toy_sampler.run(batch)
    assert result.metrics is None
    assert result.outputs[0]["blended"].shape == (4, 3, 16, 16)


def test_foreground_only_selects_fg2bg_and_a_conflicting_mode_names_the_right_one(toy_sampler, tmp_path):
    from layerkit.data.shapes import ShapesConfig, make_sample

    truth = make_sample(5, ShapesConfig(num_frames=4, height=16, width=16))
    rgba = torch.cat([truth["foreground_rgb"], truth["foreground_alpha"]], dim=1)
    path = _write(tmp_path / "fg", rgba)
    batch = toy_sampler.samples({"foreground": str(path), "prompt": "x"})
    assert batch["mode"] == ["fg2bg"] and "ground_truth" not in batch
    task = toy_sampler.parts.task
    packed = task.pack(batch, training=False)
    assert packed.given[0].tolist() == [True] * 8 + [False] * 8
    task.mode = "generate"
    try:
        with pytest.raises(LayerkitError, match=r"inputs.foreground is the input of fg2bg.*task.mode=fg2bg"):
            toy_sampler.samples({"foreground": str(path)})
    finally:
        task.mode = "auto"


def test_an_unknown_input_key_lists_the_known_ones(toy_sampler):
    with pytest.raises(LayerkitError, match=r"takes no input inputs.blend;.*inputs.blended"):
        toy_sampler.samples({"blend": "x.mp4"})


def test_a_video_of_another_size_is_cropped_with_its_aspect_kept_and_said(toy_sampler, tmp_path):
    frames = torch.zeros(4, 3, 24, 32)
    frames[:, 0, :, 8:24] = 1.0  # a red band in the centre, 16 px wide
    path = _write(tmp_path / "wide", frames)
    batch = toy_sampler.samples({"blended": str(path)})
    assert any("32x24 scaled to 21x16 and centre-cropped to 16x16" in n for n in batch["notes"][0])
    pad = toy_sampler.samples({"blended": str(path), "fit": "pad"})
    assert any("padded to 16x16" in n for n in pad["notes"][0])
    blended = pad["blended"][0]
    assert blended[:, :, :2].abs().sum() == 0, "padded rows are black"


def test_a_loss_region_of_the_wrong_shape_is_one_sentence():
    from layerkit.errors import LayerkitError
    from layerkit.protocols import Packed, Segment

    with pytest.raises(LayerkitError, match=r"Packed.loss_region must be \[B, F, H, W\] = \[1, 2, 4, 4\]; got \(1, 2, 2, 2\)"):
        Packed([Segment("a", 2)], torch.zeros(1, 2, dtype=torch.bool), [["p"]], 4, 4, loss_region=torch.zeros(1, 2, 2, 2))
