"""Sampling for real: repeatable seeds, guidance options, outputs a decoder reads back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY, TINY_SAMPLE, run_cli
from PIL import Image

from layerkit.io.video import read_video
from layerkit.sampling.run import sample
from layerkit.training.run import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from layerkit.registry import Registry

    out = tmp_path_factory.mktemp("trained") / "run"
    train(["+experiment=toy_layered", *TINY, "trainer.max_steps=2", f"output_dir={out}"],
          registry=Registry().load_entry_points())
    return out / "weights.safetensors"


def _sample(registry, out, weights, *extra):
    return sample(["+experiment=toy_layered", *TINY_SAMPLE, f"weights={weights}", f"output_dir={out}", *extra],
                  registry=registry)


def test_outputs_rgba_layers_preview_and_record(registry, trained, tmp_path):
    out = _sample(registry, tmp_path / "s", trained)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["alpha.mp4", "background.mp4", "blended.mp4", "foreground.mov", "preview.png", "record.json"]
    fg = read_video(out / "foreground.mov")
    assert fg.frames.shape == (4, 16, 16, 4), "the foreground is a real RGBA ProRes 4444 file"
    assert read_video(out / "blended.mp4").frames.shape == (4, 16, 16, 3)
    preview = Image.open(out / "preview.png")
    assert preview.width > 16 * 4 and preview.height > 16 * 4
    record = json.loads((out / "record.json").read_text())
    assert record["seed"] == 0 and record["versions"]["diffusers"]
    assert set(record["files"]) == set(names) - {"record.json"}
    assert record["config"]["weights"] == str(trained)
    assert set(record["metrics"]) >= {"alpha_iou", "compositing_error", "colour_correct"}
    assert not any(p.name.startswith(".") for p in out.parent.iterdir()), "no staging directory left behind"


def test_record_gives_each_samples_figures_beside_their_means(registry, trained, tmp_path):
    """Several held-out samples: record.json names each one's folder, prompt and figures (which
    prompts failed), and ``metrics`` is their mean."""
    out = _sample(registry, tmp_path / "s", trained, "+inputs.num_samples=3")
    record = json.loads((out / "record.json").read_text())
    rows = record["metrics_per_sample"]
    assert [r["output"] for r in rows] == ["sample_00", "sample_01", "sample_02"]
    assert all((out / r["output"]).is_dir() and r["prompt"] for r in rows)
    assert len({r["prompt"] for r in rows}) == 3, "three held-out prompts"
    for key, mean in record["metrics"].items():
        values = [r[key] for r in rows if r.get(key) is not None]
        assert mean == pytest.approx(sum(values) / len(values)), key


def test_same_seed_same_output_other_seed_differs(registry, trained, tmp_path):
    a = _sample(registry, tmp_path / "a", trained, "seed=3", "rgba_format=png")
    b = _sample(registry, tmp_path / "b", trained, "seed=3", "rgba_format=png")
    c = _sample(registry, tmp_path / "c", trained, "seed=4", "rgba_format=png")
    fa, fb, fc = (read_video(d / "foreground_png").frames for d in (a, b, c))
    assert fa.shape[-1] == 4
    assert np.array_equal(fa, fb)
    assert not np.array_equal(fa, fc)


def test_guidance_rescale_dynamic_cfg_scheduler_and_bf16(registry, trained, tmp_path):
    """Each option takes effect on the sampled latents, and bf16 with model CPU offload follows the fp32
    resident run (within 2% of the latents' magnitude); the files of that run are real RGBA."""
    from layerkit.config import compose
    from layerkit.sampling.run import build_sampler

    def latents(*extra):
        cfg = compose("sample", ["+experiment=toy_layered", *TINY_SAMPLE, f"weights={trained}",
                                 "sampler.scheduler=dpm++", *extra], registry)
        return build_sampler(cfg, registry).run().denoised.latents.float()

    options = ["sampler.guidance_scale=7", "sampler.guidance_rescale=0.7", "sampler.dynamic_cfg=true"]
    plain = latents("sampler.guidance_scale=7")
    fp32, bf16 = latents(*options), latents(*options, "dtype=bf16", "memory.cpu_offload=true")
    option_gap, bf16_gap = (fp32 - plain).abs().mean().item(), (bf16 - fp32).abs().mean().item()
    print(f"latents: rescale + dynamic CFG vs without {option_gap:.4f}; bf16 + offload vs fp32 {bf16_gap:.4f}")
    assert option_gap > 1e-3, "guidance rescale and dynamic CFG change the sample"
    assert bf16_gap < 0.02 * fp32.abs().mean().item(), "bf16 with offload stays close to the fp32 resident run"
    out = _sample(registry, tmp_path / "g", trained, *options, "sampler.scheduler=dpm++", "dtype=bf16",
                  "memory.cpu_offload=true", "rgba_format=webm")
    assert read_video(out / "foreground.webm").frames.shape[-1] == 4


def test_guidance_interval_guides_only_inside_it(registry, trained, tmp_path):
    """sampler.guidance_interval=[low, high]: guidance at low <= t <= high only. An interval holding
    every timestep samples as without one; one holding none as an unguided run (guidance_scale 1);
    one in between differs from both. A wrong interval is one sentence."""
    from layerkit.checks import check_config
    from layerkit.config import compose
    from layerkit.errors import LayerkitError
    from layerkit.sampling.run import build_sampler

    def latents(*extra):
        cfg = compose("sample", ["+experiment=toy_layered", *TINY_SAMPLE, f"weights={trained}",
                                 "sampler.guidance_scale=7", *extra], registry)
        return build_sampler(cfg, registry).run().denoised.latents.float()

    guided = latents()
    assert torch.equal(latents("sampler.guidance_interval=[0,1000]"), guided)
    assert torch.equal(latents("sampler.guidance_interval=[1000,2000]"), latents("sampler.guidance_scale=1"))
    half = latents("sampler.guidance_interval=[500,1000]")
    assert (half - guided).abs().mean() > 1e-4 and (half - latents("sampler.guidance_scale=1")).abs().mean() > 1e-4
    for wrong in ("[600,400]", "[1,2,3]", "7", "[a,b]"):
        cfg = compose("sample", ["+experiment=toy_layered", f"sampler.guidance_interval={wrong}"], registry)
        with pytest.raises(LayerkitError, match="sampler.guidance_interval is .*expected null or \\[low, high\\]"):
            check_config("sample", cfg)


def test_guided_at_takes_both_ends_of_the_interval():
    from layerkit.sampling.loop import guided_at

    t = torch.tensor(400)
    assert guided_at(t, None) and guided_at(t, (400.0, 1000.0)) and guided_at(t, (0.0, 400.0))
    assert not guided_at(t, (401.0, 1000.0)) and not guided_at(t, (0.0, 399.0))


def test_rescale_noise_cfg_matches_formula():
    from layerkit.sampling.loop import rescale_noise_cfg

    torch.manual_seed(0)
    guided, text = torch.randn(2, 3, 4, 5, 5) * 3, torch.randn(2, 3, 4, 5, 5)
    out = rescale_noise_cfg(guided, text, 0.7)
    dims = list(range(1, guided.dim()))
    rescaled = guided * text.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    assert torch.allclose(out, 0.7 * rescaled + 0.3 * guided, atol=1e-5)


def test_decompose_keeps_the_given_blended_video(registry, trained, tmp_path):
    from layerkit.data.shapes import ShapesConfig, make_sample, seed_for
    from layerkit.io.video import write_video

    truth = make_sample(seed_for("test", 9, 0), ShapesConfig(num_frames=4, height=16, width=16))
    blended = (truth["blended"].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    src = tmp_path / "blended_in"
    write_video(src, blended)  # a PNG sequence: exact
    out = _sample(registry, tmp_path / "d", trained, "task=layered_decompose", f"+inputs.blended={src}")
    got = read_video(out / "blended.mp4").frames.astype(float)
    reference = read_video(write_video(tmp_path / "ref.mp4", blended)).frames.astype(float)  # same codec
    assert np.abs(got - reference).mean() < 1.0, "the given clip comes back as the input"


def test_cli_sample_runs_in_a_subprocess(trained, tmp_path):
    result = run_cli("sample", "+experiment=toy_layered", *TINY_SAMPLE, f"weights={trained}",
                     f"output_dir={tmp_path / 'cli'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "cli" / "foreground.mov").is_file()
