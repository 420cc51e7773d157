"""LayerAnimate on the core's protocols: the Layer ControlNet as a control (every guidance row with its own
conditioning), the masked fusion as an adapter reading what the control provides, the tasks, training and
sampling end to end, the authors' layouts and demos, and the bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from layerkit.errors import LayerkitError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "layeranimate" / "golden"
TINY = ["backbone=tooncrafter_tiny"]


def _parts(registry, training=False, *extra):
    from layerkit.config import compose
    from layerkit.pipeline import build_parts

    cfg = compose("train" if training else "sample", ["+experiment=layeranimate", *TINY, *extra], registry)
    parts = build_parts(cfg, registry, training=training)
    if not training:  # as the sampler does: deterministic VAE encodings (posterior means)
        for module in (parts.backbone, *parts.controls.values(), *parts.adapters.values()):
            module.eval()
    return cfg, parts


def _batch(parts, n=2):
    from layerkit_plugins.layeranimate.shapes import shapes_layeranimate_sample

    from layerkit.data.shapes import ShapesConfig

    samples = []
    for i, mode in enumerate(["i2v", "interpolate"][:n]):
        sample = shapes_layeranimate_sample(100 + i, mode=mode, generator=torch.Generator().manual_seed(i),
                                            config=ShapesConfig(num_frames=4, height=32, width=32, num_sprites=2))
        samples.append(parts.controls["layers"].prepare(sample))
    return parts.task.collate(samples)


def test_untrained_layeranimate_is_tooncrafter_exactly(registry):
    """Zero-initialised control encoders and fusion: the UNet output equals plain ToonCrafter's."""
    from layerkit.pipeline import add_control_inputs, encode_packed, make_step, predict
    from layerkit.sampling.loop import stack_conditions

    _, parts = _parts(registry)
    batch = _batch(parts)
    packed = add_control_inputs(parts.task.pack(batch, training=False), batch, parts.controls)
    assert packed.given[0].tolist() == [True, False, False, False] and packed.given[1].tolist() == [True, False, False, True]
    backbone = parts.backbone
    with torch.no_grad():
        latents, _ = encode_packed(backbone, packed)
        cond = backbone.encode_conditions(packed, latents=latents)
        both = stack_conditions(backbone.negative_conditions(packed, cond, ""), cond, 2)
        x = torch.randn(4, 4, 4, 4, 4)
        t = torch.tensor([800, 200, 800, 200])
        with_layers = predict(parts, packed, make_step(packed, x, t, both, copies=2))
        plain = backbone.predict(x, t, both)
    assert torch.equal(with_layers, plain)
    features = parts.controls["layers"](make_step(packed, x, t, both, copies=2), backbone)["layer_features"]["features"]
    assert [f.shape[:3] for f in features] == [(4, 4, 4)] * len(features), "[R, N, F, ...]: every guidance row"


def test_control_and_fusion_change_the_output_once_trained_and_respect_validity(registry):
    from layerkit.pipeline import add_control_inputs, encode_packed, make_step, predict

    _, parts = _parts(registry)
    torch.manual_seed(0)
    for p in parts.backbone.denoiser.out.parameters():  # the UNet's zero-initialised output conv
        torch.nn.init.normal_(p, std=0.2)
    for p in parts.adapters["fusion"].fusion.parameters():
        torch.nn.init.normal_(p, std=0.2)
    for name, p in parts.controls["layers"].controlnet.named_parameters():
        if "embedding" in name:
            torch.nn.init.normal_(p, std=0.2)
    batch = _batch(parts)
    packed = add_control_inputs(parts.task.pack(batch, training=False), batch, parts.controls)
    backbone = parts.backbone
    with torch.no_grad():
        latents, _ = encode_packed(backbone, packed)
        cond = backbone.encode_conditions(packed, latents=latents)
        x, t = torch.randn(2, 4, 4, 4, 4), torch.tensor([500, 500])
        base = predict(parts, packed, make_step(packed, x, t, cond))
        assert not torch.allclose(base, backbone.predict(x, t, cond), atol=1e-5)
        invalid = int(torch.nonzero(~packed.extras["layer_validity"][0])[0])
        packed.extras["sketch"][0, invalid] = 0.0  # a padded layer's content is masked out ...
        packed.__dict__.pop("_extras_rows", None)
        parts.controls["layers"]._memo = None
        assert torch.allclose(predict(parts, packed, make_step(packed, x, t, cond)), base, atol=1e-5)
        packed.extras["sketch"][0, 0] = 0.0  # ... a valid one's is not
        packed.__dict__.pop("_extras_rows", None)
        parts.controls["layers"]._memo = None
        assert not torch.allclose(predict(parts, packed, make_step(packed, x, t, cond)), base, atol=1e-5)


