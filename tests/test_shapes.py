"""The shapes world: determinism, layout, compositing exactness and the analytic evaluator."""

from __future__ import annotations

import json
import re

import pytest
import torch
from layerkit_plugins.layered.evaluate import evaluate_layered
from layerkit_plugins.transparent.data import make_rgba_sprite_clip
from layerkit_plugins.transparent.evaluate import evaluate_rgba_video

from layerkit.data.evaluate import (
    alpha_iou,
    alpha_temporal_error,
    classify_colour,
    classify_shape,
    compositing_error,
    estimate_direction,
    foreground_leak,
    static_drift,
    summarise,
)
from layerkit.data.shapes import (
    COLOURS,
    DIRECTIONS,
    SHAPES,
    ShapesConfig,
    ShapesDataset,
    collate_layered,
    make_sample,
    seed_for,
    shape_area,
)
from layerkit.errors import LayerkitError, ShapeError

PRED_KEYS = ("foreground_rgb", "foreground_alpha", "background", "blended")
IMAGE_KEYS = ("layers_rgb", "layers_alpha", "blended", "foreground_rgb", "foreground_alpha", "background",
              "layer_masks", "sketches")


def _pred(sample):
    return {k: sample[k].clone() for k in PRED_KEYS}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_same_seed_same_sample_and_different_seed_differs():
    cfg = ShapesConfig(num_sprites=2)
    _assert_same(make_sample(7, cfg), make_sample(7, cfg))
    _assert_same(make_rgba_sprite_clip(7), make_rgba_sprite_clip(7))
    a, b = make_sample(7, cfg), make_sample(8, cfg)
    assert not torch.equal(a["blended"], b["blended"])


@pytest.mark.parametrize("cfg", [ShapesConfig(), ShapesConfig(num_sprites=3),
                                 ShapesConfig(num_frames=5, height=24, width=40, num_sprites=2, num_points=6)])
def test_every_key_has_its_shape_and_type(cfg):
    s = make_sample(1, cfg)
    n, f, h, w, p = 1 + cfg.num_sprites, cfg.num_frames, cfg.height, cfg.width, cfg.num_points
    expected = {
        "layers_rgb": (n, f, 3, h, w), "layers_alpha": (n, f, 1, h, w), "blended": (f, 3, h, w),
        "foreground_rgb": (f, 3, h, w), "foreground_alpha": (f, 1, h, w), "background": (f, 3, h, w),
        "layer_masks": (n, f, 1, h, w), "motion_scores": (n,), "trajectories": (n, f, p, 2),
        "trajectory_visibility": (n, f, p), "sketches": (n, f, 1, h, w), "static": (n,),
    }
    for key, shape in expected.items():
        assert tuple(s[key].shape) == shape, key
        assert s[key].dtype == (torch.bool if key == "static" else torch.float32), key
    assert len(s["prompts"]) == n and all(isinstance(t, str) for t in s["prompts"])
    assert s["background_prompt"] == s["prompts"][0]
    assert s["prompt"] == f"{s['foreground_prompt']} over {s['background_prompt']}"
    assert s["foreground_prompt"] == " and ".join(s["prompts"][1:])
    assert s["seed"] == 1 and len(s["meta"]["sprites"]) == cfg.num_sprites
    for sp, prompt in zip(s["meta"]["sprites"], s["prompts"][1:]):
        assert sp["shape"] in SHAPES and sp["colour"] in COLOURS and sp["direction"] in DIRECTIONS
        assert prompt.startswith(f"a {sp['colour']} {sp['shape']}")


def test_values_lie_in_range():
    for seed in range(10):
        s = make_sample(seed, ShapesConfig(num_sprites=3))
        for key in IMAGE_KEYS:
            assert s[key].min() >= 0 and s[key].max() <= 1, key
        assert torch.all(s["layers_alpha"][0] == 1)
        for key in ("layer_masks", "trajectory_visibility"):
            assert set(s[key].unique().tolist()) <= {0.0, 1.0}, key
        colours = [sp["colour"] for sp in s["meta"]["sprites"]]
        assert len(set(colours)) == len(colours)
        assert not set(colours) & set(s["meta"]["background"]["colours"])


