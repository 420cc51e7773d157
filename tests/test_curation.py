"""Layer curation (issue 11): steps, merging, the clip format and ``layerkit curate`` on shapes-world videos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from layerkit_plugins.curation import evaluate as ev
from layerkit_plugins.curation.merge import merge_layers, ward_groups

from layerkit.data.shapes import ShapesConfig, make_sample
from layerkit.errors import LayerkitError
from layerkit.io.video import write_video

SMALL = ShapesConfig(num_frames=16, height=64, width=64, num_sprites=2)
ETA_F = "cuts.motion_coherence.eta_f=0.8"  # the paper's 85 px is for full-size footage; 64 px clips need less


def frames_of(seed: int, cfg: ShapesConfig = SMALL) -> np.ndarray:
    return ev.frames_uint8(make_sample(seed, cfg))


def spliced(seed: int, cfg: ShapesConfig = SMALL) -> np.ndarray:
    a, b = frames_of(seed, cfg), frames_of(seed + 10_000, cfg)
    half = len(a) // 2
    return np.concatenate([a[:half], b[half:]])


# ------------------------------------------------------------------------------ registry and config


def test_plugin_registers_steps_command_and_config(registry):
    from layerkit.config import compose

    names = set(registry.names("curation_step"))
    assert {"segment.colour_motion", "segment.sam2", "flow.opencv", "flow.raft", "track.lucas_kanade",
            "track.cotracker3", "sketch.canny", "sketch.lineart", "cuts.motion_coherence", "cuts.scenedetect"} <= names
    assert "curate" in registry.components["command"]
    cfg = compose("curate", ["merge.eta_s=0.5"], registry)
    assert cfg.segmenter.name == "segment.colour_motion" and cfg.flow.name == "flow.opencv"
    assert cfg.segmenter.colour_motion_tolerance == 0.5  # follows merge.eta_s
    from layerkit_plugins.curation.pipeline import build_steps

    steps = build_steps(cfg, registry)
    assert [s.role for s in (steps.flow, steps.segmenter, steps.tracker, steps.sketch)] == \
        ["flow", "segmenter", "tracker", "sketch"]
    assert list(steps.cuts) == ["motion_coherence"]  # scenedetect is opt-in


def test_a_step_in_the_wrong_slot_is_refused(registry):
    from layerkit_plugins.curation.pipeline import build_steps

    from layerkit.config import compose

    cfg = compose("curate", ["flow.name=sketch.canny", "~flow.method", "~flow.preset", "~flow.finest_scale",
                             "~flow.patch_size", "~flow.patch_stride", "~flow.min_size"], registry)
    with pytest.raises(LayerkitError, match="is a sketch, not a flow"):
        build_steps(cfg, registry)


# ------------------------------------------------------------------------------ merging


def loader_rule(scores, capacity, eta_s):
    """The released loader's loop restated plainly: walk Ward's merges in order; stop once within
    capacity and (the merge distance exceeds eta_s or only two groups are left)."""
    from scipy.cluster.hierarchy import linkage

    n = len(scores)
    groups = {i: {i} for i in range(n)}
    for row, (a, b, dist, _) in enumerate(linkage(np.reshape(scores, (-1, 1)), "ward")):
        if len(groups) <= capacity and (dist > eta_s or len(groups) <= 2):
            break
        groups[n + row] = groups.pop(int(a)) | groups.pop(int(b))
    return sorted(sorted(g) for g in groups.values())


def test_ward_merging_follows_the_loader_rule():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scores = rng.gamma(1.0, 2.0, size=rng.integers(2, 12))
        capacity, eta_s = int(rng.integers(1, 6)), float(rng.choice([0.5, 1.0, 3.0]))
        ours = sorted(sorted(g) for g in ward_groups(scores, capacity, eta_s))
        assert ours == loader_rule(scores, capacity, eta_s)
    assert sorted(map(sorted, ward_groups(np.array([0.0, 0.1, 5.0, 5.2]), 4, 1.0))) == [[0, 1], [2, 3]]
    assert len(ward_groups(np.array([0.0, 0.1, 0.2]), 4, 1.0)) == 2  # never below two once within capacity
    assert len(ward_groups(np.array([0.0, 3.0, 6.0, 9.0, 12.0, 15.0]), 4, 1.0)) == 4  # capacity forces merges


def test_merged_layers_partition_frames_with_mean_scores_and_background_first():
    labels = np.zeros((3, 8, 8), np.int32)
    labels[:, :4, :4], labels[:, 4:, 4:], labels[:, :4, 4:] = 1, 2, 3
    magnitude = np.zeros((2, 8, 8), np.float32)
    magnitude[:, :4, :4], magnitude[:, 4:, 4:], magnitude[:, :4, 4:] = 4.0, 5.0, 0.2
    layers = merge_layers(labels, magnitude, capacity=4, eta_s=1.0)
    assert layers.masks.sum(0).min() == 1 and layers.masks.sum(0).max() == 1
    assert layers.elements[0] == [0, 3]  # the complement (0) and the still element 3 form the background
    assert layers.scores[0] == pytest.approx(np.mean([0.0, 0.2]))
    assert sorted(layers.elements[1:]) == [[1, 2]] and layers.scores[1] == pytest.approx(4.5)


# ------------------------------------------------------------------------------ steps on the shapes world


def test_default_steps_recover_shapes_world_layers():
    from layerkit_plugins.curation.flow import OpenCVFlow
    from layerkit_plugins.curation.segment import ColourMotionSegmenter

    flow, seg = OpenCVFlow(), ColourMotionSegmenter(colour_motion_tolerance=1.0)
    ious = []
    for seed in range(6):
        sample = make_sample(seed, ShapesConfig(num_frames=16, height=64, width=64, num_sprites=1 + seed % 3))
        frames = ev.frames_uint8(sample)
        f = flow(frames)
        layers = merge_layers(seg(frames, f), f.magnitude, 4, 1.0)
        truth = ev.truth_groups(sample, ev.truth_flow_scores(sample, f.magnitude), 4, 1.0)
        ious.append(ev.layer_iou(layers.masks, truth))
    print(f"layer IoU per clip: {np.round(ious, 3).tolist()}, mean {np.mean(ious):.3f}")
    assert np.mean(ious) >= 0.8


def test_motion_coherence_drops_spliced_clips_and_keeps_clean_ones():
    from layerkit_plugins.curation.cuts import MotionCoherenceCut
    from layerkit_plugins.curation.flow import OpenCVFlow

    flow, rule = OpenCVFlow(), MotionCoherenceCut(eta_f=0.8)
    for seed in range(3):
        clean, joined = frames_of(seed), spliced(seed)
        assert not rule(clean, flow(clean)).cuts
        report = rule(joined, flow(joined))
        assert report.cuts and abs(report.cuts[0] - 8) <= 1 and "eta_f" in report.reason


def test_scenedetect_cuts_and_a_clear_sentence_without_it(monkeypatch):
    pytest.importorskip("scenedetect")
    from layerkit_plugins.curation.cuts import SceneDetectCut

    assert SceneDetectCut()(spliced(3)).cuts == [8]
    import sys

    monkeypatch.setitem(sys.modules, "scenedetect", None)
    with pytest.raises(LayerkitError, match=r"pip install 'layerkit\[curate\]'"):
        SceneDetectCut()


def test_lucas_kanade_tracks_and_the_per_layer_rule():
    from layerkit_plugins.curation.flow import OpenCVFlow
    from layerkit_plugins.curation.track import LucasKanadeTracker, layer_tracks

    errors = []
    for seed in range(4):
        sample = make_sample(seed, ShapesConfig(num_frames=16, height=64, width=64, num_sprites=1))
        frames = ev.frames_uint8(sample)
        tracks, vis = LucasKanadeTracker()(frames, ev.track_queries(sample), OpenCVFlow()(frames))
        assert tracks.shape[0] == 16 and vis.shape == tracks.shape[:2]
        errors.append(ev.track_errors(sample, tracks))
    errors = np.concatenate(errors)
    print(f"track error over {errors.size} visible truth points: median {np.median(errors):.2f} px")
    assert np.median(errors) < 1.0

    masks = np.zeros((2, 4, 10, 10), bool)
    masks[0], masks[1, :, :, 5:] = True, True
    masks[0, :, :, 5:] = False
    still = np.array([[2.0, 2.0]] * 4)  # stays in layer 0
    moving = np.array([[6.0, 2.0], [7.0, 2.0], [8.0, 2.0], [9.0, 2.0]])  # stays in layer 1, moves
    leaving = np.array([[4.0, 8.0], [6.0, 8.0], [7.0, 8.0], [8.0, 8.0]])  # starts in layer 0, leaves it
    pts = np.stack([still, moving, leaving], 1)
    kept = layer_tracks(pts, np.ones((4, 3)), masks, per_layer=(1, 3), seed=0)
    assert kept.tracks.shape == (4, 2, 3) and sorted(kept.layer.tolist()) == [0, 1]
    assert not any(np.allclose(kept.tracks[:, i, :2], leaving) for i in range(2))


def test_sketch_lines_follow_edges():
    from layerkit_plugins.curation.sketch import CannySketch

    sample = make_sample(2, SMALL)
    lines = CannySketch()(ev.frames_uint8(sample))
    truth = sample["sketches"].amax(0)[:, 0].numpy() > 0.5
    assert lines.shape == truth.shape and lines[truth].mean() > 3 * lines[~truth].mean()


def test_rle_round_trip():
    from layerkit_plugins.curation.clip import decode_masks, encode_masks

    masks = np.random.default_rng(0).random((5, 7, 9)) > 0.5
    rles = encode_masks(masks)
    assert len(rles) == 5 and isinstance(rles[0]["counts"], str)
    assert np.array_equal(decode_masks(json.loads(json.dumps(rles))), masks)


# ------------------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Two clean shapes-world videos (with captions), one spliced, one too short, one broken."""
    root = tmp_path_factory.mktemp("videos")
    for seed in (0, 1):
        sample = make_sample(seed, SMALL)
        write_video(root / f"clean{seed}.mp4", ev.frames_uint8(sample), 8)
        (root / f"clean{seed}.txt").write_text(sample["prompt"])
    write_video(root / "nested" / "spliced.mp4", spliced(3), 8)
    write_video(root / "short.mp4", frames_of(4)[:6], 8)
    (root / "broken.mp4").write_bytes(b"not a video at all")
    return root


