"""The committed toy transparent model (issue "Transparent video", point 6): its files are
in the package, small, and `layerkit sample +experiment=toy_transparent output_dir=DIR`
writes an RGBA ProRes 4444 .mov, a preview sheet and the JSON record with no other argument."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from layerkit_plugins.transparent.toy.model import FRAMES, SIZE, package_weights

from layerkit.io.video import read_video

WEIGHT_FILES = ("inter_frame_attention.safetensors", "baseline_motion_module.safetensors",
                "base/transparent_encoder.safetensors", "base/transparent_decoder.safetensors",
                "base/motion_adapter/diffusion_pytorch_model.safetensors",
                "base/sd15/unet/diffusion_pytorch_model.safetensors")


@pytest.fixture
def one_thread():
    """The toy is tiny: one thread samples it in seconds, where two threads on a CPU shared with
    other jobs spin in OpenMP barriers for a minute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_committed_weights_are_in_the_package_and_at_most_10_mb():
    root = package_weights()
    missing = [name for name in WEIGHT_FILES if not (root / name).is_file()]
    assert not missing, f"committed toy weights missing: {missing}"
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total <= 10 * 1024 * 1024, f"toy/weights holds {total / 2**20:.2f} MiB"


@pytest.mark.timeout(120)
def test_toy_transparent_samples_with_no_other_argument(tmp_path, one_thread):
    from layerkit.sampling.run import sample

    out = sample(["+experiment=toy_transparent", f"output_dir={tmp_path / 'toy'}"])
    video = read_video(out / "foreground.mov", bits=8)
    assert video.frames.shape == (FRAMES, SIZE, SIZE, 4)  # RGBA survives ProRes 4444
    alpha = video.frames[..., 3]
    assert alpha.min() < 32 and alpha.max() > 224  # a sprite on a transparent background
    assert (out / "preview.png").is_file()
    record = json.loads((out / "record.json").read_text())
    assert record["config"]["weights"].endswith("inter_frame_attention.safetensors")
    metrics = record["metrics"]
    assert {"alpha_iou", "alpha_temporal_error", "identity_drift"} <= set(metrics)
    assert np.isfinite([metrics["alpha_iou"], metrics["alpha_temporal_error"], metrics["identity_drift"]]).all()


def test_reference_copies_hold_and_move_the_middle_frame():
    """The evaluator's no-model rows: the reference frame held still, and moved in the prompt's
    direction (here a sprite moving right at 1 px/frame: the moved copy is the clip itself)."""
    from layerkit_plugins.transparent.data import make_rgba_sprite_clip
    from layerkit_plugins.transparent.evaluate import evaluate_rgba_video
    from layerkit_plugins.transparent.toy.evaluate import reference_copies, translate_rgba

    from layerkit.data.shapes import ShapesConfig

    frame = torch.full((4, 16, 16), 0.0)
    frame[:3] = 0.5
    frame[0, 4:8, 4:8], frame[1:3, 4:8, 4:8], frame[3, 4:8, 4:8] = 1.0, 0.0, 1.0  # a red square
    moved = translate_rgba(frame, 3.0, -2.0)
    assert torch.equal(moved[3] > 0.5, frame[3].roll((-2, 3), (0, 1)) > 0.5)
    assert torch.allclose(moved[:3, 2:6, 7:11], frame[:3, 4:8, 4:8], atol=1e-5)  # colour kept, not darkened
    assert torch.allclose(translate_rgba(frame, 0.0, 0.0), frame, atol=1e-5)

    cfg = ShapesConfig(num_frames=8, height=32, width=32, speed=(1.0, 1.0), static_prob=0.0)
    for seed, direction in ((2, "right"), (44, "up")):  # sprites that stay inside the frame
        clip = make_rgba_sprite_clip(seed, cfg)
        assert clip["meta"]["direction"] == direction, "the shapes world drew another clip for this seed"
        copies = reference_copies(clip, 1.0)
        assert torch.equal(copies["still"], clip["rgba"][3][None].expand(8, -1, -1, -1))
        scores = evaluate_rgba_video(copies["moved"], clip)
        assert scores["alpha_iou"] > 0.95 and scores["direction_correct"] == 1.0, (direction, scores)
        assert evaluate_rgba_video(copies["still"], clip)["direction_correct"] == 0.0