def test_compositing_is_exact():
    for seed in range(10):
        s = make_sample(seed, ShapesConfig(num_sprites=1 + seed % 3))
        over = s["layers_rgb"][0]
        for rgb, a in zip(s["layers_rgb"][1:], s["layers_alpha"][1:]):
            over = rgb * a + over * (1 - a)
        assert (over - s["blended"]).abs().max() < 1e-5
        assert torch.equal(s["background"], s["layers_rgb"][0])
        fa = s["foreground_alpha"]
        assert torch.allclose(fa, 1 - torch.prod(1 - s["layers_alpha"][1:], 0), atol=1e-6)
        recon = s["foreground_rgb"] * fa + s["background"] * (1 - fa)
        assert (recon - s["blended"]).abs().max() < 1e-4
        assert torch.all(s["foreground_rgb"].masked_select((fa == 0).expand_as(s["foreground_rgb"])) == 0.5)


def test_layer_masks_partition_the_frame_and_follow_occlusion():
    for seed in range(10):
        s = make_sample(seed, ShapesConfig(num_sprites=3))
        masks = s["layer_masks"]
        assert torch.all(masks.sum(0) == 1)
        top = s["layers_alpha"][-1] >= 0.5
        assert torch.all(masks[-1][top] == 1)
        for i in range(1, masks.shape[0]):
            assert torch.all(s["layers_alpha"][i][masks[i] == 1] >= 0.5)


def test_still_layers_have_zero_motion_and_identical_frames():
    cfg = ShapesConfig(num_sprites=2, static_prob=1.0, background_static_prob=1.0)
    for seed in range(5):
        s = make_sample(seed, cfg)
        assert torch.all(s["motion_scores"] == 0) and torch.all(s["static"])
        for key in ("layers_rgb", "layers_alpha", "trajectories", "sketches"):
            assert torch.equal(s[key], s[key][:, :1].expand_as(s[key])), key
        assert static_drift(s["blended"]) == 0
        assert all(p.endswith("still") for p in s["prompts"])
    moving = make_sample(0, ShapesConfig(num_sprites=2, static_prob=0.0, background_static_prob=0.0))
    assert torch.all(moving["motion_scores"] >= 0.5) and not torch.any(moving["static"])
    assert "drifting" in moving["background_prompt"] and "moving" in moving["foreground_prompt"]


def test_trajectories_follow_the_sprite_and_motion_scores_match():
    xs, ys = torch.arange(32.0), torch.arange(32.0).view(32, 1)
    checked = 0
    for seed in range(20):
        s = make_sample(seed, ShapesConfig(num_sprites=2))
        traj = s["trajectories"]
        for i in range(1, traj.shape[0]):
            a = s["layers_alpha"][i, :, 0]
            clear = (a[:, 0].sum(1) + a[:, -1].sum(1) + a[:, :, 0].sum(1) + a[:, :, -1].sum(1)) == 0
            mass = a.sum((1, 2))
            centroid = torch.stack([(a * xs).sum((1, 2)) / mass, (a * ys).sum((1, 2)) / mass], -1)
            err = (centroid - traj[i, :, 0]).norm(dim=-1)
            assert torch.all(err[clear] < 1.0)
            checked += int(clear.sum())
            steps = (traj[i, 1:] - traj[i, :-1]).norm(dim=-1).mean()
            assert abs(steps.item() - s["motion_scores"][i].item()) < 1e-3
            # tracked points lie on the sprite wherever they are visible and unoccluded
            pts = traj[i].round().long()
            visible = s["trajectory_visibility"][i] == 1
            f = torch.arange(a.shape[0]).view(-1, 1).expand_as(visible)
            on = s["layer_masks"][i, :, 0][f[visible], pts[..., 1][visible], pts[..., 0][visible]]
            assert torch.all(on == 1)
    assert checked > 100


