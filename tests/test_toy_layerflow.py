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
    assert cfg.backbone.name == "cogvideox" and cfg.task.name == "layered" and cfg.task.mode == "auto"
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


@needs_weights
def test_decompose_keeps_the_given_blended_clip(registry, tmp_path):
    """task=layerflow_decompose with a user's blended video: the blended output is that video
    (a VAE round trip of it), the foreground and background are generated."""
    import numpy as np

    from layerkit.data.shapes import ShapesConfig, make_sample, seed_for
    from layerkit.io.video import write_video
    from layerkit.sampling.run import sample

    clip = make_sample(seed_for("test", 3, 0), ShapesConfig(num_frames=9, height=32, width=32))["blended"]
    given = (clip.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    write_video(tmp_path / "scene.mp4", given)
    out = sample(["task=layerflow_decompose", f"+inputs.blended={tmp_path / 'scene.mp4'}",
                  f"output_dir={tmp_path / 'out'}", "sampler.progress=false"], registry=registry)
    assert read_video(out / "foreground.mov").frames.shape == (9, 32, 32, 4)

    import torch

    from layerkit.pipeline import build_parts

    backbone = build_parts(compose("sample", [], registry), registry, training=False).backbone.eval()
    video = torch.from_numpy(read_video(tmp_path / "scene.mp4").frames).float().div(255).permute(0, 3, 1, 2)
    with torch.no_grad():  # what the given clip becomes: read, encoded, decoded
        trip = backbone.decode_latents(backbone.encode_video(video[None] * 2 - 1))[0]
    trip = ((trip.float().clamp(-1, 1) + 1) / 2 * 255).permute(0, 2, 3, 1).numpy()
    blended = read_video(out / "blended.mp4").frames.astype(np.float32)
    print(f"blended output vs the given clip's VAE round trip: {np.abs(blended - trip).mean():.1f} / 255; "
          f"vs the raw clip: {np.abs(blended - given.astype(np.float32)).mean():.1f} / 255")
    # the given clip, through the VAE and H.264 4:2:0 (10.6 / 255 measured; the raw clip is 56 / 255 away)
    assert np.abs(blended - trip).mean() / 255 < 0.06


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
@needs_weights
def test_cpu_offload_on_cuda_matches_resident_sampling(registry, tmp_path):
    """Model CPU offload (weights wait on the CPU, run on the GPU) gives the resident result,
    with the layer embedding and LoRAs attached."""
    import numpy as np

    from layerkit.sampling.run import sample

    outs = [sample(["device=cuda", f"memory.cpu_offload={flag}", f"output_dir={tmp_path / flag}",
                    "sampler.progress=false", "rgba_format=png"], registry=registry) for flag in ("false", "true")]
    a, b = (read_video(o / "foreground").frames.astype(np.int16) for o in outs)
    assert np.abs(a - b).max() <= 2


@needs_weights
def test_bf16_sampling_follows_fp32(registry, tmp_path):
    """dtype=bf16 runs the CogVideoX backbone, adapters and VAE in bfloat16 (CPU here)."""
    import numpy as np

    from layerkit.sampling.run import sample

    outs = {d: sample([f"dtype={d}", f"output_dir={tmp_path / d}", "sampler.progress=false", "rgba_format=png"],
                      registry=registry) for d in ("fp32", "bf16")}
    a, b = (read_video(outs[d] / "background.mp4").frames.astype(np.float32) for d in ("fp32", "bf16"))
    assert json.loads((outs["bf16"] / "record.json").read_text())["config"]["dtype"] == "bf16"
    print(f"bf16 vs fp32 background: mean abs difference {np.abs(a - b).mean() / 255:.4f}")
    assert np.abs(a - b).mean() / 255 < 0.03  # 0.0046 measured


@needs_weights
def test_diagnostics_behind_the_model_card_run():
    from layerkit_plugins.layerflow.toy.diagnose import colours, given, step_time

    rows = colours(2)
    assert rows and all(len(r) == 4 and all(0.0 <= v <= 1.0 for v in r[:3]) for r in rows.values())
    (losses,) = given(2, [500]).values()
    assert set(losses) == {"right blended", "another sample's blended", "blended noised (nothing given)"}
    timing = step_time(1)
    assert 0.0 < timing["encode_share"] < 1.0