def test_direction_swap_samples_each_clip_with_each_direction_word(one_thread, monkeypatch):
    """`evaluate --direction-swap N`: every clip sampled four times, its motion phrase replaced."""
    from layerkit_plugins.transparent.toy import evaluate

    from layerkit.sampling import run as sampling_run

    prompts = []
    original = sampling_run.Sampler.run

    def recording_run(self, batch=None, **kwargs):
        prompts.append(list(batch["prompt"]))
        return original(self, batch, **kwargs)

    monkeypatch.setattr(sampling_run.Sampler, "run", recording_run)
    result = evaluate.direction_swap("toy_transparent", num_samples=2, extra=["sampler.steps=2"])
    assert [p[0].rsplit(" ", 1)[1] for p in prompts] == ["left", "right", "up", "down"]
    assert all(p[i].startswith(" ".join(prompts[0][i].split()[:3])) for p in prompts for i in range(2))
    assert set(result["per_word"]) == {"left", "right", "up", "down"} and result["num_samples"] == 2
    assert 0.0 <= result["follows"] <= 1.0 and 0.0 <= result["still"] <= 1.0
    assert evaluate._MOTION.sub("moving up", "a red cross standing still") == "a red cross moving up"


def test_train_runs_every_stage_and_the_two_arms_side_by_side(tmp_path, one_thread):
    """toy/train.py end to end at a few steps: stage A to D, the two stage-D arms as two
    ``layerkit train`` processes at once with the loss weighting passed on, and a second call
    finds every stage done and trains nothing."""
    from layerkit_plugins.transparent.toy import train

    out = tmp_path / "toy"
    args = ["--out", str(out), "--pool", "4", "--steps-a", "2", "--batch-a", "2", "--steps-t", "2", "--batch-t", "4",
            "--steps-b", "2", "--reference-share-b", "0.5", "--steps-c", "2", "--batch-c", "2", "--steps-d", "2",
            "--eval-samples", "0", "--side-by-side", "--loss-weighting-d", "min_snr"]
    assert train.main(args) == 0
    for run in ("stage_d_inter_frame", "stage_d_baseline"):
        record = json.loads((out / run / "record.json").read_text())
        assert record["config"]["train"]["loss_weighting"] == "min_snr"
        assert (out / run / "weights.safetensors").is_file() and (out / f"{run}.log").is_file()
    base_record = json.loads((out / "base_rgb_run" / "record.json").read_text())
    assert base_record["config"]["task"]["given_reference"] == 0.5  # half the base's clips image-to-video
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stage_t"]["val_retrieval"]) == {"colour", "shape", "direction"}
    from safetensors.torch import load_file

    trained, random = (load_file(str(out / stage / "sd15" / "text_encoder" / "model.safetensors"))
                       for stage in ("stage_t", "stage_a"))
    assert any(not torch.equal(trained[k], random[k]) for k in random)  # stage T trained it
    assert any("side by side" in name for name in summary["timings"])
    assert summary["timings"][next(k for k in summary["timings"] if "side by side" in k)]["cpu_s"] > 1.0  # the children's
    before = {p: p.stat().st_mtime_ns for p in out.rglob("weights.safetensors")}
    assert train.main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("weights.safetensors")} == before
    calls = json.loads((out / "summary.json").read_text())["calls"]  # every call's flags, not the last alone
    assert len(calls) == 2 and all(c["steps_d"] == 2 and c["side_by_side"] for c in calls)
    with pytest.raises(SystemExit, match=r"stage_d_inter_frame was trained with loss weighting min_snr \(asked none\)"):
        train.main([*args[:-1], "none"])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("weights.safetensors")} == before
    with pytest.raises(SystemExit, match=r"base was trained with \{'freeze_cross_attention': False\}"):
        train.main([*args, "--freeze-cross-attention-c"])  # stage C trained otherwise
    with pytest.raises(SystemExit, match="reference share 0.5 \\(asked 0.0\\)"):  # stage B trained otherwise
        train.main(args[:args.index("--reference-share-b")] + args[args.index("--reference-share-b") + 2:])

    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(SystemExit):
        train.main(["--out", str(a_file)])
    assert a_file.read_text() == "mine"
    with pytest.raises(SystemExit):  # a share outside [0, 1], before any folder is made
        train.main(["--out", str(tmp_path / "never"), "--reference-share-b", "1.5"])
    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path / "never"), "--threads", "0"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            train.main(["--out", str(tmp_path / "never"), "--accelerator", "gpu"])
    assert not (tmp_path / "never").exists()


def test_evaluate_refuses_a_bad_override_before_sampling(tmp_path, capsys):
    from layerkit_plugins.transparent.toy import evaluate

    with pytest.raises(SystemExit):
        evaluate.main(["--out", str(tmp_path / "eval"), "--override", "sampler.guidance_scale=abc"])
    assert "sampler.guidance_scale is 'abc'" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def test_evaluate_records_its_settings_with_the_rows(tmp_path, monkeypatch):
    """results.json keeps what the rows were sampled with (--override among them), not the rows alone."""
    from layerkit_plugins.transparent.toy import evaluate

    seen = {}

    def fake_evaluate(out, **kwargs):
        seen.update(kwargs)
        return {"a row": {"alpha_iou": 0.5}}

    monkeypatch.setattr(evaluate, "evaluate", fake_evaluate)
    assert evaluate.main(["--out", str(tmp_path / "eval"), "--num-samples", "4",
                          "--override", "sampler.guidance_scale=3.0"]) == 0
    written = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert written["rows"] == {"a row": {"alpha_iou": 0.5}}
    assert written["settings"]["override"] == ["sampler.guidance_scale=3.0"] == seen["extra"]
    assert written["settings"]["num_samples"] == 4