def test_background_points_move_with_the_texture():
    for seed in range(40):
        s = make_sample(seed)
        traj, bg = s["trajectories"][0], s["background"]
        steps = (traj[1:] - traj[:-1]).norm(dim=-1).mean()
        assert abs(steps.item() - s["motion_scores"][0].item()) < 1e-3
        if s["meta"]["background"]["kind"] == "gradient":  # smooth texture: bilinear look-up is accurate
            f, _, h, w = bg.shape
            grid = torch.stack([2 * traj[..., 0] / (w - 1) - 1, 2 * traj[..., 1] / (h - 1) - 1], -1).view(f, 1, -1, 2)
            values = torch.nn.functional.grid_sample(bg, grid, align_corners=True)[:, :, 0]
            assert (values - values[:1]).abs().max() < 0.02


def test_sprites_stay_mostly_in_frame():
    for seed in range(60):
        cfg = ShapesConfig(num_sprites=1, static_prob=0.0, speed=(1.2, 1.5), sprite_size=(0.4, 0.45))
        s = make_sample(seed, cfg)
        sp = s["meta"]["sprites"][0]
        visible = s["foreground_alpha"].sum((1, 2, 3)) / shape_area(sp["shape"], sp["size"])
        assert visible.min() >= 0.7, (seed, visible.min())
        assert visible.max() <= 1.02


def test_splits_use_disjoint_seeds_and_dataset_is_deterministic():
    seeds = {split: {seed_for(split, s, i) for s in range(3) for i in range(200)} for split in ("train", "val", "test")}
    assert not seeds["train"] & seeds["val"] and not seeds["train"] & seeds["test"] and not seeds["val"] & seeds["test"]
    assert len(seeds["train"]) == 600
    cfg = ShapesConfig(num_frames=4, num_sprites=2)
    train, val = ShapesDataset(5, seed=1, config=cfg), ShapesDataset(5, seed=1, config=cfg, split="val")
    assert len(train) == 5
    _assert_same(train[3], make_sample(seed_for("train", 1, 3), cfg))
    _assert_same(train[-1], train[4])
    assert not torch.equal(train[0]["blended"], val[0]["blended"])
    with pytest.raises(IndexError):
        train[5]
    with pytest.raises(LayerkitError):
        ShapesDataset(3, split="holdout")


def test_collate_layered_stacks_tensors_and_keeps_text():
    cfg = ShapesConfig(num_frames=4, num_sprites=2)
    batch = collate_layered([make_sample(i, cfg) for i in range(3)])
    assert batch["layers_rgb"].shape == (3, 3, 4, 3, 32, 32)
    assert batch["static"].dtype == torch.bool and batch["seed"].tolist() == [0, 1, 2]
    assert len(batch["prompts"]) == 3 and all(len(p) == 3 for p in batch["prompts"])
    assert isinstance(batch["prompt"], list) and isinstance(batch["prompt"][0], str)
    assert isinstance(batch["meta"], list) and len(batch["meta"]) == 3
    loader = torch.utils.data.DataLoader(ShapesDataset(4, config=cfg), batch_size=2, collate_fn=collate_layered)
    assert next(iter(loader))["blended"].shape == (2, 4, 3, 32, 32)
    with pytest.raises(ShapeError):
        collate_layered([make_sample(0, cfg), make_sample(0, ShapesConfig(num_frames=5))])


def test_config_is_validated():
    for bad in (ShapesConfig(num_sprites=4), ShapesConfig(num_sprites=0), ShapesConfig(speed=(2.0, 1.0)),
                ShapesConfig(static_prob=1.5), ShapesConfig(height=4)):
        with pytest.raises(LayerkitError):
            make_sample(0, bad)


