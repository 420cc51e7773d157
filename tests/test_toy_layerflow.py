"""The committed toy LayerFlow: `layerkit sample` with no arguments loads it and writes every output."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from layerkit.config import compose
from layerkit.io.video import read_video

WEIGHTS = Path(__file__).resolve().parents[1] / "plugins/layerkit_plugins/layerflow/toy/weights"
needs_weights = pytest.mark.skipif(not (WEIGHTS / "stage3.safetensors").is_file(),
                                   reason="the toy LayerFlow weights are not committed yet")


def test_committed_toy_model_fits_the_size_budget():
    files = [p for p in WEIGHTS.rglob("*") if p.is_file()]
    assert files, "toy/weights is empty"
    assert sum(p.stat().st_size for p in files) <= 10 * 1024 * 1024
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (WEIGHTS / sub).is_dir(), f"toy/weights lacks the diffusers subfolder {sub}/"


def test_sample_without_arguments_composes_the_toy_layerflow(registry):
    cfg = compose("sample", [], registry)
    assert cfg.backbone.name == "cogvideox" and cfg.task.name == "layerflow.generate"
    assert Path(cfg.backbone.path).resolve() == WEIGHTS.resolve()
    assert Path(cfg.weights).resolve() == (WEIGHTS / "stage3.safetensors").resolve()
    assert "motion_lora" in cfg.adapters and cfg.adapters.motion_lora.inference is False
    assert {"layer_embedding", "content_lora"} <= set(cfg.adapters)


@needs_weights
def test_sample_without_arguments_writes_layers_preview_and_record(registry, tmp_path, monkeypatch):
    from layerkit.sampling.run import sample

    monkeypatch.chdir(tmp_path)  # the defaults must not depend on the working directory
    started = time.perf_counter()
    out = sample([f"output_dir={tmp_path / 'out'}", "sampler.progress=false"], registry=registry)
    seconds = time.perf_counter() - started
    names = sorted(p.name for p in out.iterdir())
    assert names == ["alpha.mp4", "background.mp4", "blended.mp4", "foreground.mov", "preview.png", "record.json"]
    assert read_video(out / "foreground.mov").frames.shape == (9, 32, 32, 4)
    record = json.loads((out / "record.json").read_text())
    metrics = record["metrics"]
    assert {"alpha_iou", "compositing_error", "colour_correct", "shape_correct"} <= set(metrics)
    assert seconds < 60, f"layerkit sample took {seconds:.1f} s"
