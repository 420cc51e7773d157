"""The toy LayerAnimate: its evaluator scores the true clips (near) perfectly and a frozen video
badly; held-out inputs with one control per layer; the w/o-MA ablation switch acts; the committed
toy samples with no other argument and records the evaluator's figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from layerkit.config import compose

WEIGHTS = Path(__file__).resolve().parents[1] / "plugins" / "layerkit_plugins" / "layeranimate" / "toy" / "weights"
needs_weights = pytest.mark.skipif(not (WEIGHTS / "layeranimate.safetensors").is_file(),
                                   reason="the toy LayerAnimate weights are not committed")


def held_out(n: int = 6, mode: str = "i2v", controls: str = "all") -> dict:
    from layerkit_plugins.layeranimate.task import LayerAnimateTask

    task = LayerAnimateTask(mode=mode)
    samples = task.sample_inputs({"num_samples": n, "seed": 0, "controls": controls}, height=32, width=32,
                                 num_frames=8)
    for s in samples:  # what the control's prepare drops: drawn into the trajectory map already
        s.pop("tracks")
        s.pop("track_layer")
    return task.collate(samples)


@pytest.mark.parametrize("mode", ["i2v", "interpolate"])
def test_evaluator_scores_the_true_clips_near_perfectly_and_a_frozen_video_badly(mode):
    from layerkit_plugins.layeranimate.evaluate import evaluate_layers

    batch = held_out(mode=mode)
    truth = evaluate_layers([{"video": v} for v in batch["video"]], batch)
    print(json.dumps(truth))
    assert truth["frame_error"] == 0 and truth["keyframe_error"] == 0
    assert truth["sprite_identity"] >= 0.9 and truth["trajectory_found"] >= 0.9
    assert truth["trajectory_error"] < 1.0 and truth.get("static_drift", 0.0) < 0.02
    assert truth["motion_rank_corr"] > 0.8
    frozen = evaluate_layers([{"video": v[:1].expand_as(v)} for v in batch["video"]], batch)
    assert frozen["frame_error"] > 0.01 and frozen["trajectory_error"] > truth["trajectory_error"] + 1.0


def test_held_out_inputs_take_one_control_per_layer_or_a_named_one():
    every = held_out(controls="all")
    one = held_out(controls="one")
    again = held_out(controls="one")
    traj = held_out(controls="trajectory")
    valid = every["layer_validity"]
    for batch in (one, again):
        has_score = (batch["motion_scores"] >= 0) & valid
        has_sketch = (batch["sketch"] < 1).flatten(2).any(-1) & valid
        assert not (has_score & has_sketch).any(), "one control per layer"
    assert torch.equal(one["motion_scores"], again["motion_scores"]), "the same draw for a seed"
    assert ((traj["motion_scores"] < 0) | ~valid).all() and (traj["sketch"] == 1).all()
    with pytest.raises(Exception, match="inputs.controls is 'two'"):
        held_out(controls="two")


def test_without_motion_based_assignment_no_layer_repeats_over_the_frames(registry):
    from layerkit.pipeline import build_parts

    cfg = compose("sample", ["+experiment=layeranimate", "backbone=tooncrafter_tiny"], registry)
    parts = build_parts(cfg, registry, training=False)
    control = next(iter(parts.controls.values()))
    assert control.motion_assignment is True
    ablated = compose("sample", ["+experiment=layeranimate", "backbone=tooncrafter_tiny",
                                 "controls.layers.motion_assignment=false"], registry)
    assert ablated.controls.layers.motion_assignment is False
    names = {n for n, _ in compose("train", ["+experiment=toy_layeranimate_no_ma"], registry).items()}
    assert "controls" in names


@needs_weights
def test_committed_toy_fits_the_budget_and_samples_with_no_other_argument(tmp_path):
    from conftest import run_cli

    size = sum(p.stat().st_size for p in WEIGHTS.rglob("*") if p.is_file())
    assert size <= 10 * 2**20, f"toy LayerAnimate weights are {size / 2**20:.1f} MB"
    out = tmp_path / "s"
    result = run_cli("sample", "+experiment=toy_layeranimate", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((out / "record.json").read_text())
    assert {"sprite_identity", "frame_error", "keyframe_error"} <= set(record["metrics"])
    (row,) = record["metrics_per_sample"]  # the one sample's own figures
    assert row["frame_error"] == pytest.approx(record["metrics"]["frame_error"])
    assert (out / "video.mp4").is_file() and (out / "preview.png").is_file()