def test_trainable_set_is_the_papers(registry):
    _, parts = _parts(registry, True)
    unet = {n for n, p in parts.backbone.denoiser.named_parameters() if p.requires_grad}
    assert unet and all(n.startswith("output_blocks.") and ".1." in n for n in unet), "decoder spatial transformers"
    assert not any("temporal" in n or "temopral" in n for n in unet)
    assert all(p.requires_grad for p in parts.controls["layers"].parameters())
    assert all(p.requires_grad for p in parts.adapters["fusion"].parameters())
    assert not any(p.requires_grad for p in parts.backbone.vae.parameters())


@pytest.mark.skipif(not SHARED.is_dir(), reason="the authors' golden fixtures are not in ../shared")
def test_fusion_adapter_on_the_backbone_reproduces_the_authors_unet_with_controls(registry):
    from layerkit_plugins.layeranimate.fusion import split_fusion_keys
    from safetensors.torch import load_file

    _, parts = _parts(registry)
    backbone, fusion = parts.backbone, parts.adapters["fusion"]
    unet_state, fusion_state = split_fusion_keys(load_file(str(SHARED / "unet_tiny.safetensors")))
    backbone.denoiser.load_state_dict(unet_state)
    fusion.fusion.load_state_dict(fusion.fusion.from_authors_keys(fusion_state))
    inputs, outputs = load_file(str(SHARED / "inputs.safetensors")), load_file(str(SHARED / "outputs.safetensors"))
    features = [outputs[f"controlnet_feature_{i}"] for i in range(4)]
    cond = {"prompt_embeds": inputs["txt"], "image_embeds": outputs["image_tokens"], "fps": inputs["fps"],
            "image_latents": inputs["x"][:, 4:]}
    with torch.no_grad(), backbone.context.use(batch_size=2, num_frames=4, controls={
            "layer_features": {"features": features, "validity": inputs["validity"]}}):
        out = backbone.predict(inputs["x"][:, :4], inputs["ts"], cond)
    assert (out - outputs["unet_out"]).abs().max() <= 1e-5


def test_authors_layer_controlnet_and_fusion_layouts_load_strictly(registry, tmp_path):
    from layerkit_plugins.layeranimate.adapter import LayerFusion
    from layerkit_plugins.layeranimate.control import LayerControl, load_layer_controlnet
    from safetensors.torch import load_file, save_file

    _, parts = _parts(registry)
    net = parts.controls["layers"].controlnet
    net.save_pretrained(str(tmp_path / "layer_controlnet"))
    loaded = LayerControl(parts.backbone, path=str(tmp_path / "layer_controlnet"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.controlnet.state_dict().values(), net.state_dict().values()))
    weights = tmp_path / "layer_controlnet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    save_file({**state, "stray.weight": torch.zeros(1)}, str(weights))
    with pytest.raises(LayerkitError, match="unexpected keys"):
        load_layer_controlnet(tmp_path / "layer_controlnet")
    # the fusion weights ship inside LayerAnimate's unet/: written in the authors' names, read by the adapter
    fusion = parts.adapters["fusion"].fusion
    for p in fusion.parameters():
        torch.nn.init.normal_(p, std=0.1)
    unet_dir = tmp_path / "unet"
    unet_dir.mkdir()
    save_file({**parts.backbone.denoiser.state_dict(), **fusion.to_authors_keys(fusion.state_dict())},
              str(unet_dir / "diffusion_pytorch_model.safetensors"))
    adapter = LayerFusion(pretrained=str(unet_dir))
    adapter.name = "fusion"
    adapter.attach(parts.backbone)
    try:
        assert all(torch.equal(a, b) for a, b in zip(adapter.fusion.state_dict().values(), fusion.state_dict().values()))
    finally:
        adapter.detach(parts.backbone)


def test_train_two_steps_then_sample_with_previews(registry, tmp_path):
    from layerkit.io.video import read_video
    from layerkit.sampling.run import sample
    from layerkit.training.run import train

    run = train(["+experiment=layeranimate", *TINY, "trainer.max_steps=2", f"output_dir={tmp_path / 'run'}"],
                registry=registry)
    weights = run / "weights.safetensors"
    from safetensors.torch import load_file

    keys = load_file(str(weights)).keys()
    assert any(k.startswith("controls.layers.controlnet.") for k in keys)
    assert any(k.startswith("adapters.fusion.fusion.") for k in keys)
    assert any(k.startswith("backbone.denoiser.output_blocks.") for k in keys)
    out = sample(["+experiment=layeranimate", *TINY, f"weights={weights}", "sampler.steps=2", "sampler.progress=false",
                  f"output_dir={tmp_path / 'out'}"], registry=registry)
    names = sorted(p.name for p in out.iterdir())
    assert "video.mp4" in names and "layer0_region.mp4" in names and "layer0_control.mp4" in names
    assert read_video(out / "video.mp4").frames.shape == (4, 32, 32, 3)
    metrics = json.loads((out / "record.json").read_text())["metrics"]
    assert {"frame_error", "keyframe_error"} <= set(metrics)


