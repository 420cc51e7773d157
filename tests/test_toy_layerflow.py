"""The committed toy LayerFlow: `layerkit sample` with no arguments loads it and writes every
output; its VAE keeps colours and mattes; decomposition reads the given clip; bf16 and offload
follow fp32; the evaluator's alpha IoU means what the model card says."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from layerkit.config import compose
from layerkit.io.video import read_video

WEIGHTS = Path(__file__).resolve().parents[1] / "plugins/layerkit_plugins/layerflow/toy/weights"
needs_weights = pytest.mark.skipif(not (WEIGHTS / "stage3.safetensors").is_file(),
                                   reason="the toy LayerFlow weights are not committed yet")


def shapes_clip(index: int = 0, seed: int = 3) -> dict:
    """A held-out clip of the toy's world (sprites of ``model.SPRITE_SIZE``)."""
    from layerkit_plugins.layerflow.toy.model import toy_world

    from layerkit.data.shapes import make_sample, seed_for

    return make_sample(seed_for("test", seed, index), toy_world())


def test_committed_toy_model_fits_the_size_budget():
    files = [p for p in WEIGHTS.rglob("*") if p.is_file()]
    assert files, "toy/weights is empty"
    assert sum(p.stat().st_size for p in files) <= 10 * 1024 * 1024
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (WEIGHTS / sub).is_dir(), f"toy/weights lacks the diffusers subfolder {sub}/"


def test_committed_run_summaries_name_no_machine_paths():
    """Run summaries exported beside the toys' weights (``run_summary(run, root)``) name
    repository-relative paths."""
    root = str(WEIGHTS.resolve().parents[4])
    files = sorted(WEIGHTS.resolve().parents[2].glob("*/toy/weights/**/*.json"))
    assert any(p.name == "stage1.json" for p in files) and any(p.name == "layeranimate.json" for p in files)
    for path in files:
        text = path.read_text()
        assert root not in text and "/work/" not in text, f"{path} names an absolute path"


def test_sample_without_arguments_composes_the_toy_layerflow_as_the_authors_pack_it(registry):
    cfg = compose("sample", [], registry)
    assert cfg.backbone.name == "cogvideox" and cfg.task.name == "layered" and cfg.task.mode == "auto"
    assert Path(cfg.backbone.path).resolve() == WEIGHTS.resolve()
    assert Path(cfg.weights).resolve() == (WEIGHTS / "stage3.safetensors").resolve()
    assert "motion_lora" in cfg.adapters and cfg.adapters.motion_lora.inference is False
    assert {"layer_embedding", "content_lora"} <= set(cfg.adapters)
    # issue 15: one VAE pass over the packed clip, zero unconditional embeddings (no toy pin left)
    assert cfg.backbone.vae_pass == "clip" and cfg.backbone.uncond == "zeros"
    # the toy's world (larger sprites than the shapes world's own): what the stages train on, what
    # sampling scores and decomposes, and what the toy's tools draw (model.toy_world) are one world
    from layerkit_plugins.layerflow.toy.model import SPRITE_SIZE, toy_world

    assert tuple(cfg.task.shapes_world.sprite_size) == SPRITE_SIZE == toy_world().sprite_size
    for stage in (1, 2, 3):
        train = compose("train", [f"+experiment=toy_layerflow_stage{stage}"], registry)
        assert tuple(train.data.sprite_size) == SPRITE_SIZE
        assert train.backbone.vae_pass == "clip" and train.train.prompt_dropout_per_block
        assert tuple(train.optim.betas) == (0.9, 0.95) and train.optim.weight_decay == 1e-4
        assert train.train.cache_latents and train.train.cache_text and train.train.ema_decay > 0


def test_packed_clip_geometry_splits_into_layers_in_one_vae_pass(registry):
    """8 frames per layer: 32 frames -> 8 latent frames, 2 per layer (33 -> 9 with the frame-0 copy)."""
    from layerkit.pipeline import build_parts, latent_layout

    cfg = compose("sample", [], registry)
    parts = build_parts(cfg, registry, training=False)
    sample = {k: v[None] if isinstance(v, torch.Tensor) else [v] for k, v in shapes_clip().items()}
    for mode, lengths in (("generate", [2, 2, 2, 2]), ("fg2bg", [1, 2, 2, 2, 2]), ("decompose", [2, 2, 2, 2])):
        parts.task.train_modes = {mode: 1.0}
        layout = latent_layout(parts.backbone, parts.task.pack(sample, training=True))
        assert layout.lengths == lengths, mode


@needs_weights
def test_committed_weights_fit_issue_12s_budget():
    """Issue 12: the toy LayerFlow's weights within 10 MB (9.0 MB: MODEL_CARD.md's contents)."""
    size = sum(p.stat().st_size for p in WEIGHTS.rglob("*.safetensors"))
    assert size <= 10_000_000, f"the toy LayerFlow's weights are {size / 1e6:.1f} MB"


@needs_weights
def test_committed_vae_keeps_every_sprite_colour_and_the_matte(registry):
    """train_vae's own check on the committed VAE, on clips of the toy's world: every colour
    classified right, alpha IoU >= 0.9, layers that composite."""
    from layerkit_plugins.cogvideox.backbone import load_vae
    from layerkit_plugins.layerflow.toy.model import toy_world
    from layerkit_plugins.layerflow.toy.train_vae import check, validate, validation_samples

    vae = load_vae(WEIGHTS / "vae", torch.float32).eval()
    samples = validation_samples(0, toy_world())  # train_vae's 48, sprites of 0.55-0.8 (--sprite-size 0.55 0.8)
    result = validate(vae, samples)
    print(json.dumps(result))
    # every colour right and the matte at issue 12's 0.9 (0.952 after the decoder-only tenth run:
    # MODEL_CARD.md), and the decoded layers composite (compositing error 0.037; the eighth
    # decoder 0.046, the seventh 0.061 on these clips)
    assert check(result, min_alpha_iou=0.9) == []
    assert result["rg_separation"] > 0.5 and result["cm_separation"] > 0.5
    assert result["compositing_error"] < 0.05


def test_vae_round_trip_with_latent_noise_is_seeded_and_scaled_to_the_denoisers_units():
    """train_vae's noisy check (and --latent-noise): noise of std s in scaled latent units, the same
    noise on every call, so checks of one VAE are comparable."""
    from layerkit_plugins.layerflow.toy.model import build_vae
    from layerkit_plugins.layerflow.toy.train_vae import round_trip

    vae = build_vae(0).eval()
    vae.register_to_config(scaling_factor=2.0)
    clips = torch.rand(2, 3, 8, 32, 32) * 2 - 1
    clean = round_trip(vae, clips)
    noisy = round_trip(vae, clips, latent_noise=0.5)
    assert torch.equal(noisy, round_trip(vae, clips, latent_noise=0.5))
    assert not torch.allclose(noisy, clean)
    with torch.no_grad():  # the same draw by hand: std 0.5 / scaling factor in the VAE's raw latents
        z = vae.encode(clips).latent_dist.mode()
        by_hand = vae.decode(z + 0.25 * torch.randn(z.shape, generator=torch.Generator().manual_seed(0))).sample
    torch.testing.assert_close(noisy, by_hand)



def test_composite_term_is_zero_on_true_layers_and_scores_what_the_evaluator_scores():
    """train_vae's --composite-weight term (decoded layers that composite into the decoded blended
    clip) vanishes on the true packed clips, with and without the frame-0 copy, and grows when the
    blended clip disagrees; its validation figures are the evaluator's on the unpacked layers."""
    from layerkit_plugins.layerflow.toy.train_vae import composite_figures, composite_residual, packed_clip

    from layerkit.data.shapes import ShapesConfig, make_sample, seed_for

    config = ShapesConfig(num_frames=8, height=32, width=32)
    samples = [make_sample(seed_for("val", 0, i), config) for i in range(3)]
    for first in (False, True):
        clips = torch.stack([packed_clip(s, first_frame=first) for s in samples])
        assert composite_residual(clips, 8, first).abs().max() < 1e-5
    clips = torch.stack([packed_clip(s) for s in samples])
    figures = composite_figures(clips, samples, 8)
    assert figures["compositing_error"] < 1e-3 and figures["alpha_iou_composite"] > 0.99
    wrong = clips.clone()
    wrong[:, :, 24:] = clips[:, :, 16:24]  # blended replaced by the background: the sprite is missing
    assert composite_residual(wrong, 8).abs().mean() > 0.01
    assert composite_figures(wrong, samples, 8)["alpha_iou_composite"] < 0.1

