"""LayerAnimate's non-learned control preparation: layers and motion-based assignment, trajectory
maps, the demo-folder reader, shapes-world samples and the training-time choices.

Expected values are computed by hand from the rules in the modules' docstrings (the authors'
``generate_gaussian_heatmap``, ``_encode_controls``, ``animate_Layer.py`` and data loader).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from layerkit_plugins.layeranimate import controls as C
from layerkit_plugins.layeranimate import layers as L
from layerkit_plugins.layeranimate import trajectory as T
from layerkit_plugins.layeranimate.demo import read_demo
from layerkit_plugins.layeranimate.schema import SAMPLE_KEYS, build_sample, two_keyframes, validate_sample
from layerkit_plugins.layeranimate.shapes import shapes_layeranimate_sample, shapes_training_sample
from PIL import Image

from layerkit.data.shapes import ShapesConfig
from layerkit.errors import LayerkitError
from layerkit.io.video import write_video

SMALL = ShapesConfig(num_frames=6, height=32, width=32, num_sprites=2)


def _gauss(a: int, b: int) -> int:
    """The template by hand: floor(255 exp(-d^2 / (2 * 40^2))) inside the radius-100 disc."""
    d2 = (a - 100) ** 2 + (b - 100) ** 2
    return math.floor(255 * math.exp(-d2 / 3200)) if d2 <= 100**2 else 0


# ----------------------------------------------------------------------------- trajectory maps


def test_gaussian_template_by_hand():
    t = T.gaussian_template()
    assert t.shape == (200, 200) and t.dtype == np.uint8
    assert t[100, 100] == 255 and t.max() == 255
    for a, b in [(100, 140), (130, 90), (102, 102), (52, 77), (150, 150), (170, 170), (0, 100)]:
        assert t[a, b] == _gauss(a, b), (a, b)
    assert t[0, 0] == 0 and t[2, 2] == 0 and t[199, 199] == 0  # corners lie outside the disc


def test_offset_kernel_centre_and_support():
    k = T.offset_kernel()
    assert k.shape == (41, 41)
    assert k[20, 20] == 1.0 and k.max() == 1.0  # scaled so the centre is 1, and the centre is the peak
    assert k[0, 0] == 0.0 and k[20, 0] > 0  # the disc's outside stays 0 after the resize


def test_heatmap_patch_is_template_resized_into_clipped_box():
    # point (x, y) = (30, 25) in a 64 x 64 frame: box x in [10, 50), y in [5, 45); 200 -> 40 px
    # bilinear resize samples source (5 i + 2, 5 j + 2) exactly
    tracks = np.array([[[30.0, 25.0]], [[30.0, 25.0]]], np.float32)
    raw = T.raw_trajectory_maps(tracks, [1], 64, 64, capacity=2)
    assert raw.shape == (2, 2, 3, 64, 64)
    heat = raw[0, 1, 0]
    for i, j in [(20, 20), (20, 28), (10, 15), (0, 0), (39, 39)]:
        assert heat[5 + i, 10 + j] == _gauss(5 * i + 2, 5 * j + 2), (i, j)
    assert heat[25, 30] == 254
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[5:45, 10:50] = False
    assert heat[outside].abs().max() == 0
    assert raw[:, 0].abs().max() == 0  # layer 0 has no point
    # clipped box near the border: x in [0, 20), y in [0, 22)
    near = T.raw_trajectory_maps(np.array([[[0.5, 2.0]]], np.float32), [0], 64, 64, capacity=1)[0, 0, 0]
    assert near[:22, :20].max() > 0 and near[22:].abs().max() == 0 and near[:, 20:].abs().max() == 0


def test_heatmap_max_composite_and_out_of_frame_points():
    tracks = np.array([[[20.0, 20.0], [24.0, 20.0], [100.0, 5.0], [-1.0, 3.0]]], np.float32)
    both = T.raw_trajectory_maps(tracks, [0, 0, 0, 0], 48, 48, capacity=1)[0, 0, 0]
    a = T.raw_trajectory_maps(tracks[:, :1], [0], 48, 48, capacity=1)[0, 0, 0]
    b = T.raw_trajectory_maps(tracks[:, 1:2], [0], 48, 48, capacity=1)[0, 0, 0]
    assert torch.equal(both, torch.maximum(a, b))  # the out-of-frame points add nothing


def test_offsets_are_smoothed_with_the_kernel_around_the_point():
    tracks = np.array([[[30.0, 25.0]], [[33.0, 29.0]]], np.float32)  # displacement (3, 4)
    raw = T.raw_trajectory_maps(tracks, [0], 64, 64, capacity=1)
    k = T.offset_kernel()
    off = raw[0, 0, 1:]
    for dy, dx in [(0, 0), (0, 5), (-7, 3), (12, -9)]:  # correlation: dst(p + d) = k(c - d)
        assert off[0, 25 + dy, 30 + dx].item() == pytest.approx(3 * k[20 - dy, 20 - dx], rel=1e-6)
        assert off[1, 25 + dy, 30 + dx].item() == pytest.approx(4 * k[20 - dy, 20 - dx], rel=1e-6)
    assert off[:, 25, 30].tolist() == [3.0, 4.0]
    assert raw[1, 0, 1:].abs().max() == 0  # last frame: no displacement


def test_normalisation_uses_the_global_max_radius():
    # layer 0 moves (3, 4) (radius 5), layer 1 moves (6, 8) (radius 10): both divided by 10 + 1e-5
    tracks = np.array([[[20.0, 20.0], [40.0, 40.0]], [[23.0, 24.0], [46.0, 48.0]]], np.float32)
    maps = T.trajectory_maps(tracks, [0, 1], 64, 64, capacity=3)
    assert maps.shape == (3, 2, 3, 64, 64)
    d = 10 + 1e-5
    assert maps[0, 0, 1:, 20, 20].tolist() == pytest.approx([3 / d, 4 / d])
    assert maps[1, 0, 1:, 40, 40].tolist() == pytest.approx([6 / d, 8 / d])
    assert maps[1, 0, 0, 40, 40].item() == pytest.approx(254 / 255 * 2 - 1)
    assert torch.equal(maps[2], T.no_trajectory(1, 2, 64, 64)[0])  # no point: heatmap -1, offsets 0
    assert maps[:, 1, 1:].abs().max() == 0


def test_renderer_rejects_bad_tracks():
    with pytest.raises(LayerkitError, match="tracks"):
        T.raw_trajectory_maps(np.zeros((2, 3)), [0], 8, 8, 1)
    with pytest.raises(LayerkitError, match="track_layer"):
        T.raw_trajectory_maps(np.zeros((2, 1, 2)), [4], 8, 8, 4)
    with pytest.raises(LayerkitError, match="NaN"):
        T.raw_trajectory_maps(np.full((2, 1, 2), np.nan), [0], 8, 8, 1)


def test_resize_crop_geometry_by_hand():
    assert T.resize_crop_geometry(400, 640, 320, 512) == (0.8, 0, 0)
    assert T.resize_crop_geometry(500, 1000, 320, 512) == (0.64, 64, 0)  # 640 x 320, crop 64 each side
    assert T.resize_crop_geometry(400, 400, 320, 512) == (0.8, -96, 0)  # 320 x 320, padded by 96 on the left
    fitted = T.fit_tracks(np.array([[[100.0, 50.0, 1.0]]], np.float32), 500, 1000, 320, 512)
    assert fitted[0, 0].tolist() == pytest.approx([0.64 * 100 - 64, 0.64 * 50, 1.0])


def test_fitted_tracks_follow_the_image_transform():
    from layerkit_plugins.layeranimate.demo import transform_image

    image = np.zeros((150, 100, 3), np.uint8)  # h 150, w 100: resized to 32 x 48, padded to 48 wide
    image[90:96, 40:46] = 255
    out = transform_image(Image.fromarray(image), 32, 48)
    ys, xs = torch.nonzero(out[0] > 0.5, as_tuple=True)
    point = T.fit_tracks(np.array([[[42.5, 92.5]]], np.float32), 150, 100, 32, 48)[0, 0]
    assert abs(point[0] - xs.float().mean().item()) < 1 and abs(point[1] - ys.float().mean().item()) < 1


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_load_tracks_formats_and_errors(tmp_path):
    pts = np.stack([np.array([[10.0, 5.0], [30.0, 20.0]]) + f for f in range(3)]).astype(np.float32)
    demo = _npz(tmp_path / "demo.npz", trajectory=pts, width=np.int64(64), height=np.int64(32))
    points, vis, size = T.load_tracks(demo, num_frames=3)
    assert points.shape == (3, 2, 2) and vis is None and size == (32, 64)
    curation = np.concatenate([pts, np.ones((3, 2, 1), np.float32)], -1)
    points, vis, _ = T.load_tracks(_npz(tmp_path / "c.npz", tracks=curation, width=64, height=32))
    assert vis.shape == (3, 2)
    leaving = pts.copy()
    leaving[2, 0] = [-5.0, 4.0]  # tracks may leave the frame (the authors' demos do)
    T.load_tracks(_npz(tmp_path / "leave.npz", trajectory=leaving, width=64, height=32))
    cases = {
        "keys": ({"points": pts, "width": 64, "height": 32}, "'trajectory'"),
        "width": ({"trajectory": pts, "height": 32}, "'width'"),
        "shape": ({"trajectory": pts[..., :1], "width": 64, "height": 32}, r"\[F, P, 2\]"),
        "outside": ({"trajectory": pts + 100, "width": 64, "height": 32}, "never lies inside the 64x32 frame"),
    }
    for name, (arrays, message) in cases.items():
        with pytest.raises(LayerkitError, match=message):
            T.load_tracks(_npz(tmp_path / f"{name}.npz", **arrays))
    with pytest.raises(LayerkitError, match="3 frames of tracks, expected 16"):
        T.load_tracks(demo, num_frames=16)


def _two_objects(num_frames=3, size=10):
    masks = torch.zeros(2, num_frames, size, size, dtype=torch.bool)
    masks[0, :, :, : size // 2] = True
    masks[1, :, :, size // 2 :] = True
    return masks


def test_select_tracks_filters_by_object_and_visibility():
    masks = _two_objects()
    tracks = torch.tensor([
        [[1.0, 1.0, 1], [2.0, 2.0, 1], [1.0, 8.0, 0], [-3.0, 1.0, 1], [7.0, 7.0, 1], [6.0, 1.0, 1]],
        [[1.5, 1.0, 1], [7.0, 2.0, 1], [1.0, 8.0, 0], [1.0, 1.0, 1], [7.5, 7.0, 1], [6.0, 1.0, 1]],
        [[2.0, 1.0, 1], [8.0, 2.0, 1], [1.0, 8.0, 0], [1.0, 1.0, 1], [8.0, 7.0, 1], [3.0, 1.0, 1]],
    ])
    # 0 stays left: kept; 1 leaves for the right object (1/3 inside): dropped; 2 invisible: dropped;
    # 3 starts outside the frame: dropped; 4 stays right: kept; 5 is right 2/3 of the time (<= 0.8): dropped
    picked = T.select_tracks(tracks, masks, torch.Generator().manual_seed(0))
    assert picked.tolist() == [0, 4]
    assert T.assign_track_layers(tracks[0, picked, :2], masks[:, 0]).tolist() == [0, 1]
    assert T.assign_track_layers(torch.tensor([[20.0, 1.0]]), masks[:, 0]).tolist() == [-1]


def test_select_tracks_draws_moving_tracks_with_the_generator():
    masks = _two_objects(num_frames=2, size=20)[:1]
    start = torch.tensor([[float(i), float(i)] for i in range(10)])
    move = torch.zeros(10, 2)
    move[:3, 0] = torch.tensor([1.0, 2.0, 3.0])  # only tracks 0..2 move
    tracks = torch.cat([torch.stack([start, start + move]), torch.ones(2, 10, 1)], -1)
    seen = set()
    for seed in range(20):
        first = T.select_tracks(tracks, masks, torch.Generator().manual_seed(seed))
        again = T.select_tracks(tracks, masks, torch.Generator().manual_seed(seed))
        assert first.tolist() == again.tolist()
        assert 1 <= len(first) <= 3 and set(first.tolist()) <= {0, 1, 2}  # zero-weight tracks never drawn
        seen.add(tuple(first.tolist()))
    assert len(seen) > 1
    still = tracks.clone()
    still[1] = still[0]  # nothing moves: a tiny uniform weight keeps multinomial valid
    assert 1 <= len(T.select_tracks(still, masks, torch.Generator().manual_seed(1))) <= 3


# ----------------------------------------------------------------------------- layers


def test_pad_layers_and_validity():
    masks = torch.ones(2, 3, 1, 8, 6)
    padded, validity = L.pad_layers(masks, 4)
    assert padded.shape == (4, 3, 1, 8, 6) and validity.tolist() == [True, True, False, False]
    assert padded[2:].abs().max() == 0 and torch.equal(padded[:2], masks)
    with pytest.raises(LayerkitError, match="got 5 layers but the layer capacity is 4"):
        L.pad_layers(torch.ones(5, 3, 1, 8, 6), 4)
    with pytest.raises(LayerkitError, match="6x8 .* the frame is 12x10"):
        L.pad_layers(masks, 4, frame_size=(10, 12))


def test_motion_scores_static_then_normalised():
    raw = torch.tensor([0.05, 0.1, 15.0, 45.0, -1.0, 0.05])
    nonempty = torch.tensor([True, True, True, True, True, False])
    scores, static = L.normalise_motion_scores(raw, nonempty, static_threshold=0.1, max_score=30.0)
    assert static.tolist() == [True, False, False, False, False, False]
    assert scores.tolist() == pytest.approx([0.0, 0.1 / 30, 0.5, 1.0, -1.0, 0.05 / 30])
    for bad in (float("nan"), -2.0):
        with pytest.raises(LayerkitError, match="raw motion score of layer 1"):
            L.normalise_motion_scores(torch.tensor([1.0, bad]))
    assert L.check_motion_scores([0.0, 1.0, -1]).tolist() == [0.0, 1.0, -1.0]
    for bad in (1.5, -0.5, float("nan")):
        with pytest.raises(LayerkitError, match=r"motion_scores\[1\]"):
            L.check_motion_scores([0.2, bad])


def test_layer_regions_zero_outside_in_minus_one_one_space():
    keyframes = torch.full((2, 3, 4, 4), 0.75)
    masks = torch.zeros(3, 2, 1, 4, 4)
    masks[1, :, :, :2] = 1
    regions = L.layer_regions(keyframes, masks)
    assert regions.shape == (3, 2, 3, 4, 4)
    assert torch.all(regions[1, :, :, :2] == 0.5) and regions[1, :, :, 2:].abs().max() == 0
    assert regions[0].abs().max() == 0
    with pytest.raises(LayerkitError, match="masks"):
        L.layer_regions(keyframes, torch.zeros(3, 1, 1, 4, 4))


def test_latent_masks_bilinear_like_the_authors():
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :3] = 1  # downscale by 2 samples source columns 0.5 and 2.5
    out = L.latent_masks(mask, (2, 2))
    assert out.shape == (1, 1, 2, 2) and out[0, 0].tolist() == [[1.0, 0.5], [1.0, 0.5]]


def _keyframe_latents(n=2, k=2, c=2):
    latents = torch.zeros(1, n, k, c, 1, 1)
    masks = torch.zeros(1, n, k, 1, 1, 1)
    for layer in range(n):
        for key in range(k):
            latents[0, layer, key] = 10 * (layer + 1) + key + 1  # 11, 12 | 21, 22
            masks[0, layer, key] = 0.1 * (layer + 1) + 0.01 * (key + 1)
    return latents, masks


def _table(latents):
    return latents[0, :, :, 0, 0, 0].tolist()


def test_assignment_i2v_table():
    latents, masks = _keyframe_latents(k=1)
    out, mask = L.motion_based_assignment(latents, masks, torch.tensor([[False, True]]), 4, "i2v")
    assert out.shape == (1, 2, 4, 2, 1, 1) and mask.shape == (1, 2, 4, 1, 1, 1)
    assert _table(out) == [[11, 0, 0, 0], [21, 21, 21, 21]]  # dynamic: zero frames; static: repeated
    assert torch.allclose(mask[0, :, :, 0, 0, 0], torch.tensor([[0.11, 0, 0, 0], [0.21, 0.21, 0.21, 0.21]]))
    # the loader's i2v layout (K = 2, both keyframes frame 0) uses keyframe 0 only
    latents2, masks2 = _keyframe_latents(k=2)
    out2, _ = L.motion_based_assignment(latents2, masks2, torch.tensor([[True, False]]), 3, "i2v")
    assert _table(out2) == [[11, 11, 11], [21, 0, 0]]


def test_assignment_interpolation_table():
    latents, masks = _keyframe_latents()
    out, mask = L.motion_based_assignment(latents, masks, torch.tensor([[False, True]]), 4, "interpolate")
    assert _table(out) == [[11, 0, 0, 12], [21, 21, 22, 22]]
    assert torch.allclose(mask[0, :, :, 0, 0, 0], torch.tensor([[0.11, 0, 0, 0.12], [0.21, 0.21, 0.22, 0.22]]))
    odd, _ = L.motion_based_assignment(latents, masks, torch.tensor([[True, False]]), 5, "interpolate")
    assert _table(odd) == [[11, 11, 12, 12, 12], [21, 0, 0, 0, 22]]


def test_assignment_mixed_modes_in_a_batch_and_errors():
    latents, masks = _keyframe_latents()
    latents, masks = latents.repeat(2, 1, 1, 1, 1, 1), masks.repeat(2, 1, 1, 1, 1, 1)
    static = torch.tensor([[False, True], [False, True]])
    out, _ = L.motion_based_assignment(latents, masks, static, 4, ["i2v", "interpolate"])
    assert out[0, :, :, 0, 0, 0].tolist() == [[11, 0, 0, 0], [21, 21, 21, 21]]
    assert out[1, :, :, 0, 0, 0].tolist() == [[11, 0, 0, 12], [21, 21, 22, 22]]
    with pytest.raises(LayerkitError, match="mode is 'loop'"):
        L.motion_based_assignment(latents, masks, static, 4, "loop")
    with pytest.raises(LayerkitError, match="2 keyframes"):
        L.motion_based_assignment(latents[:, :, :1], masks[:, :, :1], static, 4, "interpolate")
    with pytest.raises(LayerkitError, match="layer_static"):
        L.motion_based_assignment(latents, masks, static[:, :1], 4, "i2v")


# ----------------------------------------------------------------------------- demo folders


def _image(path, array):
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


DEMO = {
    "mode": "i2v", "layer_capacity": 4, "motion_scores": [-1, 0.6, -1, -1],
    "layer_static": [False, True, False, False], "layer_validity": [True, True, True, False],
    "sketch_layer_index": 0, "traj_layer_index": 2, "prompt": "an anime scene.", "n_prompt": "", "fps": 24,
    "seed": 57, "H": 32, "W": 48, "L": 4,
}


def _write_yaml(path, fields):
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.create(fields), path)


def _demo_folder(root, **changes):
    """A 96 x 64 demo (resized to 48 x 32, no crop): two masks, a 4-frame sketch, 2 tracks."""
    folder = root / "demo"
    folder.mkdir()
    rng = np.random.default_rng(0)
    _image(folder / "first_frame.jpg", rng.uniform(0, 255, (64, 96, 3)))
    _image(folder / "last_frame.png", rng.uniform(0, 255, (64, 96, 3)))
    left = np.zeros((64, 96))
    left[:, :48] = 255
    _image(folder / "layer_0.jpg", left)
    _image(folder / "layer_1.png", 255 - left)
    _image(folder / "layer_1_last.png", left)
    sketch = np.full((4, 64, 96, 3), 255, np.uint8)
    sketch[:, 20:24, 10:80] = 0
    write_video(folder / "sketch.mp4", sketch, fps=8)
    trajectory = np.stack([[[20.0 + 4 * f, 10.0], [60.0, 30.0 + 2 * f]] for f in range(4)]).astype(np.float32)
    np.savez(folder / "trajectory.npz", trajectory=trajectory, width=np.int64(96), height=np.int64(64))
    _write_yaml(folder / "demo.yaml", {**DEMO, **changes})
    return folder


def test_read_demo_i2v(tmp_path):
    folder = _demo_folder(tmp_path)
    s = read_demo(folder)
    assert set(SAMPLE_KEYS) <= set(s) and s["mode"] == "i2v" and s["fps"] == 24
    assert s["keyframes"].shape == (1, 3, 32, 48) and s["video"].shape == (4, 3, 32, 48)
    assert torch.equal(s["video"][3], s["keyframes"][0])
    assert s["layer_masks"].shape == (4, 1, 1, 32, 48)
    assert s["layer_masks"][0, 0, 0, :, :24].min() == 1 and s["layer_masks"][0, 0, 0, :, 24:].max() == 0
    assert s["layer_masks"][1, 0, 0, :, 24:].min() == 1 and s["layer_masks"][2:].max() == 0  # missing = empty
    assert s["layer_validity"].tolist() == [True, True, True, False]
    assert s["layer_static"].tolist() == [False, True, False, False]
    assert s["motion_scores"].tolist() == pytest.approx([-1, 0.6, -1, -1])
    assert s["sketch"][0, :, :, 10:12, 5:40].mean() < 0.3 and s["sketch"][1:].min() == 1
    assert torch.equal(s["tracks"][:, 0], torch.tensor([[10.0 + 2 * f, 5.0] for f in range(4)]))  # scale 0.5
    assert s["track_layer"].tolist() == [2, 2]
    assert torch.equal(s["trajectory"], T.trajectory_maps(s["tracks"], [2, 2], 32, 48, 4))
    assert s["trajectory"][2, :, 0].max() > 0.9 and s["trajectory"][[0, 1, 3], :, 0].max() == -1
    assert s["negative_prompt"] == "" and s["sampling"]["seed"] == 57 and s["sampling"]["guidance_scale"] == 7.5


def test_read_demo_interpolation_and_authors_yaml_layout(tmp_path):
    folder = _demo_folder(tmp_path, mode="interpolate")
    s = read_demo(folder)
    assert s["keyframes"].shape == (2, 3, 32, 48) and s["keyframe_indices"].tolist() == [0, 3]
    assert s["layer_masks"][1, 1, 0, :, :24].min() == 1 and s["layer_masks"][0, 1].max() == 0
    assert torch.equal(s["video"][1], s["keyframes"][0]) and torch.equal(s["video"][2], s["keyframes"][1])
    # the authors' layout: scripts/demoN.yaml naming the folder from the repository root
    (tmp_path / "scripts").mkdir()
    fields = {**DEMO, "mode": "interpolate", "demo_dir": "demo", "pretrained_model_path": "x",
              "mixed_precision": "bf16", "enable_xformers_memory_efficient_attention": True}
    _write_yaml(tmp_path / "scripts" / "demo1.yaml", fields)
    again = read_demo(tmp_path / "scripts" / "demo1.yaml")
    assert torch.equal(again["trajectory"], s["trajectory"]) and torch.equal(again["layer_masks"], s["layer_masks"])
    # settings given as a mapping; keyword sizes apply where the settings have none
    small = {k: v for k, v in DEMO.items() if k not in ("H", "W")}
    assert read_demo(folder, small, height=16, width=24)["keyframes"].shape == (1, 3, 16, 24)


def _bad_demo(tmp_path, message, edit=None, **changes):
    folder = _demo_folder(tmp_path, **changes)
    if edit is not None:
        edit(folder)
    with pytest.raises(LayerkitError, match=message):
        read_demo(folder)


@pytest.mark.parametrize("name,message,changes", [
    ("mode", "field mode is 'loop'", {"mode": "loop"}),
    ("score", r"motion_scores\[1\] is 1.5", {"motion_scores": [-1, 1.5, -1, -1]}),
    ("score_nan", r"motion_scores\[0\] is nan", {"motion_scores": [float("nan"), 0.5, -1, -1]}),
    ("capacity", "motion_scores lists 5 layers but the layer capacity is 4", {"motion_scores": [-1] * 5}),
    ("short", "layer_static lists 3 layers", {"layer_static": [False] * 3}),
    ("flags", "layer_validity", {"layer_validity": [1, 0, 0, 0]}),
    ("unknown", "unknown field motion_score;", {"motion_score": [0.1]}),
    ("prompt", "lacks the field prompt", {"prompt": None}),
    ("sketch_index", "sketch_layer_index is 4; sketch.mp4 needs a layer index", {"sketch_layer_index": 4}),
    ("traj_index", "traj_layer_index is None; trajectory.npz", {"traj_layer_index": None}),
])
def test_read_demo_bad_fields(tmp_path, name, message, changes):
    _bad_demo(tmp_path, message, **changes)


def test_read_demo_bad_files(tmp_path):
    cases = [
        ("no first_frame.jpg", lambda f: (f / "first_frame.jpg").unlink(), {}),
        ("no last_frame.jpg \\(mode interpolate needs it\\)", lambda f: (f / "last_frame.png").unlink(),
         {"mode": "interpolate"}),
        ("sketch.mp4' has 3 frames, expected L = 4",
         lambda f: write_video(f / "sketch.mp4", np.full((3, 64, 96, 3), 255, np.uint8), overwrite=True), {}),
        ("mask 'layer_1.png' is 48x64 but first_frame is 96x64",
         lambda f: _image(f / "layer_1.png", np.zeros((64, 48))), {}),
        ("masks for 6 layers \\(layer_5.jpg\\) but the layer capacity is 4",
         lambda f: _image(f / "layer_5.jpg", np.zeros((64, 96))), {}),
        ("trajectory.npz' has 2 frames of tracks, expected 4",
         lambda f: np.savez(f / "trajectory.npz", trajectory=np.zeros((2, 1, 2), np.float32), width=96, height=64), {}),
        ("has no settings file", lambda f: (f / "demo.yaml").unlink(), {}),
    ]
    for i, (message, edit, changes) in enumerate(cases):
        root = tmp_path / str(i)
        root.mkdir()
        _bad_demo(root, message, edit, **changes)
    with pytest.raises(LayerkitError, match="DiT variant"):
        folder = tmp_path / "dit"
        folder.mkdir()
        _write_yaml(folder / "config.yaml", {"prompt": "x", "first_frame_path": "a.jpg", "layer": []})
        read_demo(folder)


# ----------------------------------------------------------------------------- shapes world and schema


def test_shapes_sample_shapes_and_ground_truth():
    for mode, k in (("i2v", 1), ("interpolate", 2)):
        s = shapes_layeranimate_sample(3, mode=mode, generator=torch.Generator().manual_seed(0), config=SMALL)
        validate_sample(s)
        F_, H, W = 6, 32, 32
        assert s["video"].shape == (F_, 3, H, W) and s["keyframes"].shape == (k, 3, H, W)
        assert s["layer_masks"].shape == (4, k, 1, H, W) and s["trajectory"].shape == (4, F_, 3, H, W)
        assert s["sketch"].shape == (4, F_, 3, H, W)
        assert s["layer_validity"].tolist() == [True, True, True, False]
        assert s["motion_scores"][3] == -1 and not s["layer_static"][3]
        assert torch.equal(s["keyframes"], s["video"][s["keyframe_indices"]])
        assert s["layer_masks"][:3].sum(0).eq(1).all()  # a partition on every keyframe
        sketch = s["sketch"][:3]
        assert sketch.min() < 0.5 and (sketch == 1).float().mean() > 0.5  # dark lines on white
        assert torch.equal(sketch[:, :, 0], sketch[:, :, 2])
        truth = s["ground_truth"]
        assert truth["layer_masks"].shape == (4, F_, 1, H, W) and truth["tracks"].shape[:2] == (4, F_)
        assert truth["motion_scores"][3] == -1 and len(truth["prompts"]) == 4
        assert s["track_layer"].numel() and torch.equal(
            s["trajectory"], T.trajectory_maps(s["tracks"], s["track_layer"], H, W, 4))
    s2 = validate_sample(two_keyframes(s))  # s is the interpolation sample: unchanged
    assert s2 is s
    i2v = shapes_layeranimate_sample(3, mode="i2v", generator=torch.Generator().manual_seed(0), config=SMALL)
    pair = validate_sample(two_keyframes(i2v))
    assert pair["keyframe_indices"].tolist() == [0, 0] and torch.equal(pair["layer_masks"][:, 1], i2v["layer_masks"][:, 0])
    with pytest.raises(LayerkitError, match="got 3 layers but the layer capacity is 2"):
        shapes_layeranimate_sample(3, mode="i2v", generator=torch.Generator(), config=SMALL, capacity=2)


def test_static_layer_and_scaled_max_score():
    cfg = ShapesConfig(num_frames=4, height=32, width=32, num_sprites=1, static_prob=1.0, background_static_prob=1.0)
    s = shapes_layeranimate_sample(0, mode="i2v", generator=torch.Generator().manual_seed(0), config=cfg)
    assert s["layer_static"].tolist() == [True, True, False, False]
    assert s["motion_scores"].tolist() == [0.0, 0.0, -1.0, -1.0]


def test_build_sample_rejects_mismatches():
    video = torch.rand(4, 3, 8, 8)
    masks = torch.ones(1, 4, 1, 8, 8)
    with pytest.raises(LayerkitError, match="got 2 motion scores for 1 layers"):
        build_sample(video, masks, [1.0, 2.0], mode="i2v", prompt="", fps=8)
    with pytest.raises(LayerkitError, match="sketches"):
        build_sample(video, masks, [1.0], mode="i2v", prompt="", fps=8, sketches=torch.ones(1, 3, 3, 8, 8))
    with pytest.raises(LayerkitError, match="keyframe_indices"):
        bad = build_sample(video, masks, [1.0], mode="i2v", prompt="", fps=8)
        bad["keyframe_indices"] = torch.tensor([1])
        validate_sample(bad)


# ----------------------------------------------------------------------------- training choices


def _full_sample(seed=3, mode="i2v"):
    return shapes_layeranimate_sample(seed, mode=mode, generator=torch.Generator().manual_seed(seed), config=SMALL)


def test_choices_are_deterministic_and_have_the_papers_rates():
    a = C.draw_training_choices(torch.Generator().manual_seed(5))
    b = C.draw_training_choices(torch.Generator().manual_seed(5))
    assert a == b and len(a.dropped) == 4 and len(a.controls) == 4
    g = torch.Generator().manual_seed(0)
    draws = [C.draw_training_choices(g) for _ in range(2000)]
    modes = sum(d.mode == "i2v" for d in draws) / 2000
    drops = sum(sum(d.dropped) for d in draws) / 8000
    flips = sum(d.flip for d in draws) / 2000
    counts = {c: sum(d.controls.count(c) for d in draws) / 8000 for c in C.CONTROLS}
    assert abs(modes - 0.5) < 0.04 and abs(drops - 0.1) < 0.02 and abs(flips - 0.5) < 0.04
    assert counts["motion_score"] == pytest.approx(0.2, abs=0.02)
    assert counts["trajectory"] == pytest.approx(0.4, abs=0.02) and counts["sketch"] == pytest.approx(0.4, abs=0.02)
    with pytest.raises(LayerkitError, match="p_drop"):
        C.draw_training_choices(g, p_drop=1.5)


def test_drop_layers_makes_them_invalid_and_control_free():
    s = _full_sample()
    out = C.drop_layers(s, [False, True, False, True])
    assert out["layer_validity"].tolist() == [True, False, True, False]
    assert out["layer_masks"][1].max() == 0 and out["motion_scores"][1] == -1 and not out["layer_static"][1]
    assert out["sketch"][1].min() == 1 and out["trajectory"][1, :, 0].max() == -1
    assert 1 not in out["track_layer"].tolist()
    assert torch.equal(out["trajectory"], C.render_trajectory(out))
    assert torch.equal(s["layer_masks"][1], _full_sample()["layer_masks"][1])  # the input is not changed


def test_keep_one_control_per_layer():
    s = _full_sample()
    out = C.keep_one_control(s, ["motion_score", "trajectory", "sketch", "trajectory"])
    assert out["motion_scores"][0] == s["motion_scores"][0] and (out["motion_scores"][1:] == -1).all()
    assert set(out["track_layer"].tolist()) == {1} and out["trajectory"][[0, 2, 3], :, 0].max() == -1
    # rendered again: offsets normalised by layer 1's own largest offset
    alone = T.trajectory_maps(s["tracks"][:, s["track_layer"] == 1], [1] * int((s["track_layer"] == 1).sum()), 32, 32, 4)
    assert torch.equal(out["trajectory"], alone)
    assert out["sketch"][2].min() < 1 and out["sketch"][[0, 1, 3]].min() == 1
    with pytest.raises(LayerkitError, match="controls"):
        C.keep_one_control(s, ["colour"] * 4)


def test_flip_consistency():
    s = _full_sample(mode="interpolate")
    f = C.hflip_sample(s)
    for key in ("video", "keyframes", "layer_masks", "sketch"):
        assert torch.equal(f[key], s[key].flip(-1)), key
    assert torch.equal(f["trajectory"][:, :, 0], s["trajectory"][:, :, 0].flip(-1))
    assert torch.equal(f["trajectory"][:, :, 1], -s["trajectory"][:, :, 1].flip(-1))
    assert torch.equal(f["trajectory"][:, :, 2], s["trajectory"][:, :, 2].flip(-1))
    assert torch.equal(f["tracks"][..., 0], 31 - s["tracks"][..., 0])
    assert torch.equal(f["ground_truth"]["layer_masks"], s["ground_truth"]["layer_masks"].flip(-1))
    assert torch.equal(f["ground_truth"]["tracks"][..., 0], 31 - s["ground_truth"]["tracks"][..., 0])
    back = C.hflip_sample(f)
    for key in ("video", "layer_masks", "sketch", "trajectory"):
        assert torch.equal(back[key], s[key]), key
    assert torch.allclose(back["tracks"], s["tracks"])


def test_training_samples_are_generator_deterministic():
    a = shapes_training_sample(7, torch.Generator().manual_seed(11), config=SMALL)
    b = shapes_training_sample(7, torch.Generator().manual_seed(11), config=SMALL)
    validate_sample(a)
    for key in SAMPLE_KEYS:
        assert (a[key] == b[key]) if isinstance(a[key], str | int) else torch.equal(a[key], b[key]), key
    modes = {shapes_training_sample(7, torch.Generator().manual_seed(seed), config=SMALL)["mode"] for seed in range(8)}
    assert modes == {"i2v", "interpolate"}
    s = _full_sample(mode="i2v")
    with pytest.raises(LayerkitError, match="build the sample in the drawn mode"):
        C.apply_training_choices(s, C.TrainingChoices("interpolate", (False,) * 4, ("sketch",) * 4, False))