def test_rgba_clip_matches_a_one_sprite_sample():
    clip = make_rgba_sprite_clip(5, ShapesConfig(num_sprites=3))
    sample = make_sample(5, ShapesConfig(num_sprites=1))
    assert clip["rgba"].shape == (16, 4, 32, 32)
    assert torch.equal(clip["rgba"][:, 3:], sample["foreground_alpha"])
    assert clip["prompt"] == sample["foreground_prompt"] and clip["meta"]["shape"] == sample["meta"]["sprites"][0]["shape"]
    alpha, rgb = clip["rgba"][:, 3], clip["rgba"][:, :3]
    assert (alpha == 0).float().mean() > 0.5 and alpha.max() == 1
    colour = torch.tensor(COLOURS[clip["meta"]["colour"]]).view(3, 1)
    assert torch.allclose(rgb.permute(1, 0, 2, 3)[:, alpha > 0], colour.expand(3, int((alpha > 0).sum())), atol=1e-5)


def test_evaluator_is_perfect_on_ground_truth():
    rows, rgba_rows = [], []
    for seed in range(40):
        s = make_sample(seed)
        rows.append(evaluate_layered(_pred(s), s))
        clip = make_rgba_sprite_clip(seed)
        rgba_rows.append(evaluate_rgba_video(clip["rgba"], clip))
    m = summarise(rows)
    assert m["alpha_iou"] == 1.0 and m["compositing_error"] < 1e-4 and m["background_leak"] == 0
    assert m["background_static_drift"] == 0
    for key in ("colour_correct", "shape_correct", "direction_correct"):
        assert m[key] >= 0.95, (key, m[key])
    r = summarise(rgba_rows)
    assert r["alpha_iou"] == 1.0 and r["alpha_temporal_error"] < 0.02
    assert r["colour_stability"] >= 0.95 and r["shape_stability"] >= 0.95 and r["identity_drift"] <= 0.05
    for key in ("colour_correct", "shape_correct", "direction_correct"):
        assert r[key] >= 0.95, (key, r[key])
    multi = make_sample(3, ShapesConfig(num_sprites=3))
    out = evaluate_layered(_pred(multi), multi)
    assert out["alpha_iou"] == 1.0 and out["colour_correct"] >= 2 / 3 and "shape_correct" not in out


def test_evaluator_scores_wrong_inputs_badly():
    gen = torch.Generator().manual_seed(0)
    wrong_colour = wrong_dir = 0
    for seed in range(10):
        s = make_sample(seed, ShapesConfig(static_prob=0.0, background_static_prob=1.0))
        fa = s["foreground_alpha"]
        shuffled = fa.flatten()[torch.randperm(fa.numel(), generator=gen)].view_as(fa)
        assert alpha_iou(shuffled, fa) < 0.3
        assert alpha_iou(torch.zeros_like(fa), fa) == 0.0
        pred = _pred(s)
        other = next(c for c in COLOURS if c != s["meta"]["sprites"][0]["colour"])
        pred["foreground_rgb"] = torch.tensor(COLOURS[other]).view(1, 3, 1, 1).expand_as(pred["foreground_rgb"])
        pred["foreground_alpha"] = fa.flip(0)  # runs backwards
        pred["background"] = s["blended"].clone()  # foreground left in the background
        out = evaluate_layered(pred, s)
        wrong_colour += out["colour_correct"] == 0
        wrong_dir += out["direction_correct"] == 0
        assert out["background_leak"] > 0.05 and out["compositing_error"] > 1e-3
    assert wrong_colour == 10 and wrong_dir == 10
    blank = evaluate_layered({"foreground_alpha": torch.zeros_like(fa)}, s)
    assert blank == {"alpha_iou": 0.0, "alpha_iou_heldout": 0.0, "shape_correct": 0.0, "direction_correct": 0.0}