def test_implied_matte_term_is_zero_on_true_layers_and_sees_a_blurred_sprite_edge():
    """train_vae's --implied-weight term: the matte the blended and background sub-clips imply for
    the true sprite colour matches the true matte exactly on true layers (with and without the
    frame-0 copy), and not when the blended clip's sprite is blurred or missing."""
    import torch.nn.functional as F
    from layerkit_plugins.layerflow.toy.train_vae import implied_matte_error, packed_clip

    from layerkit.data.shapes import ShapesConfig, make_sample, seed_for

    config = ShapesConfig(num_frames=8, height=32, width=32)
    samples = [make_sample(seed_for("val", 0, i), config) for i in range(3)]
    for first in (False, True):
        clips = torch.stack([packed_clip(s, first_frame=first) for s in samples])
        assert implied_matte_error(clips, clips, 8, first).max() < 1e-5
    clips = torch.stack([packed_clip(s) for s in samples])
    blurred = clips.clone()
    frames = blurred[:, :, 24:].permute(0, 2, 1, 3, 4).reshape(-1, 3, 32, 32)
    frames = F.avg_pool2d(F.pad(frames, (1, 1, 1, 1), mode="replicate"), 3, 1)
    blurred[:, :, 24:] = frames.reshape(3, 8, 3, 32, 32).permute(0, 2, 1, 3, 4)
    missing = clips.clone()
    missing[:, :, 24:] = clips[:, :, 16:24]  # blended replaced by the background: no sprite
    e_blur = implied_matte_error(blurred, clips, 8).mean()
    e_missing = implied_matte_error(missing, clips, 8).mean()
    assert 0.001 < e_blur < e_missing
    assert e_missing == pytest.approx(torch.stack([s["foreground_alpha"] for s in samples]).mean().item(), rel=1e-4)


def test_grown_vae_encodes_and_decodes_as_the_vae_it_grew_from():
    """train_vae --init VAE --latent-channels N: the grown VAE's first latent channels are the old
    VAE's latents, the new ones are read with zero weights, so it decodes exactly as before."""
    from layerkit_plugins.layerflow.toy.model import build_components, build_vae
    from layerkit_plugins.layerflow.toy.train_vae import grow_latent_channels

    old = build_vae(3).eval()
    grown = grow_latent_channels(old, 16, seed=0).eval()
    assert grown.config.latent_channels == 16 and grown.config.scaling_factor == old.config.scaling_factor
    clips = torch.rand(2, 3, 9, 32, 32) * 2 - 1
    with torch.no_grad():
        z_old, z_new = old.encode(clips).latent_dist.mode(), grown.encode(clips).latent_dist.mode()
        assert z_new.shape[1] == 16
        torch.testing.assert_close(z_new[:, :8], z_old, atol=1e-6, rtol=0)
        assert z_new[:, 8:].abs().mean() > 0, "the new channels carry the seeded encoder's output"
        torch.testing.assert_close(grown.decode(z_new).sample, old.decode(z_old).sample, atol=1e-5, rtol=0)
    transformer = build_components(0, vae=grown)["transformer"]  # the denoiser follows the VAE's channels
    assert transformer.config.in_channels == transformer.config.out_channels == 16
    with pytest.raises(SystemExit, match="only growing"):
        grow_latent_channels(grown, 8)


def test_widened_decoder_decodes_as_before_and_loads_back_through_the_backbone(tmp_path):
    """train_vae --init VAE --parts decoder --decoder-widths: the wider decoder decodes the same
    latents as the old one (net2net: without noise exactly, with its seeded noise nearly), the
    encoder is untouched, the config records the widths, and the backbone's loader (and so
    ``load_components``) builds the same VAE back from the folder; widths that are not multiples are
    refused, and a folder whose weights do not match its widths is refused in one sentence."""
    from layerkit_plugins.cogvideox.backbone import DECODER_WIDTHS, load_vae
    from layerkit_plugins.layerflow.toy.model import build_vae
    from layerkit_plugins.layerflow.toy.train_vae import widen_decoder
    from safetensors.torch import load_file, save_file

    from layerkit.errors import LayerkitError

    old = build_vae(3).eval()
    clips = torch.rand(2, 3, 9, 32, 32) * 2 - 1
    with torch.no_grad():
        z = old.encode(clips).latent_dist.mode()
        before = old.decode(z).sample
        exact = widen_decoder(build_vae(3), (16, 32, 64), noise=0.0).eval()
        torch.testing.assert_close(exact.decode(z).sample, before, atol=1e-5, rtol=0)
        wide = widen_decoder(build_vae(3), (16, 32, 64), seed=0).eval()
        torch.testing.assert_close(wide.encode(clips).latent_dist.mode(), z, atol=0, rtol=0)
        assert 0 < (wide.decode(z).sample - before).abs().max() < 0.05
    assert wide.config[DECODER_WIDTHS] == [16, 32, 64] and list(wide.config.block_out_channels) == [8, 16, 32]
    assert wide.decoder.conv_in.conv.out_channels == 64
    wide.save_pretrained(str(tmp_path / "vae"))
    state = torch.random.get_rng_state()
    back = load_vae(tmp_path / "vae")  # draws no global random numbers, as from_pretrained
    assert torch.equal(torch.random.get_rng_state(), state)
    with torch.no_grad():
        torch.testing.assert_close(back.decode(z).sample, wide.decode(z).sample, atol=0, rtol=0)
    for widths in ((12, 32, 64), (16, 64, 64), (0, 0, 0)):  # one whole factor for every block
        with pytest.raises(SystemExit, match="times one whole number"):
            widen_decoder(build_vae(3), widths)
    file = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(file))
    save_file({**weights, "decoder.conv_in.conv.bias": torch.zeros(3)}, str(file))
    with pytest.raises(LayerkitError, match="does not match its config"):
        load_vae(tmp_path / "vae")
    save_file({k: v for k, v in weights.items() if not k.startswith("decoder.conv_in")}, str(file))
    with pytest.raises(LayerkitError, match="does not match its config"):
        load_vae(tmp_path / "vae")


def test_sampler_sweep_samples_each_setting_on_each_row_of_the_split_asked(monkeypatch):
    from layerkit_plugins.layerflow.toy import evaluate

    calls = []
    monkeypatch.setattr(evaluate, "sample_model", lambda overrides, n, seed, extra: calls.append(
        (overrides, n, seed, list(extra))) or {"alpha_iou": 0.5})
    rows = ["stages 1+2+3, generate", "stages 1+2+3, decompose"]
    results = evaluate.sweep(["", "sampler.guidance_scale=2.0 sampler.steps=50"], rows, 32, 0, "val", ["x=1"])
    assert len(results) == 4 and "stages 1+2+3, decompose; committed sampler" in results
    assert calls[1] == (evaluate.MODELS[rows[1]], 32, 0, ["+inputs.split=val", "x=1"])
    assert calls[3][3] == ["+inputs.split=val", "x=1", "sampler.guidance_scale=2.0", "sampler.steps=50"]