def curate_main(*args: str) -> int:
    from layerkit_plugins.curation.cli import main

    return main([*args, "progress=false"])


def test_curate_a_folder_resumes_and_reads_back(videos, tmp_path, capsys):
    from layerkit_plugins.curation import read_clip

    out = tmp_path / "out"
    assert curate_main(str(videos), str(out), ETA_F) == 0
    text = capsys.readouterr().out
    assert "5 clip(s) in: 2 kept (2 written, 0 already done), 3 dropped" in text
    for kind in ("cut (motion_coherence)", "too short", "unreadable"):
        assert f"dropped 1: {kind}" in text
    clips = sorted(p.name for p in out.iterdir() if (p / "manifest.json").is_file())
    assert clips == ["clean0_00000", "clean1_00000"]
    assert not (out / ".staging").exists()
    reasons = {json.loads(p.read_text())["kind"]: json.loads(p.read_text())["reason"] for p in (out / ".dropped").iterdir()}
    assert "a clip needs 16" in reasons["too short"] and "not a readable video" in reasons["unreadable"]

    clip = read_clip(out / "clean0_00000")
    n = clip["num_layers"]
    assert clip["frames"].shape == (16, 3, 64, 64) and clip["frames"].min() >= 0 and clip["frames"].max() <= 1
    assert clip["layer_masks"].shape == (n, 16, 1, 64, 64) and 2 <= n <= 4
    assert clip["layer_masks"].sum(0).eq(1).all()  # a partition of every frame
    assert clip["motion_scores"].shape == (n,) and clip["sketches"].shape == (n, 16, 1, 64, 64)
    assert clip["tracks"].shape[0] == 16 and clip["tracks"].shape[2] == 3
    assert clip["track_layer"].shape == clip["tracks"].shape[1:2]
    assert clip["prompt"] == make_sample(0, SMALL)["prompt"] and clip["fps"] == pytest.approx(8.0)
    assert (out / "clean0_00000" / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / "record.json").read_text())
    assert record["command"] == "curate" and record["summary"]["kept"] == 2

    before = (out / "clean0_00000" / "manifest.json").stat().st_mtime_ns
    assert curate_main(str(videos), str(out), ETA_F) == 0
    text = capsys.readouterr().out
    assert "2 kept (0 written, 5 already done), 3 dropped" in text and "too short (earlier run)" in text
    assert (out / "clean0_00000" / "manifest.json").stat().st_mtime_ns == before