def test_evaluator_parts():
    s = make_sample(2, ShapesConfig(static_prob=0.0))
    sp = s["meta"]["sprites"][0]
    fa, rgb = s["foreground_alpha"], s["foreground_rgb"]
    assert classify_colour(rgb, fa) == sp["colour"]
    assert classify_shape(fa) == sp["shape"] and classify_shape(torch.zeros_like(fa)) == "unknown"
    assert estimate_direction(fa) == sp["direction"] and estimate_direction(fa[:1].expand_as(fa)) == "still"
    assert compositing_error(rgb, fa, s["background"], s["blended"]) < 1e-4
    assert foreground_leak(s["background"], fa, s["background"]) == 0.0
    assert foreground_leak(s["blended"], fa, s["background"]) > 0.05
    assert static_drift(s["layers_alpha"][1]) > 0
    flicker = fa.clone()
    flicker[::2] = 0
    assert alpha_temporal_error(flicker) > 10 * alpha_temporal_error(fa)
    noisy = torch.cat([rgb, fa], 1)
    noisy[::2, :3] = torch.tensor(COLOURS["cyan" if sp["colour"] != "cyan" else "red"]).view(1, 3, 1, 1)
    assert evaluate_rgba_video(noisy, sp)["colour_stability"] <= 0.5 + 1e-6
    with pytest.raises(ShapeError):
        alpha_iou(fa, fa[:, :, :16])
    with pytest.raises(ShapeError):
        evaluate_rgba_video(rgb)
    with pytest.raises(ShapeError):
        evaluate_layered({"foreground_alpha": fa[:4]}, s)
    assert summarise([{"a": 1.0}, {"a": 3.0, "b": 2.0}]) == {"a": 2.0, "b": 2.0}


def test_layered_task_samples_held_out_clips_from_the_test_split_or_the_val_split():
    from layerkit_plugins.layered.task import LayeredTask

    from layerkit.data.shapes import ShapesConfig, make_sample, seed_for

    task = LayeredTask()
    size = {"height": 32, "width": 32, "num_frames": 4}
    test = task.sample_inputs({"num_samples": 2}, **size)
    val = task.sample_inputs({"num_samples": 2, "split": "val"}, **size)
    config = ShapesConfig(num_frames=4, height=32, width=32)
    for samples, split in ((test, "test"), (val, "val")):
        for i, sample in enumerate(samples):
            assert sample["prompts"] == make_sample(seed_for(split, 0, i), config)["prompts"]
    assert torch.equal(test[0]["blended"], task.sample_inputs({"num_samples": 1, "split": "test"}, **size)[0]["blended"])
    assert not torch.equal(test[0]["blended"], val[0]["blended"])
    with pytest.raises(LayerkitError, match="inputs.split must be val or test"):
        task.sample_inputs({"num_samples": 1, "split": "train"}, **size)


def test_layered_task_shapes_world_draws_the_held_out_clips_of_another_world():
    """task.shapes_world: ShapesConfig fields of the held-out clips (e.g. larger sprites), the
    sampler's size kept; an unknown field or a bad value is one sentence when the task is built."""
    from layerkit_plugins.layered.task import LayeredTask

    from layerkit.data.shapes import ShapesConfig, make_sample, seed_for

    size = {"height": 32, "width": 32, "num_frames": 4}
    big = LayeredTask(shapes_world={"sprite_size": [0.5, 0.7]}).sample_inputs({"num_samples": 3}, **size)
    config = ShapesConfig(num_frames=4, height=32, width=32, sprite_size=(0.5, 0.7))
    for i, sample in enumerate(big):
        wanted = make_sample(seed_for("test", 0, i), config)
        assert torch.equal(sample["foreground_alpha"], wanted["foreground_alpha"])
        assert 16.0 <= sample["meta"]["sprites"][0]["size"] <= 22.4
    with pytest.raises(LayerkitError, match=r"task.shapes_world names \['sprite_scale'\], which the shapes world"):
        LayeredTask(shapes_world={"sprite_scale": 2})
    with pytest.raises(LayerkitError, match="is not a shapes world: sprite_size must be a range"):
        LayeredTask(shapes_world={"sprite_size": [0.7, 0.5]})
    for wrong in ({"sprite_size": 0.5}, {"num_sprites": "2"}):
        with pytest.raises(LayerkitError, match="has a value of the wrong type: sprite_size and speed are ranges"):
            LayeredTask(shapes_world=wrong)
    with pytest.raises(LayerkitError, match=r"task.shapes_world sets \['height'\], which the sampler sets"):
        LayeredTask(shapes_world={"height": 64})
    with pytest.raises(LayerkitError, match="task.shapes_world must map ShapesConfig fields to values"):
        LayeredTask(shapes_world="big")