def test_train_passes_the_accelerator_and_threads_to_layerkit_train(tmp_path, monkeypatch):
    """--accelerator gpu runs stages B and D with the CPU recipe's numerics (fp32, no clipping),
    and stage B gets the asked threads instead of layerkit train's load-dependent ``auto``."""
    from layerkit_plugins.transparent.toy import train

    from layerkit.config import compose
    from layerkit.registry import get_registry

    assert train.trainer_overrides("cpu") == []
    with pytest.raises(ValueError, match="'cpu' or 'gpu'"):
        train.trainer_overrides("tpu")
    args = train.stage2_overrides("toy_transparent", tmp_path, tmp_path / "run", steps=5, seed=0, accelerator="gpu")
    trainer = compose("train", args, get_registry()).trainer
    assert (trainer.accelerator, trainer.precision, trainer.gradient_clip_val, trainer.max_steps) == \
        ("gpu", "32-true", None, 5)
    seen = []

    def stop(overrides):
        seen.append(overrides)
        raise RuntimeError("stop")

    monkeypatch.setattr(train, "_layerkit_train", stop)
    with pytest.raises(RuntimeError, match="stop"):  # before any weights are read
        train.train_rgb_base(tmp_path, tmp_path / "base_rgb", steps=3, seed=0, accelerator="gpu", threads=2)
    assert "threads=2" in seen[0] and "trainer=gpu" in seen[0]


def test_contrastive_loss_counts_every_item_of_the_same_prompt_as_a_positive():
    """Two clips of one prompt and one of another, features that match their prompts exactly:
    the loss is the targets' own entropy (log 2 for the pair, 0 for the single), its minimum;
    features shuffled between prompts score higher."""
    from layerkit_plugins.transparent.toy.clip import clip_pixels

    from layerkit.training.contrastive import contrastive_loss

    ids = torch.tensor([0, 0, 1])
    text = torch.eye(2)[ids]
    minimum = contrastive_loss(text, text.clone(), torch.tensor(100.0), ids)
    assert float(minimum) == pytest.approx(2 * math.log(2) / 3, abs=1e-4)
    assert float(contrastive_loss(text, text[[2, 2, 0]], torch.tensor(100.0), ids)) > float(minimum) + 1
    assert clip_pixels(torch.rand(2, 8, 4, 32, 32)).shape == (2, 32, 32, 32)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_stage_c_regresses_what_the_schedule_predicts(kind):
    """Stage C's own loop (the transparent image model) takes its target from the scheduler: the
    committed toy is a v-prediction model on a zero-terminal-SNR schedule, where at the last step
    the target is -x0 (an epsilon target there would carry no information about the image)."""
    from diffusers import DDPMScheduler
    from layerkit_plugins.transparent.toy.model import SCHEDULER_CONFIG

    from layerkit.training.weighting import prediction_target

    scheduler = DDPMScheduler.from_config(dict(SCHEDULER_CONFIG, prediction_type=kind))
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([999, 10])
    target = prediction_target(scheduler, x0, noise, t)
    expected = {"epsilon": noise, "sample": x0, "v_prediction": scheduler.get_velocity(x0, noise, t)}[kind]
    assert torch.equal(target, expected)
    if kind == "v_prediction":
        assert torch.allclose(target[0], -x0[0], atol=1e-4)  # zero terminal SNR: v = -x0 at t = 999


def test_stage_c_can_leave_the_cross_attention_as_the_video_base_learnt_it(one_thread):
    """``--freeze-cross-attention-c``: stage C trains the spatial layers but not ``attn2`` (where
    the prompt enters), and never the motion modules."""
    from layerkit_plugins.transparent.toy.model import build_backbone
    from layerkit_plugins.transparent.toy.train import train_image_model

    backbone = build_backbone(0)
    before = {k: v.clone() for k, v in backbone.denoiser.state_dict().items()}
    latents, embeds = torch.randn(6, 4, SIZE // 4, SIZE // 4), backbone.encode_prompts(["", "a red circle"])
    train_image_model(backbone, latents, embeds["prompt_embeds"], torch.tensor([0, 1, 1, 0, 1, 1]), steps=2, batch=2,
                      lr=1e-2, seed=0, log_every=100, freeze_cross_attention=True)
    after = backbone.denoiser.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and not any(".attn2." in k or "motion_modules" in k for k in changed)
    assert any(".attn1." in k for k in changed)