def _demo(root: Path, **changes) -> Path:
    from PIL import Image

    from layerkit.io.video import write_video

    folder = root / "demo"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.uniform(0, 255, (32, 32, 3)).astype(np.uint8)).save(folder / "first_frame.png")
    Image.fromarray(rng.uniform(0, 255, (32, 32, 3)).astype(np.uint8)).save(folder / "last_frame.png")
    left = np.zeros((32, 32), np.uint8)
    left[:, :16] = 255
    Image.fromarray(left).save(folder / "layer_0.png")
    Image.fromarray(255 - left).save(folder / "layer_1.png")
    sketch = np.full((4, 32, 32, 3), 255, np.uint8)
    sketch[:, 10:12, 4:28] = 0
    write_video(folder / "sketch.mp4", sketch, fps=8)
    track = np.stack([[[8.0 + 2 * f, 16.0]] for f in range(4)]).astype(np.float32)
    np.savez(folder / "trajectory.npz", trajectory=track, width=np.int64(32), height=np.int64(32))
    from omegaconf import OmegaConf

    fields = {"mode": "interpolate", "layer_capacity": 4, "motion_scores": [-1, 0.5, -1, -1],
              "layer_static": [False, False, False, False], "layer_validity": [True, True, False, False],
              "sketch_layer_index": 1, "traj_layer_index": 0, "prompt": "two halves", "n_prompt": "", "fps": 24,
              "seed": 3, **changes}
    OmegaConf.save(OmegaConf.create(fields), folder / "demo.yaml")
    return folder


def test_an_authors_style_demo_samples_and_bad_demos_are_one_sentence(registry, tmp_path):
    from layerkit.sampling.run import sample

    demo = _demo(tmp_path)
    out = sample(["+experiment=layeranimate_demo", *TINY, f"+inputs.demo={demo}", "sampler.steps=2",
                  "sampler.progress=false", f"output_dir={tmp_path / 'out'}"], registry=registry)
    record = json.loads((out / "record.json").read_text())
    assert record["metrics"] is None and any("inputs.demo" in n for n in record["inputs"])
    assert {"layer0_region.mp4", "layer1_control.mp4"} <= {p.name for p in out.iterdir()}
    (demo / "last_frame.png").unlink()
    with pytest.raises(LayerkitError, match="last_frame"):
        sample(["+experiment=layeranimate_demo", *TINY, f"+inputs.demo={demo}", f"output_dir={tmp_path / 'bad'}"],
               registry=registry)
    assert not (tmp_path / "bad").exists()
    five = _demo(tmp_path / "five", layer_capacity=5, motion_scores=[-1] * 5, layer_static=[False] * 5,
                 layer_validity=[True, True, False, False, False])
    with pytest.raises(LayerkitError, match="capacity"):
        sample(["+experiment=layeranimate_demo", *TINY, f"+inputs.demo={five}", f"output_dir={tmp_path / 'bad5'}"],
               registry=registry)


def test_a_prompt_without_layers_is_refused_with_the_way_out(registry, tmp_path):
    from layerkit.sampling.run import sample

    with pytest.raises(LayerkitError, match="inputs.demo"):
        sample(["+experiment=layeranimate", *TINY, "+inputs.prompt=a cat", f"output_dir={tmp_path / 'x'}"],
               registry=registry)


def test_curated_clips_train_layeranimate(registry, tmp_path):
    """Issue 11's end to end: `layerkit curate` on shapes-world videos writes clips that
    `layerkit train +experiment=layeranimate data=layeranimate_folder` trains on."""
    from layerkit_plugins.curation.cli import main as curate

    from layerkit.data.shapes import ShapesConfig, make_sample, seed_for
    from layerkit.io.video import write_video
    from layerkit.training.run import train

    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(2):
        s = make_sample(seed_for("train", 5, i), ShapesConfig(num_frames=16, height=64, width=64, num_sprites=2))
        write_video(videos / f"clip{i}.mp4", (s["blended"].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
    assert curate([str(videos), str(tmp_path / "curated")]) == 0
    from layerkit_plugins.layeranimate.data import CuratedClips

    data = CuratedClips(str(tmp_path / "curated"), num_frames=4, height=32, width=32)
    sample = data[0]
    assert sample["layer_masks"].shape[0] == 4 and sample["trajectory"].shape == (4, 4, 3, 32, 32)
    out = train(["+experiment=layeranimate", *TINY, "data=layeranimate_folder", f"data.root={tmp_path / 'curated'}",
                 "trainer.max_steps=2", f"output_dir={tmp_path / 'run'}"], registry=registry)
    assert json.loads((out / "record.json").read_text())["global_step"] == 2
    with pytest.raises(LayerkitError, match="holds no curated clip"):
        CuratedClips(str(videos))