def test_eval_vae_only_samples_no_model(monkeypatch, capsys):
    """toy-layerflow-eval --vae-only: the VAE ceiling and the true layers of the split asked, through
    the backbone the overrides name, and no denoiser sampled; with --grid it is refused."""
    from layerkit_plugins.layerflow.toy import evaluate

    sampled, ceilings = [], []
    monkeypatch.setattr(evaluate, "sample_model", lambda *a: sampled.append(a) or {"alpha_iou": 0.5})
    monkeypatch.setattr(evaluate, "vae_ceiling", lambda n, seed, round_trip=True, split="test", extra=(): ceilings.append(
        (n, round_trip, split, list(extra))) or {"alpha_iou": 0.9})
    evaluate.main(["--vae-only", "--split", "val", "--num-samples", "4", "backbone.path=DIR"])
    assert sampled == [] and ceilings == [(4, True, "val", ["backbone.path=DIR"]), (4, False, "val", ["backbone.path=DIR"])]
    assert "VAE ceiling (true layers, VAE round trip)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as error:
        evaluate.main(["--vae-only", "--grid", ""])
    assert error.value.code == 2 and "--vae-only samples no model" in capsys.readouterr().err



def test_vae_ceiling_loads_no_stage_weights_so_any_geometry_runs(tmp_path):
    """--vae-only through a folder of another geometry (a 2x VAE, a patch-4 transformer that the
    committed stage files do not fit): the true layers go through that VAE, no stage file is read."""
    from layerkit_plugins.cogvideox.backbone import save_components
    from layerkit_plugins.layerflow.toy import evaluate
    from layerkit_plugins.layerflow.toy.model import build_components, build_vae, compression_changes

    save_components(build_components(0, vae=build_vae(0, **compression_changes(2))), tmp_path / "base")
    row = evaluate.vae_ceiling(1, 0, split="val", extra=[f"backbone.path={tmp_path / 'base'}"])
    assert 0.0 <= row["alpha_iou"] <= 1.0 and row["compositing_error"] > 0.0  # an untrained VAE: not the truth

def test_toy_tools_refuse_to_write_over_a_users_files(tmp_path, capsys):
    """toy-layerflow-vae --out and toy-layerflow-eval --json name new places; an earlier run's
    folder or file is refused in one sentence before anything trains or samples, and left as it was."""
    from layerkit_plugins.layerflow.toy import evaluate, train_vae

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "vae_training.json").write_text("earlier")
    (tmp_path / "eval.json").write_text("earlier")
    with pytest.raises(SystemExit) as vae:
        train_vae.main(["--out", str(tmp_path / "run"), "--steps", "0"])
    with pytest.raises(SystemExit) as ev:
        evaluate.main(["--json", str(tmp_path / "eval.json")])
    assert vae.value.code == 2 and ev.value.code == 2
    err = capsys.readouterr().err
    assert "exists and is not empty" in err and "exists; choose a new file" in err
    assert (tmp_path / "run" / "vae_training.json").read_text() == "earlier"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["vae_training.json"]
    (tmp_path / "afile").write_text("mine")  # a file where a folder is asked for: one sentence, no traceback
    from layerkit_plugins.layerflow.toy import diagnose
    for main, args in ((train_vae.main, ["--steps", "0"]), (diagnose.main, ["rebase"])):
        with pytest.raises(SystemExit) as file_error:
            main([*args, "--out", str(tmp_path / "afile")])
        assert file_error.value.code == 2
        assert "is a file; --out names a folder" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "mine"
    assert (tmp_path / "eval.json").read_text() == "earlier"