def test_curate_bad_input_one_sentence_each(videos, tmp_path, capsys):
    out = tmp_path / "out"
    cases = [
        ((str(videos), str(videos / "curated")), "lies inside input"),
        ((str(videos / "short.mp4"), str(out)), "has 6 frames; a clip needs 16"),
        ((str(videos / "broken.mp4"), str(out)), "not a readable video"),
        ((str(tmp_path / "missing"), str(out)), "does not exist"),
        ((str(videos), str(out), "flow=raft", f"flow.path={tmp_path / 'nope.pth'}"), "does not exist"),
        ((str(videos), str(out), "flow=raft"), "none were given: set flow.path="),
        ((str(videos), str(out), "segmenter=sam2", f"segmenter.path={tmp_path}"), "has no config.json"),
    ]
    for args, sentence in cases:
        assert curate_main(*args) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("layerkit: error: ") and sentence in err and err.count("\n") == 0, err
    assert not out.exists()  # nothing half-written
    assert not (videos / "curated").exists()


def test_zero_frame_video_is_refused(tmp_path, capsys):
    import av

    empty = tmp_path / "empty.mp4"
    container = av.open(str(empty), "w")
    stream = container.add_stream("libx264", rate=8)
    stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
    container.start_encoding()
    for packet in stream.encode(None):  # a header and no frame
        container.mux(packet)
    container.close()
    assert curate_main(str(empty), str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert f"could not decode '{empty}'" in err and ("no video frames" in err or "no video stream" in err)
    assert not (tmp_path / "out").exists()


def test_curate_subprocess_single_video(tmp_path):
    from conftest import run_cli

    video = tmp_path / "one.mp4"
    write_video(video, frames_of(7, ShapesConfig(num_frames=12, height=48, width=48)), 8)
    result = run_cli("curate", str(video), str(tmp_path / "out"), "clip.num_frames=8", "tracks.grid=16",
                     "progress=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "1 clip(s) in: 1 kept" in result.stdout
    assert (tmp_path / "out" / "one_00000" / "manifest.json").is_file()