def test_layered_task_latent_norm_reads_a_mapping_or_a_file_and_refuses_a_wrong_one(tmp_path):
    """task.latent_norm: layer -> per-channel mean/std (a mapping or a JSON file), carried by every
    packed batch (the frame-0 copy with the foreground's); a wrong one is one sentence when the task is built."""
    from layerkit_plugins.layered.task import FIRST, LayeredTask

    from layerkit.data.shapes import ShapesConfig, collate_layered, make_sample

    stats = {"alpha": {"mean": [0.5, -0.5], "std": [0.2, 0.4]}, "foreground": {"mean": [0, 0], "std": [1, 2]}}
    (tmp_path / "norm.json").write_text(json.dumps(stats))
    for spec in (stats, str(tmp_path / "norm.json")):
        task = LayeredTask(latent_norm=spec, train_modes={"fg2bg": 1}, prepend_first_frame=["fg2bg"])
        batch = collate_layered([make_sample(1, ShapesConfig(num_frames=4, height=16, width=16))])
        packed = task.pack(batch, training=True)
        assert [s.name for s in packed.segments][0] == FIRST
        mean, std = packed.latent_norm["alpha"]
        assert mean.tolist() == [0.5, -0.5] and std.tolist() == pytest.approx([0.2, 0.4])
        assert packed.latent_norm[FIRST][1].tolist() == [1.0, 2.0]
    assert LayeredTask(latent_norm=None).pack(batch, training=True).latent_norm is None
    wrong = [({"matte": stats["alpha"]}, "names the layer 'matte'; this layout's layers are"),
             ({"alpha": {"mean": [0.0]}}, "task.latent_norm.alpha must be {mean: [numbers], std: [numbers]}"),
             ({"alpha": {"mean": [0.0, 1.0], "std": [1.0]}}, "one mean and one std per latent channel; got 2 means and 1"),
             ({"alpha": {"mean": [0.0], "std": [0.0]}}, "finite means and finite stds > 0"),
             ({"alpha": {"mean": [0.0], "std": [float("nan")]}}, "finite means and finite stds > 0"),
             ({"alpha": {"mean": [float("inf")], "std": [1.0]}}, "finite means and finite stds > 0"),
             (str(tmp_path / "missing.json"), "does not exist"),
             ([1, 2], "must map layer names to")]
    (tmp_path / "bad.json").write_text("{not json")
    wrong.append((str(tmp_path / "bad.json"), "is not JSON"))
    for spec, message in wrong:
        with pytest.raises(LayerkitError, match=re.escape(message)):
            LayeredTask(latent_norm=spec)


def test_layered_task_latent_residual_holds_in_every_mode_but_where_its_layer_alone_is_given():
    """task.latent_residual {background: blended}: generate, decompose and fg2bg batches diffuse the
    background as its difference from the blended clip; bg2fg (the background given, the blended clip
    not) diffuses it as itself; a wrong mapping is one sentence when the task is built."""
    from layerkit_plugins.layered.task import LayeredTask

    from layerkit.data.shapes import ShapesConfig, collate_layered, make_sample

    batch = collate_layered([make_sample(1, ShapesConfig(num_frames=4, height=16, width=16))])
    for mode, wanted in (("generate", {"background": "blended"}), ("decompose", {"background": "blended"}),
                         ("fg2bg", {"background": "blended"}), ("bg2fg", None)):
        task = LayeredTask(latent_residual={"background": "blended"}, train_modes={mode: 1})
        assert task.pack(batch, training=True).latent_residual == wanted, mode
    assert LayeredTask().pack(batch, training=True).latent_residual is None
    wrong = [({"matte": "blended"}, "names the layer 'matte'; this layout's layers are"),
             ({"background": "background"}, "makes 'background' its own base"),
             ({"background": "blended", "blended": "foreground"}, "which is itself a residual"),
             ("blended", "must map a layer to its base layer")]
    for spec, message in wrong:
        with pytest.raises(LayerkitError, match=re.escape(message)):
            LayeredTask(latent_residual=spec)