def test_export_vae_replaces_the_vae_alone(tmp_path, capsys):
    """export vae RUN: a decoder-only run's vae/ (fp16) and its record go into the model folder; the
    pretrained transformer there is left as it was (export base would write the run's seeded one
    over it); a folder without vae/ is refused in one sentence."""
    from layerkit_plugins.layerflow.toy import export
    from safetensors.torch import load_file, save_file

    run, dst = tmp_path / "run", tmp_path / "weights"
    for folder in (run / "vae", run / "transformer", dst / "vae", dst / "transformer"):
        folder.mkdir(parents=True)
    save_file({"w": torch.ones(2)}, str(run / "vae" / "diffusion_pytorch_model.safetensors"))
    (run / "vae" / "config.json").write_text("{}")
    (run / "transformer" / "config.json").write_text('{"seeded": true}')
    (run / "vae_training.json").write_text('{"parts": "decoder"}')
    (dst / "transformer" / "config.json").write_text('{"pretrained": true}')
    (dst / "vae" / "stale.json").write_text("{}")
    export.main(["vae", str(run), "--to", str(dst)])
    assert json.loads((dst / "transformer" / "config.json").read_text()) == {"pretrained": True}
    assert sorted(p.name for p in (dst / "vae").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert load_file(str(dst / "vae" / "diffusion_pytorch_model.safetensors"))["w"].dtype == torch.float16
    assert json.loads((dst / "vae_training.json").read_text()) == {"parts": "decoder"}
    with pytest.raises(SystemExit) as error:
        export.main(["vae", str(tmp_path / "nothing"), "--to", str(dst)])
    assert error.value.code == 2 and "holds no vae/ folder" in capsys.readouterr().err


def test_toy_tools_refuse_a_missing_vae_folder_and_no_latent_channels(tmp_path, capsys):
    """toy-layerflow-vae --init and toy-layerflow-diagnose --base name folders that must hold a VAE,
    and --latent-channels 0 or a reversed --sprite-size is refused, not replaced by the default: one
    sentence each, nothing written."""
    from layerkit_plugins.layerflow.toy import diagnose, train_vae

    cases = [(train_vae.main, ["--init", str(tmp_path / "missing"), "--out", str(tmp_path / "a")], "is not a VAE folder"),
             (train_vae.main, ["--latent-channels", "0", "--out", str(tmp_path / "b")], "must be at least 1"),
             (train_vae.main, ["--init", str(tmp_path), "--spatial-compression", "2", "--out", str(tmp_path / "c")],
              "an --init VAE keeps its own"),
             (train_vae.main, ["--spatial-compression", "8", "--out", str(tmp_path / "d")], "invalid choice: 8"),
             (train_vae.main, ["--sprite-size", "0.8", "0.55", "--out", str(tmp_path / "e")], "0 < LOW <= HIGH <= 0.9"),
             (train_vae.main, ["--decoder-widths", "16", "32", "64", "--out", str(tmp_path / "f")],
              "use it with --parts decoder --init VAE"),
             (diagnose.main, ["implied", "--base", str(tmp_path / "missing")], "is not a toy model folder"),
             (diagnose.main, ["x0", "--weights", str(tmp_path / "missing.safetensors")], "does not exist"),
             (diagnose.main, ["x0", "--timesteps", "39", "1000"], "--timesteps must lie in 0..999"),
             (diagnose.main, ["latent-stats"], "latent-stats needs --out FILE.json"),
             (diagnose.main, ["latent-stats", "--num", "1", "--out", str(tmp_path / "s.json")], "at least 2 clips"),
             (diagnose.main, ["prompts", "--weights", str(tmp_path / "missing.safetensors")], "does not exist"),
             (diagnose.main, ["prompts", "--timesteps", "-1"], "--timesteps must lie in 0..999"),
             (diagnose.main, ["prompts", "--word", "size"], "invalid choice: 'size'")]
    for main, args, message in cases:
        with pytest.raises(SystemExit) as error:
            main(args)
        assert error.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_base_pretraining_packs_the_blended_clip_alone_and_exports_the_transformer(registry, tmp_path):
    """toy_layerflow_base: plain text-to-video on the blended sub-clip (task.layout=video, no layer
    embedding); ``export pretrained`` writes its denoiser as the diffusers transformer stage 1
    starts from, and refuses a file of another layout in one sentence, leaving the folder as it was."""
    import shutil

    from diffusers import CogVideoXTransformer3DModel
    from layerkit_plugins.layerflow.toy import export

    from layerkit.data.shapes import ShapesConfig, make_sample
    from layerkit.errors import LayerkitError
    from layerkit.io.weights import load_weights, save_weights
    from layerkit.training.data import default_collate
    from layerkit.training.run import train

    task = registry.build("task", "layered", layout="video", train_modes={"generate": 1})
    batch = default_collate([make_sample(i, ShapesConfig(num_frames=4, height=16, width=16)) for i in range(2)])
    packed = task.pack(batch, training=True)
    assert [s.name for s in packed.segments] == ["blended"] and not packed.given.any()
    assert torch.allclose(packed.segments[0].video, batch["blended"] * 2 - 1)
    assert set(task.unpack({"blended": packed.segments[0].video}, batch)[0]) == {"blended"}
    with pytest.raises(LayerkitError, match="its only mode is generate"):
        registry.build("task", "layered", layout="video", train_modes={"generate": 1, "decompose": 1})
    with pytest.raises(LayerkitError, match="takes no input file; inputs.blended selects decompose"):
        task.sample_inputs({"blended": "scene.mp4"}, height=16, width=16, num_frames=4)

    cfg = compose("train", ["+experiment=toy_layerflow_base"], registry)
    assert cfg.task.layout == "video" and "layer_embedding" not in cfg.adapters and list(cfg.trainable) == ["*"]
    run = train(["+experiment=toy_layerflow_base", "trainer.max_steps=2", "data.size=16", "train.cache_latents=false",
                 f"output_dir={tmp_path / 'base'}"], registry=registry)
    folder = tmp_path / "weights"
    shutil.copytree(WEIGHTS / "transformer", folder / "transformer")
    before = (folder / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    save_weights(tmp_path / "other" / "weights.safetensors", {"backbone.denoiser.proj.weight": torch.zeros(2)})
    with pytest.raises(LayerkitError, match="does not hold a denoiser of"):
        export.export_pretrained(tmp_path / "other", folder)
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    config = folder / "transformer" / "config.json"
    original = config.read_text()
    other = {**json.loads(original), "num_attention_heads": 8, "attention_head_dim": 16}  # same keys and shapes
    config.write_text(json.dumps(other))
    with pytest.raises(LayerkitError, match="differs from .* in attention_head_dim, num_attention_heads; it was not"):
        export.export_pretrained(run, folder)
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert not (folder / "base_t2v.json").exists()
    config.write_text(original)
    export.export_pretrained(run, folder)
    trained = load_weights(run / "weights.safetensors")
    model = CogVideoXTransformer3DModel.from_pretrained(folder / "transformer")
    for key, value in model.state_dict().items():
        assert torch.allclose(value, trained[f"backbone.denoiser.{key}"].half().float()), key
    assert json.loads((folder / "base_t2v.json").read_text())["global_step"] == 2


def test_vae_check_fails_loudly_on_tied_colours():
    from layerkit_plugins.layerflow.toy.train_vae import check

    tied = {"rgb": {c: [0.5, 0.5, 0.1] for c in ("red", "green", "blue", "yellow", "magenta", "cyan")},
            "colour_correct": {"red": 1.0, "green": 0.0, "blue": 1.0, "yellow": 1.0, "magenta": 1.0, "cyan": 0.0},
            "alpha_iou": 0.95}
    failures = check(tied, min_alpha_iou=0.9)
    assert len(failures) == 2 and "green" in failures[0] and "cyan" in failures[1]
    assert check({**tied, "colour_correct": dict.fromkeys(tied["rgb"], 1.0), "alpha_iou": 0.5}, 0.9)


def test_generation_alpha_iou_is_the_matte_against_the_composite_it_shows():
    """Generate and bg2fg: the matte against the one the output composite implies (placement is not
    in the prompt); decompose and fg2bg: against the held-out clip's alpha."""
    from layerkit_plugins.layered.evaluate import composite_alpha, evaluate_layered

    sample = shapes_clip()
    true = {"foreground_rgb": sample["foreground_rgb"], "foreground_alpha": sample["foreground_alpha"],
            "background": sample["background"], "blended": sample["blended"]}
    implied = composite_alpha(true["foreground_rgb"], true["foreground_alpha"], true["background"], true["blended"])
    assert ((implied >= 0.5) == (sample["foreground_alpha"] >= 0.5)).all()
    assert evaluate_layered(true, sample, mode="generate")["alpha_iou"] == 1.0

    shifted = {k: v.roll(8, dims=-1) for k, v in true.items()}  # the same scene, elsewhere
    generate = evaluate_layered(shifted, sample, mode="generate")
    decompose = evaluate_layered(shifted, sample, mode="decompose")
    assert generate["alpha_iou"] == generate["alpha_iou_composite"] == 1.0
    assert decompose["alpha_iou"] == decompose["alpha_iou_heldout"] == generate["alpha_iou_heldout"] < 0.5

    nothing = {**true, "foreground_alpha": torch.zeros_like(sample["foreground_alpha"]),
               "blended": sample["background"]}
    assert evaluate_layered(nothing, sample, mode="generate")["alpha_iou"] == 0.0, "no sprite is not a perfect one"
    wrong = {**true, "blended": sample["background"]}  # a matte the composite does not show
    assert evaluate_layered(wrong, sample, mode="generate")["alpha_iou"] == 0.0


def test_latent_cache_keeps_each_packing_of_an_item_apart():
    """fg2bg/bg2fg put a copy of frame 0 in front: the same item, another clip, another cache entry."""
    from layerkit_plugins.cogvideox.backbone import CogVideoX

    from layerkit.protocols import Packed, Segment
    from layerkit.training.cache import LatentCache

    backbone = CogVideoX(tiny=True).eval()
    video = torch.rand(1, 8, 3, 32, 32) * 2 - 1
    names = ["foreground", "alpha", "background", "blended"]
    plain = Packed([Segment(n, 8, video) for n in names], torch.zeros(1, 32, dtype=torch.bool), [["a"] * 3], 32, 32)
    first = Packed([Segment("first_frame", 1, video[:, :1]), *plain.segments], torch.zeros(1, 33, dtype=torch.bool),
                   [["a"] * 3], 32, 32)
    cache = LatentCache()
    a, _ = cache.encode(backbone, plain, {"_index": [7]})
    b, _ = cache.encode(backbone, first, {"_index": [7]})
    again, _ = cache.encode(backbone, first, {"_index": [7]})
    assert a.shape[2] == 8 and b.shape[2] == 9 and torch.equal(b, again)
    assert (cache.misses, cache.hits) == (2, 1)


def test_latent_cache_encodes_only_the_items_it_has_not_seen():
    """A batch mixing cached and new items encodes the new ones alone and reuses the rest exactly
    (with several task modes, a whole batch is rarely all cached)."""
    from layerkit_plugins.cogvideox.backbone import CogVideoX

    from layerkit.protocols import Packed, Segment
    from layerkit.training.cache import LatentCache

    backbone = CogVideoX(tiny=True).eval()
    video = torch.rand(2, 8, 3, 32, 32) * 2 - 1
    names = ["foreground", "alpha", "background", "blended"]
    given = torch.zeros(2, 32, dtype=torch.bool)
    given[:, 24:] = True  # decomposition: the blended clip given
    both = Packed([Segment(n, 8, video) for n in names], given, [["a"] * 3, ["b"] * 3], 32, 32)
    one = Packed([Segment(n, 8, video[:1]) for n in names], given[:1], [["a"] * 3], 32, 32)
    cache = LatentCache()
    first, _ = cache.encode(backbone, one, {"_index": [7]})
    calls = []
    original = backbone.encode_video
    backbone.encode_video = lambda clip: calls.append(clip.shape[0]) or original(clip)
    mixed, layout = cache.encode(backbone, both, {"_index": [7, 8]})
    assert calls and set(calls) == {1}, "only the new item is encoded"
    assert torch.equal(mixed[0], first[0]) and mixed.shape == (2, *first.shape[1:])
    # two passes a sample (the whole clip, the given frames alone): item 7's both cached, item 8's both new
    assert (cache.misses, cache.hits) == (4, 2) and bool(layout.given[:, -2:].all())


def test_given_layers_are_encoded_in_training_as_sampling_encodes_them(registry):
    """The causal VAE gives a given layer after the first the context of the frames before it;
    sampling does not know them (zeros), so training encodes the given latent frames that way too,
    and the targets (the other latent frames) from the whole clip. A given prefix is the same
    both ways; the latent cache keeps each given pattern apart."""
    from layerkit_plugins.cogvideox.backbone import CogVideoX

    from layerkit.pipeline import encode_packed
    from layerkit.protocols import Packed, Segment
    from layerkit.training.cache import LatentCache

    backbone = CogVideoX(tiny=True).eval()
    torch.manual_seed(0)
    layers = {n: torch.rand(1, 8, 3, 32, 32) * 2 - 1 for n in ("foreground", "alpha", "background", "blended")}
    given = torch.zeros(1, 32, dtype=torch.bool)
    given[:, 24:] = True  # decomposition: the blended clip, last
    train = Packed([Segment(n, 8, v) for n, v in layers.items()], given, [["a"] * 3], 32, 32)
    sample = Packed([Segment(n, 8, v if n == "blended" else None) for n, v in layers.items()], given,
                    [["a"] * 3], 32, 32)
    with torch.no_grad():
        trained, layout = encode_packed(backbone, train, training=True)
        sampled, _ = encode_packed(backbone, sample)
        whole = backbone.encode_video(torch.cat(list(layers.values()), dim=1))
    assert layout.given[0].tolist() == [False] * 6 + [True] * 2
    assert torch.allclose(trained[:, :, 6:], sampled[:, :, 6:], atol=1e-6)  # what the model reads
    assert torch.allclose(trained[:, :, :6], whole[:, :, :6], atol=1e-6)  # what it learns to make
    assert (whole[:, :, 6:] - sampled[:, :, 6:]).abs().max() > 1e-3  # the context the one pass leaks
    with torch.no_grad():  # train.given_latents=clip: the released code's one pass, every frame from the clip
        assert torch.allclose(encode_packed(backbone, train, training=True, given_latents="clip")[0], whole, atol=1e-6)
    cache = LatentCache()
    cached, _ = cache.encode(backbone, train, {"_index": [3]})
    assert torch.allclose(cached, trained, atol=1e-6) and (cache.misses, cache.hits) == (2, 0)
    generate = Packed(train.segments, torch.zeros_like(given), [["a"] * 3], 32, 32)
    calls = []
    original = backbone.encode_video
    backbone.encode_video = lambda clip: calls.append(clip.shape[0]) or original(clip)
    shared, _ = cache.encode(backbone, generate, {"_index": [3]})  # generation packs the clip alike:
    assert calls == [] and (cache.misses, cache.hits) == (2, 1)     # its one pass is decomposition's first
    assert torch.allclose(shared, whole, atol=1e-6) and torch.equal(shared[:, :, :6], cached[:, :, :6])
    bg2fg = given.clone()
    bg2fg[:, 24:], bg2fg[:, 16:24] = False, True  # another given pattern: its own pass over the given frames
    other, _ = cache.encode(backbone, Packed(train.segments, bg2fg, [["a"] * 3], 32, 32), {"_index": [3]})
    assert calls == [1] and (cache.misses, cache.hits) == (3, 2) and torch.equal(other[:, :, 6:], whole[:, :, 6:])


def test_a_given_prefix_ending_where_the_vaes_chunk_ends_needs_no_pass_of_its_own():
    """fg2bg gives the copy of frame 0, the foreground and the matte: frames 0-16 of 33, the first
    two of the CogVideoX VAE's chunks (9 + 8 frames, each normalised alone, causal across): one
    pass over the clip encodes them exactly as the clip with the rest zeroed, so none is made."""
    from layerkit_plugins.cogvideox.backbone import CogVideoX

    from layerkit.pipeline import encode_packed
    from layerkit.protocols import Packed, Segment

    backbone = CogVideoX(tiny=True).train()
    assert [n for n in range(1, 34) if backbone.encodes_prefix_alone(n, 33)] == [9, 17, 25, 33]
    assert [n for n in range(1, 33) if backbone.encodes_prefix_alone(n, 32)] == [8, 16, 24, 32]
    assert not backbone.encodes_prefix_alone(4, 5)  # one chunk: only the whole clip
    torch.manual_seed(0)
    clip = torch.rand(2, 33, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        backbone.eval()
        whole = backbone.encode_video(clip)
        alone = backbone.encode_video(clip * (torch.arange(33) < 17).float()[None, :, None, None, None])
    assert torch.equal(whole[:, :, :5], alone[:, :, :5])  # latent frames 0-4 (frames 0-16): bit for bit
    assert (whole[:, :, 5:] - alone[:, :, 5:]).abs().max() > 1e-3
    given = torch.zeros(2, 33, dtype=torch.bool)
    given[:, :17] = True
    names = [("first_frame", 1), ("foreground", 8), ("alpha", 8), ("background", 8), ("blended", 8)]
    segments, start = [], 0
    for name, n in names:
        segments.append(Segment(name, n, clip[:, start : start + n]))
        start += n
    passes = []
    with torch.no_grad():
        latents, layout = encode_packed(backbone, Packed(segments, given, [["a"] * 3] * 2, 32, 32), training=True,
                                        encode_video=lambda v, part: passes.append(part) or backbone.encode_video(v))
        assert passes == [("clip",)] and torch.allclose(latents, whole, atol=1e-6)
        given[:, :17], given[:, 17:25] = False, True  # bg2fg-like: the background alone, not a prefix
        encode_packed(backbone, Packed(segments, given, [["a"] * 3] * 2, 32, 32), training=True,
                      encode_video=lambda v, part: passes.append(part) or backbone.encode_video(v))
    assert passes == [("clip",), ("clip",), ("given",)]


def test_latent_cache_encodes_the_posteriors_mode_and_draws_no_random_number():
    """A miss draws nothing from the global generator (so the run's noise does not depend on what
    the cache holds, and a resumed run with an empty cache draws what the uninterrupted one drew)
    and leaves the backbone in training mode."""
    from layerkit_plugins.cogvideox.backbone import CogVideoX

    from layerkit.protocols import Packed, Segment
    from layerkit.training.cache import LatentCache

    backbone = CogVideoX(tiny=True).train()
    video = torch.rand(1, 8, 3, 32, 32) * 2 - 1
    names = ["foreground", "alpha", "background", "blended"]
    given = torch.zeros(1, 32, dtype=torch.bool)
    given[:, 24:] = True
    packed = Packed([Segment(n, 8, video) for n in names], given, [["a"] * 3], 32, 32)
    state = torch.get_rng_state()
    cached, _ = LatentCache().encode(backbone, packed, {"_index": [0]})
    assert torch.equal(torch.get_rng_state(), state) and backbone.training
    again, _ = LatentCache().encode(backbone, packed, {"_index": [0]})
    assert torch.equal(cached, again)
    failing = LatentCache()
    backbone.encode_video = lambda clip: (_ for _ in ()).throw(RuntimeError("the VAE failed"))
    with pytest.raises(RuntimeError, match="the VAE failed"):
        failing.encode(backbone, packed, {"_index": [1]})
    assert backbone.training and failing.misses == 0 and not failing.latents  # restored, nothing counted


@needs_weights
def test_sample_without_arguments_writes_layers_preview_and_record(registry, tmp_path, monkeypatch):
    from layerkit.sampling.run import sample

    monkeypatch.chdir(tmp_path)  # the defaults must not depend on the working directory
    started = time.perf_counter()
    out = sample([f"output_dir={tmp_path / 'out'}", "sampler.progress=false"], registry=registry)
    seconds = time.perf_counter() - started
    names = sorted(p.name for p in out.iterdir())
    assert names == ["alpha.mp4", "background.mp4", "blended.mp4", "foreground.mov", "preview.png", "record.json"]
    assert read_video(out / "foreground.mov").frames.shape == (8, 32, 32, 4)
    record = json.loads((out / "record.json").read_text())
    metrics = record["metrics"]
    print(json.dumps(metrics))
    assert {"alpha_iou", "alpha_iou_heldout", "alpha_iou_composite", "compositing_error"} <= set(metrics)
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    # the one sample's own figures, with its folder and held-out prompt: their mean is the record's
    (row,) = record["metrics_per_sample"]
    assert row["output"] == "." and isinstance(row["prompt"], str) and row["prompt"]
    assert all(row[k] == pytest.approx(v) for k, v in metrics.items())
    print(f"layerkit sample took {seconds:.1f} s")


@pytest.mark.slow
@needs_weights
def test_sample_meets_the_issue_12_targets_on_16_held_out_prompts(registry, tmp_path):
    """Issue 12's record (MODEL_CARD.md: colour 1.000, shape 0.875, alpha IoU 0.858, compositing
    error 0.047 on these 16 held-out prompts)."""
    from layerkit.sampling.run import sample

    out = sample([f"output_dir={tmp_path / 'out'}", "sampler.progress=false", "+inputs.num_samples=16"],
                 registry=registry)
    metrics = json.loads((out / "record.json").read_text())["metrics"]
    assert metrics["colour_correct"] >= 0.9 and metrics["shape_correct"] >= 0.8
    assert metrics["alpha_iou"] >= 0.8 and metrics["compositing_error"] <= 0.05


@needs_weights
def test_decompose_reads_the_given_blended_clip(registry, tmp_path):
    """task=layerflow_decompose with a user's blended video (a held-out shapes clip written as
    H.264): the matte it gives covers the clip's true sprite, and the blended output is that clip
    (as read, not its VAE round trip: task.keep_given)."""
    import numpy as np

    from layerkit.data.evaluate import alpha_iou
    from layerkit.io.video import write_video
    from layerkit.sampling.run import sample

    ious, back = [], []
    for index in range(3):
        clip = shapes_clip(index)
        given = (clip["blended"].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        write_video(tmp_path / f"scene{index}.mp4", given)
        out = sample(["task=layerflow_decompose", f"+inputs.blended={tmp_path / f'scene{index}.mp4'}",
                      f"output_dir={tmp_path / f'out{index}'}", "sampler.progress=false"], registry=registry)
        alpha = torch.from_numpy(read_video(out / "alpha.mp4").frames[..., :1]).float().div(255).permute(0, 3, 1, 2)
        ious.append(alpha_iou(alpha, clip["foreground_alpha"]))
        blended = read_video(out / "blended.mp4").frames.astype(np.float32)
        write_video(tmp_path / f"again{index}.mp4", read_video(tmp_path / f"scene{index}.mp4").frames)
        as_read = read_video(tmp_path / f"again{index}.mp4").frames.astype(np.float32)  # the clip as read, written again
        back.append(float(np.abs(blended - as_read).mean() / 255))
    print("decomposition alpha IoU against the true alpha:", [round(v, 3) for v in ious],
          "blended.mp4 against the clip as read (mean error):", [round(v, 3) for v in back])
    assert min(ious) >= 0.7 and sum(ious) / len(ious) >= 0.8  # issue 12: 0.8
    assert max(back) < 0.002, "the given clip comes back as given (as read, written again as H.264)"


def _layers(out: Path) -> dict[str, np.ndarray]:  # noqa: F821
    import numpy as np

    files = {"foreground": "foreground_png", "alpha": "alpha.mp4", "background": "background.mp4",
             "blended": "blended.mp4"}
    return {k: read_video(out / f).frames.astype(np.float32) / 255 for k, f in files.items()}


def _compare(a: dict, b: dict) -> dict[str, float]:
    import numpy as np

    out = {k: float(np.abs(a[k] - b[k]).mean()) for k in a}
    ma, mb = a["alpha"][..., 0] >= 0.5, b["alpha"][..., 0] >= 0.5
    out["alpha_iou"] = float((ma & mb).sum() / max((ma | mb).sum(), 1))
    return out


@needs_weights
def test_bf16_sampling_follows_fp32(registry, tmp_path):
    """dtype=bf16 runs the CogVideoX backbone, adapters and VAE in bfloat16 (CPU here): every
    layer close to the fp32 sample, the same matte."""
    from layerkit.sampling.run import sample

    outs = {d: sample([f"dtype={d}", f"output_dir={tmp_path / d}", "sampler.progress=false", "rgba_format=png"],
                      registry=registry) for d in ("fp32", "bf16")}
    assert json.loads((outs["bf16"] / "record.json").read_text())["config"]["dtype"] == "bf16"
    diff = _compare(_layers(outs["fp32"]), _layers(outs["bf16"]))
    print("bf16 vs fp32:", json.dumps({k: round(v, 4) for k, v in diff.items()}))
    assert all(diff[k] < 0.03 for k in ("alpha", "background", "blended"))
    assert diff["foreground"] < 0.06  # RGBA: colour under a near-zero matte is free to differ
    assert diff["alpha_iou"] >= 0.9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@needs_weights
def test_cpu_offload_on_cuda_matches_fp32_cpu_sampling(registry, tmp_path):
    """Model CPU offload (weights wait on the CPU, run on the GPU) and resident CUDA sampling give
    the fp32 CPU result, with the layer embedding and LoRAs attached."""
    from layerkit.sampling.run import sample

    runs = {"cpu": ["device=cpu"], "cuda": ["device=cuda", "memory.cpu_offload=false"],
            "offload": ["device=cuda", "memory.cpu_offload=true"]}
    outs = {k: _layers(sample([*v, f"output_dir={tmp_path / k}", "sampler.progress=false", "rgba_format=png"],
                              registry=registry)) for k, v in runs.items()}
    for name in ("cuda", "offload"):
        diff = _compare(outs["cpu"], outs[name])
        print(name, "vs fp32 CPU:", json.dumps({k: round(v, 4) for k, v in diff.items()}))
        assert all(diff[k] < 0.02 for k in ("foreground", "alpha", "background", "blended"))
        assert diff["alpha_iou"] >= 0.95
    assert _compare(outs["cuda"], outs["offload"])["alpha"] < 0.005


@needs_weights
def test_diagnostics_show_what_the_model_card_says():
    from layerkit_plugins.layerflow.toy.diagnose import (
        colours,
        given,
        implied,
        latent_stats,
        prompt_words,
        shapes,
        step_time,
        swap,
        x0,
    )

    rows = colours(24)  # held-out packed clips through the committed VAE, one pass
    print(json.dumps(rows))
    for colour, (r, g, _b, _) in rows.items():  # red and green (cyan and magenta) decode apart
        if colour in ("red", "magenta"):
            assert r - g > 0.5, colour
        if colour in ("green", "cyan"):
            assert g - r > 0.5, colour
    assert {"red", "green"} <= set(rows)
    losses = given(8, [800])[800]
    print(json.dumps(losses))
    assert losses["right blended"] < 0.8 * losses["another sample's blended"], "decomposition reads the given clip"
    assert losses["right blended"] < 0.8 * losses["blended noised (nothing given)"]
    timing = step_time(1)
    assert 0.0 < timing["encode_share"] < 1.0
    rows = swap(4)  # a decomposition's latents against the true ones, one layer swapped at a time
    print(json.dumps(rows))
    assert {f"latent MSE: {k}" for k in ("foreground", "alpha", "background")} <= set(rows)
    assert "latent MSE: blended" not in rows, "the given clip's latents are the same in both"
    assert rows["decoded alpha IoU: all true"] >= 0.75  # 0.893 over 16 clips, 0.83 over these 4
    assert rows["decoded alpha IoU: all sampled"] < rows["decoded alpha IoU: all true"]
    rows = shapes(4)  # the sprite redrawn as the other shapes: on the toy's world (sprites of 0.55-0.8) the
    print(json.dumps(rows))  # nearest other shape lies 7-8 times as far as a 1 px move (the world's own sizes: 1.35)
    for layer in ("foreground", "alpha"):
        nearest = rows[f"latent MSE, the nearest other shape: {layer}"]
        assert 0.0 < nearest <= rows[f"latent MSE, another shape (mean of three): {layer}"]
        assert nearest > 3 * rows[f"latent MSE, moved 1 px: {layer}"]
        assert rows[f"latent MSE, another shape (mean of three): {layer}"] < rows[f"latent variance: {layer}"]
    rows = implied(per_colour=1)  # the composite-implied matte through the committed VAE, and what loses it
    print(json.dumps(rows))
    assert rows["clips"] == 6 and rows["alpha IoU, all decoded (the ceiling)"] > 0.6
    assert rows["alpha IoU, decoded matte against the true matte"] > 0.8
    assert rows["disagreeing pixels farther (share of the union)"] < rows["disagreeing pixels within 2 px of the sprite (share of the union)"]
    rows = x0(None, None, 4, "val", [39, 800])  # one-step clean predictions of the committed stage 1
    print(json.dumps(rows))
    for mode in ("generate", "decompose"):
        low, high = rows[mode][39], rows[mode][800]
        assert low["snr"] > 8 > 0.01 > high["snr"]
        assert low["latent MSE"] < high["latent MSE"] and low["input alpha_iou"] > high["input alpha_iou"]
        assert low["alpha_iou"] > 0.6 and 0.0 <= low["shape_correct"] <= 1.0
    stats = latent_stats(None, 8, ["alpha", "blended"])  # the VAE's own latents, per channel
    print(json.dumps(stats))
    assert set(stats) == {"alpha", "blended"} and all(len(v["std"]) == 8 for v in stats.values())
    mean_std = {k: sum(v["std"]) / len(v["std"]) for k, v in stats.items()}  # 1024 train clips: 0.21 and 0.98
    assert mean_std["alpha"] < 0.4 and mean_std["blended"] > 0.7, "a matte's latents lie far below unit scale"
    # generation reads its prompt's shape word as well as its colour word (the model card's "Generation
    # reads the shape word"; the model before read the colour word alone, 21-50 times as strongly):
    # where the sprite is decided the decoded shape and colour follow whichever word the prompt names
    shape_rows = prompt_words(None, None, 4, "val", [600], word="shape", amplify=(0.0,))
    colour_rows = prompt_words(None, None, 4, "val", [600], word="colour", amplify=(0.0,))
    print(json.dumps(shape_rows), json.dumps(colour_rows))
    moved = "prediction change, word replaced (latent MSE)"
    assert colour_rows[600][moved] > shape_rows[600][moved] > 0.1 * colour_rows[600][moved] > 0.0  # 0.030, 0.105
    assert shape_rows[600]["shape follows the prompt"] > 0.5  # 0.94 here, 0.90 over 32 val clips (chance 0.25)
    assert colour_rows[600]["colour follows the prompt"] > 0.5  # 0.75 here
    assert shape_rows[600]["prediction error (latent MSE)"] == colour_rows[600]["prediction error (latent MSE)"]


def test_replace_word_replaces_whole_words_only():
    """prompts: the sprite's word is replaced where it stands as a word, not inside another word."""
    from layerkit_plugins.layerflow.toy.diagnose import replace_word

    assert replace_word("a red square moving left over reddish stripes", "red", "green") == \
        "a green square moving left over reddish stripes"
    assert replace_word("a cross, still", "cross", "circle") == "a circle, still"


@pytest.mark.parametrize("kind", ["v_prediction", "epsilon", "sample"])
def test_predicted_x0_inverts_the_training_target(kind):
    """diagnose.predicted_x0 of the exact target (v, noise or x0) at t gives the clean latents back."""
    from diffusers import CogVideoXDDIMScheduler
    from layerkit_plugins.layerflow.toy.diagnose import predicted_x0

    from layerkit.training.weighting import prediction_target

    scheduler = CogVideoXDDIMScheduler(prediction_type=kind, rescale_betas_zero_snr=kind != "epsilon",
                                       snr_shift_scale=3.0, timestep_spacing="trailing")
    z, noise = torch.randn(2, 4, 3, 4, 4, dtype=torch.float64), torch.randn(2, 4, 3, 4, 4, dtype=torch.float64)
    for t in (39, 500):
        ts = torch.full((2,), t)
        noisy = scheduler.add_noise(z, noise, ts)
        target = prediction_target(scheduler, z, noise, ts)
        assert torch.allclose(predicted_x0(scheduler, noisy, target, t), z, atol=1e-6), (kind, t)


def test_redraw_keeps_the_clip_and_changes_only_the_sprite(monkeypatch):
    """diagnose.redraw: the sprite's own shape gives the clip back (to float32 rounding of the
    size); another shape or a 1 px move changes the matte and the blended clip, never the
    background; the overrides of ``swap`` and ``shapes`` may come before or after options."""
    from layerkit_plugins.layerflow.toy.diagnose import redraw

    from layerkit.data.shapes import SHAPES, ShapesConfig, held_out_seed, make_sample

    for i in range(8):
        clip = make_sample(held_out_seed("test", 0, i), ShapesConfig(num_frames=8, height=32, width=32))
        same = redraw(clip, clip["meta"]["sprites"][0]["shape"])
        for key in ("foreground_alpha", "foreground_rgb", "blended", "background"):
            assert torch.allclose(same[key], clip[key], atol=1e-5), (i, key)
    sample = make_sample(held_out_seed("test", 0, 0), ShapesConfig(num_frames=8, height=32, width=32))
    shape = sample["meta"]["sprites"][0]["shape"]
    for other in [s for s in SHAPES if s != shape] + [shape]:
        changed = redraw(sample, other, shift=1.0 if other == shape else 0.0)
        assert not torch.equal(changed["foreground_alpha"], sample["foreground_alpha"]), other
        assert torch.equal(changed["background"], sample["background"])
        alpha = changed["foreground_alpha"]
        colour = changed["foreground_rgb"][alpha.expand_as(changed["foreground_rgb"]) > 0]
        assert torch.allclose(changed["blended"], changed["foreground_rgb"] * alpha + sample["background"] * (1 - alpha),
                              atol=1e-6) and colour.numel() > 0
    from layerkit_plugins.layerflow.toy import diagnose

    seen = {}
    monkeypatch.setattr(diagnose, "shapes", lambda num, extra: seen.update(num=num, extra=list(extra)) or {})
    threads = torch.get_num_threads()
    try:
        diagnose.main(["shapes", "--num", "4", "backbone.path=X", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)  # main sets the process's torch threads
    assert seen == {"num": 4, "extra": ["backbone.path=X"]}


def test_a_vae_of_2x_spatial_compression_packs_and_sizes_its_transformer():
    """toy-layerflow-vae --spatial-compression 2: diffusers' CogVideoX VAE halves time in the same
    blocks as space, so the packed 32 frames of 32x32 become 16 latent frames of 16x16 (17 with the
    frame-0 copy), decoded back to the same frames; the transformer written beside it is sized for
    that latent grid and time compression."""
    from layerkit_plugins.layerflow.toy.model import (
        build_components,
        build_vae,
        compression_changes,
        vae_compression,
    )

    vae = build_vae(0, **compression_changes(2)).eval()
    assert vae_compression(vae) == (2, 2) and vae_compression(build_vae(0)) == (4, 4)
    with torch.no_grad():
        for frames, latent_frames in ((32, 16), (33, 17)):
            z = vae.encode(torch.randn(1, 3, frames, 32, 32)).latent_dist.mode()
            assert tuple(z.shape) == (1, 8, latent_frames, 16, 16)
            assert tuple(vae.decode(z).sample.shape) == (1, 3, frames, 32, 32)
    config = build_components(0, vae=vae)["transformer"].config
    assert (config.sample_width, config.sample_height, config.temporal_compression_ratio) == (16, 16, 2)
    assert config.patch_size == 4 and build_components(0)["transformer"].config.patch_size == 2  # 8x8-pixel tokens
    with pytest.raises(ValueError, match="must be 2 or 4"):
        compression_changes(8)


def test_toy_text_pretraining_pairs_each_layer_with_its_prompt_block_and_writes_a_base(tmp_path, capsys):
    """toy-layerflow-text: the foreground over grey, the background and the blended clip, each with
    its indexed prompt block; a few contrastive steps move the T5 (returned frozen), and the base
    written holds the other folders as they were; an existing --out or a folder without the model's
    folders is refused in one sentence."""
    from layerkit_plugins.layerflow.toy import text
    from layerkit_plugins.layerflow.toy.model import FRAMES, SIZE

    from layerkit.data.shapes import ShapesConfig, make_sample, seed_for

    sample = make_sample(seed_for("train", 0, 3), ShapesConfig(num_frames=FRAMES, height=SIZE, width=SIZE))
    pairs = text.layer_pairs(sample)
    assert [p[0] for p in pairs] == [f"0, {sample['foreground_prompt']}", f"1, {sample['background_prompt']}",
                                     f"2, {sample['prompt']}"]
    assert all(tuple(clip.shape) == (3 * FRAMES, SIZE, SIZE) and clip.abs().max() <= 1 for _, clip in pairs)
    blended = sample["blended"].float()  # [F, 3, H, W] in [0, 1]
    torch.testing.assert_close(pairs[2][1], (blended * 2 - 1).flatten(0, 1), atol=1e-5, rtol=0)
    from transformers import T5EncoderModel
    before = T5EncoderModel.from_pretrained(str(text.WEIGHTS / "text_encoder")).state_dict()
    t5, record = text.pretrain(text.WEIGHTS, steps=2, batch=4, lr=1e-3, seed=0, data_size=64)
    assert not any(p.requires_grad for p in t5.parameters()) and not t5.training
    assert any(not torch.equal(before[k], v) for k, v in t5.state_dict().items())
    assert len(record["loss_every_50_steps"]) == 1 and 0 <= record["retrieval_after"]["shape of the nearest prompt is the clip's"] <= 1
    for args, message in ((["--out", str(tmp_path)], "exists; choose a new --out"),
                          (["--base", str(tmp_path), "--out", str(tmp_path / "new")], "is not a toy model folder")):
        with pytest.raises(SystemExit) as error:
            text.main(args)
        assert error.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_toy_text_leaves_nothing_behind_when_writing_fails(tmp_path, monkeypatch):
    """toy-layerflow-text writes its base through a .partial folder: a failure while writing leaves
    neither --out nor the partial folder."""
    from layerkit_plugins.layerflow.toy import text

    class Broken:
        def save_pretrained(self, *args, **kwargs):
            raise OSError("disk full")

    monkeypatch.setattr(text, "pretrain", lambda *a, **k: (Broken(), {"loss_every_50_steps": []}))
    with pytest.raises(OSError, match="disk full"):
        text.main(["--out", str(tmp_path / "base"), "--steps", "1"])
    assert list(tmp_path.iterdir()) == []


def test_denoiser_geometries_for_a_2x_vae_as_diffusers_takes_them():
    """What the card's "Measured for the next model" says of the 2x VAE's denoiser: patch 4 with
    temporal patches of 2 keeps 128 tokens for 16 latent frames of 16x16 with 3D rotary positions,
    not with the sincos table (sized for every latent frame), and an odd latent frame count (fg2bg's
    and bg2fg's 17) needs padding."""
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from layerkit_plugins.layerflow.toy.model import TRANSFORMER_CONFIG

    def run(rope: bool, frames: int):
        config = dict(TRANSFORMER_CONFIG, sample_width=16, sample_height=16, temporal_compression_ratio=2,
                      patch_size=4, patch_size_t=2, use_rotary_positional_embeddings=rope)
        model = CogVideoXTransformer3DModel(**config).eval()
        rotary = get_3d_rotary_pos_embed(32, None, (4, 4), (frames + 1) // 2, grid_type="slice", max_size=(4, 4),
                                         device="cpu") if rope else None
        with torch.no_grad():
            return model(hidden_states=torch.randn(1, frames, 8, 16, 16), encoder_hidden_states=torch.randn(1, 16, 64),
                         timestep=torch.tensor([10]), image_rotary_emb=rotary, return_dict=False)[0]

    assert tuple(run(True, 16).shape) == (1, 16, 8, 16, 16)
    with pytest.raises(RuntimeError):
        run(False, 16)
    with pytest.raises(RuntimeError):
        run(True, 17)


def test_regions_split_the_compositing_error_by_the_output_matte():
    """toy-layerflow-diagnose regions: the compositing error split into background, edge and
    interior of the output matte; the parts sum to the overall error."""
    from layerkit_plugins.layerflow.toy.diagnose import region_errors

    alpha = torch.zeros(2, 1, 4, 4)
    alpha[:, :, :2] = 1.0          # top half interior
    alpha[:, :, 2, :2] = 0.5       # two edge pixels per frame
    fg, bg = torch.full((2, 3, 4, 4), 0.8), torch.full((2, 3, 4, 4), 0.2)
    blended = fg * alpha + bg * (1 - alpha)
    blended[:, :, 3] += 0.1        # the bottom row (background) off by 0.1
    row = region_errors([{"foreground": torch.cat([fg, alpha], 1), "alpha": alpha, "background": bg,
                          "blended": blended}])
    assert row["compositing_error"] == pytest.approx(0.1 * 4 / 16, abs=1e-4)
    assert (row["interior_share"], row["edge_share"], row["background_share"]) == (0.5, 0.125, 0.375)
    assert row["background_mean"] == pytest.approx(0.1 * 4 / 6, abs=1e-4) and row["interior_part"] == 0.0
    parts = row["background_part"] + row["edge_part"] + row["interior_part"]
    assert parts == pytest.approx(row["compositing_error"], abs=1e-4)


def test_composite_to_is_layers_or_blended(tmp_path):
    from layerkit_plugins.layerflow.toy.train_vae import train

    with pytest.raises(SystemExit, match="--composite-to is layers or blended; got 'fg'"):
        train(tmp_path / "run", 1, 0, 1e-3, 1, 1e-4, 0.0, 1.0, composite_to="fg", write=False)
    assert not (tmp_path / "run").exists()


def test_reached_marks_the_latent_values_whose_window_holds_the_matte():
    """toy-layerflow-diagnose reach: a latent value is reached when its frames and 4 x 4 cell hold a
    matte pixel over 0.05; dilated, its 3 x 3 neighbours too; windows outside the segment are not its own."""
    from layerkit_plugins.layerflow.toy.diagnose import reached

    alpha = torch.zeros(1, 8, 32, 32)
    alpha[0, 5, 9, 17] = 0.5                       # frame 5 (latent frame 1), cell (2, 4)
    alpha[0, 2, 0, 0] = 0.04                       # under the threshold
    windows = [(0, 4), (4, 8), (8, 12), (12, 16)]  # a packed clip of two 8-frame segments; this one starts at 8
    out = reached(alpha, windows, 8, (8, 8))
    assert out.shape == (1, 2, 8, 8) and out.sum() == 1 and out[0, 1, 2, 4]
    grown = reached(alpha, windows, 8, (8, 8), dilate=1)
    assert grown.sum() == 9 and grown[0, 1, 1:4, 3:6].all()


def test_diagnose_refuses_no_clips(capsys):
    from layerkit_plugins.layerflow.toy.diagnose import main

    with pytest.raises(SystemExit):
        main(["compressed", "--num", "0"])
    assert "--num must be at least 1; got 0." in capsys.readouterr().err


def test_compressed_gives_each_clip_as_a_file_a_user_could(tmp_path):
    """`compressed --format`: H.264 (yuv420p, as write_video), H.264 of full colour resolution and a
    PNG sequence, each read back through the reader sampling uses; the PNG one losslessly, and
    yuv444p keeps the colour yuv420p subsamples at a sprite's edge."""
    import numpy as np
    from layerkit_plugins.layerflow.toy.diagnose import GIVEN_FORMATS, _write_given

    from layerkit.io.video import read_video

    frames = (shapes_clip(0)["blended"].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    errors = {}
    for fmt in GIVEN_FORMATS:
        path = _write_given(tmp_path / fmt, frames, fmt)
        back = read_video(path).frames[..., :3]
        assert back.shape == frames.shape, fmt
        errors[fmt] = float(np.abs(back.astype(np.float32) - frames).mean())
    assert errors["png"] == 0.0
    assert errors["h264-444"] < errors["h264"], errors