def test_layered_task_returns_the_given_layers_as_given():
    """Sampling a conditional mode returns the layers the user gave as they were given (decompose:
    the blended clip; fg2bg: the foreground RGBA and its matte; bg2fg: the background), the others
    as decoded; ``keep_given=False`` returns every layer as decoded (the given ones' VAE round trip)."""
    from layerkit_plugins.layered.task import LayeredTask

    from layerkit.data.shapes import ShapesConfig, collate_layered, make_sample

    batch = collate_layered([make_sample(i, ShapesConfig(num_frames=4, height=16, width=16)) for i in range(2)])
    grey = {n: torch.zeros(2, 4, 3, 16, 16) for n in ("foreground", "alpha", "background", "blended")}  # "decoded"
    for mode, given in (("decompose", {"blended"}), ("fg2bg", {"foreground", "alpha"}), ("bg2fg", {"background"}),
                        ("generate", set())):
        out = LayeredTask(mode=mode, fit_to_given=None).unpack(grey, {**batch, "mode": [mode, mode]})
        for i in range(2):
            kept = {"blended": torch.allclose(out[i]["blended"], batch["blended"][i], atol=1e-6),
                    "background": torch.allclose(out[i]["background"], batch["background"][i], atol=1e-6),
                    "alpha": torch.equal(out[i]["alpha"], batch["foreground_alpha"][i])}
            kept["foreground"] = torch.equal(out[i]["foreground"][:, :3], batch["foreground_rgb"][i])  # the RGBA as read
            assert {k for k, v in kept.items() if v} == given, mode
        decoded = LayeredTask(mode=mode, keep_given=False).unpack(grey, {**batch, "mode": [mode, mode]})
        assert all(bool((layer[:, :3] == 0.5).all()) for layer in decoded[0].values())


def test_the_generated_layers_are_fitted_to_the_given_ones():
    """task.fit_to_given: the generated ones of F, B and the blended clip I minimise the compositing
    residual plus the prior on their decoded values, the given ones and the matte fixed (decompose:
    I given; fg2bg: F given; bg2fg: B given). With the committed small prior the layers composite
    into the given one and, where the matte is 0 (decompose, bg2fg) or 1 (fg2bg), the generated
    layer takes the given one's values. A prior <= 0 or a wrong given set is one sentence."""
    from layerkit_plugins.layered.matting import fit_to_given
    from layerkit_plugins.layered.task import LayeredTask

    from layerkit.data.shapes import ShapesConfig, collate_layered, make_sample

    torch.manual_seed(0)
    layers = {n: torch.rand(2, 3, 8, 8) * 0.6 + 0.2 for n in ("foreground", "background", "blended")}
    alpha = torch.rand(2, 1, 8, 8)
    for given in ({"blended"}, {"foreground"}, {"background"}):
        fitted = {n: v.requires_grad_() for n, v in fit_to_given(layers, alpha, given, prior=0.5).items()}
        assert set(fitted) == set(layers) - given
        x = {**layers, **fitted}
        objective = (x["blended"] - alpha * x["foreground"] - (1 - alpha) * x["background"]).pow(2).sum() + \
            0.5 * sum((fitted[n] - layers[n]).pow(2).sum() for n in fitted)
        objective.backward()
        assert max(v.grad.abs().max().item() for v in fitted.values()) < 1e-5, f"the minimum, given {given}"
    with pytest.raises(ValueError, match="prior must be > 0"):
        fit_to_given(layers, alpha, {"blended"}, prior=0.0)
    with pytest.raises(ValueError, match="given must be a proper subset"):
        fit_to_given(layers, alpha, {"blended", "foreground", "background"}, prior=0.1)
    for wrong in (-1, True, "a"):
        with pytest.raises(LayerkitError, match="task.fit_to_given must be a number > 0"):
            LayeredTask(fit_to_given=wrong)

    batch = collate_layered([make_sample(i, ShapesConfig(num_frames=4, height=16, width=16)) for i in range(2)])
    decoded = {"foreground": torch.zeros(2, 4, 3, 16, 16), "background": torch.zeros(2, 4, 3, 16, 16),
               "alpha": batch["foreground_alpha"].expand(-1, -1, 3, -1, -1) * 2 - 1, "blended": torch.zeros(2, 4, 3, 16, 16)}
    for mode, given, where in (("decompose", "blended", "background"), ("bg2fg", "background", "blended"),
                               ("fg2bg", "foreground_rgb", "blended")):
        out = LayeredTask(mode=mode).unpack(decoded, {**batch, "mode": [mode] * 2})
        raw = LayeredTask(mode=mode, fit_to_given=None).unpack(decoded, {**batch, "mode": [mode] * 2})
        for i in range(2):
            a = out[i]["alpha"]
            composite = out[i]["foreground"][:, :3] * a + out[i]["background"] * (1 - a)
            raw_composite = raw[i]["foreground"][:, :3] * a + raw[i]["background"] * (1 - a)
            assert (composite - out[i]["blended"]).abs().mean() < 0.2 * (raw_composite - raw[i]["blended"]).abs().mean()
            region = (a > 0.99) if mode == "fg2bg" else (a < 0.01)
            region = region.expand(-1, 3, -1, -1)
            assert torch.allclose(out[i][where][region], batch[given][i][region], atol=0.02), mode  # prior 0.03: 3%
            assert torch.equal(out[i]["alpha"], raw[i]["alpha"]), "the matte is never fitted"
    generated = LayeredTask(mode="generate").unpack(decoded, {**batch, "mode": ["generate"] * 2})
    plain = LayeredTask(mode="generate", fit_to_given=None).unpack(decoded, {**batch, "mode": ["generate"] * 2})
    assert all(torch.equal(generated[0][k], plain[0][k]) for k in generated[0]), "generation fits nothing"


def test_the_figures_of_a_given_layer_are_left_out():
    """evaluate_layered scores the model, not its input: fg2bg (foreground and matte given) has no
    held-out matte, colour, shape or direction figure and scores its matte against the composite;
    bg2fg (background given) no background figures; decompose adds background_error (the background
    where the true matte is 0, which the given clip shows)."""
    from layerkit_plugins.layered.evaluate import evaluate_layered

    from layerkit.data.shapes import ShapesConfig, make_sample

    s = make_sample(5, ShapesConfig(num_frames=4, height=16, width=16))
    pred = {"foreground_rgb": s["foreground_rgb"], "foreground_alpha": s["foreground_alpha"],
            "background": s["background"] * 0.5, "blended": s["blended"]}
    decompose, fg2bg, bg2fg = (evaluate_layered(pred, s, mode=m) for m in ("decompose", "fg2bg", "bg2fg"))
    shown = (s["foreground_alpha"] <= 0).expand_as(s["background"])
    assert decompose["background_error"] == pytest.approx((s["background"] * 0.5)[shown].sub(
        s["background"][shown]).abs().mean().item())
    assert decompose["alpha_iou"] == decompose["alpha_iou_heldout"] == 1.0
    assert not {"alpha_iou_heldout", "colour_correct", "shape_correct", "direction_correct"} & set(fg2bg)
    assert fg2bg["alpha_iou"] == fg2bg["alpha_iou_composite"] and "background_leak" in fg2bg
    assert not {"background_leak", "background_static_drift", "background_error"} & set(bg2fg)
    assert {"colour_correct", "shape_correct", "alpha_iou_heldout"} <= set(bg2fg)
    assert "background_error" not in evaluate_layered(pred, s, mode="generate")
