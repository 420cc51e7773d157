"""Layer-Animate transparent video: Inter-Frame Attention, the i2v/t2v tasks, stage-2 training."""

from __future__ import annotations

import math

import pytest
import torch
from layerkit_plugins.animatediff.backbone import AnimateDiff, tiny
from layerkit_plugins.transparent.data import RGBASpriteClips
from layerkit_plugins.transparent.inter_frame import InterFrameAttention, spatial_self_attentions
from layerkit_plugins.transparent.task import TransparentTask

from layerkit.errors import LayerkitError
from layerkit.pipeline import Parts, encode_packed
from layerkit.registry import get_registry
from layerkit.sampling.loop import SamplerOptions, denoise


def registry():
    """The process registry with this issue's plugins (until the entry points are installed)."""
    import layerkit_plugins.animatediff as animatediff
    import layerkit_plugins.transparent as transparent

    reg = get_registry()
    for module, name in ((animatediff, "animatediff"), (transparent, "transparent")):
        if name not in reg.plugins:
            reg.add_plugin(module, name)
    return reg


@pytest.fixture(scope="module")
def backbone() -> AnimateDiff:
    return tiny(seed=0).eval()


@pytest.fixture
def adapter(backbone):
    ifa = InterFrameAttention()
    ifa.name = "inter_frame"
    ifa.attach(backbone)
    yield ifa
    ifa.detach(backbone)


def test_zero_init_inter_frame_attention_reproduces_animatediff_pipeline(backbone, adapter):
    from diffusers import AnimateDiffPipeline

    pipe = AnimateDiffPipeline(vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer,
                               unet=backbone.denoiser, motion_adapter=None, scheduler=backbone.make_scheduler("sample"))
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red circle moving right"
    ref = pipe(prompt, num_frames=8, height=32, width=32, num_inference_steps=3, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(0), output_type="latent").frames
    task = TransparentTask(mode="t2v", given_reference=False)  # every frame from noise, as the pipeline
    packed = task.pack({"prompt": [prompt], "num_frames": 8, "height": 32, "width": 32}, training=False)
    options = SamplerOptions(steps=3, guidance_scale=7.5, progress=False)
    parts = Parts(backbone, task, adapters={"inter_frame": adapter})
    out = denoise(parts, packed, options, generator=torch.Generator().manual_seed(0)).latents
    diff = (out - ref).abs().max().item()
    assert diff <= 1e-5, diff
    # the adapter does run: once W_O' is non-zero the samples move
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer["to_out"].weight.normal_(0, 0.5)
    moved = denoise(parts, packed, options, generator=torch.Generator().manual_seed(0)).latents
    for layer in adapter.layers.values():
        torch.nn.init.zeros_(layer["to_out"].weight)
    assert (moved - ref).abs().max().item() > 1e-3


def test_only_w_q_and_w_o_train_and_motion_modules_are_untouched():
    from omegaconf import OmegaConf

    from layerkit.pipeline import build_parts

    cfg = OmegaConf.create({"backbone": {"name": "animatediff.tiny"}, "task": {"name": "transparent.i2v"},
                            "trainable": [], "adapters": {"inter_frame": {"name": "transparent.inter_frame_attention"}}})
    parts = build_parts(cfg, registry(), training=True)
    assert not [n for n, p in parts.backbone.named_parameters() if p.requires_grad]
    adapter = parts.adapters["inter_frame"]
    targets = spatial_self_attentions(parts.backbone.denoiser)
    assert targets and not any("motion_modules" in n for n in targets)
    assert all(n.endswith(".attn1") for n in targets)
    names = [n for n, p in adapter.named_parameters() if p.requires_grad]
    assert len(names) == 2 * len(targets) == len(list(adapter.parameters()))
    assert {n.rsplit(".", 2)[-2] for n in names} == {"to_q", "to_out"}
    assert all(torch.count_nonzero(layer["to_out"].weight) == 0 for layer in adapter.layers.values())
    # W_Q' starts as the frozen W_Q; detach restores the original processors
    name, attn = next(iter(targets.items()))
    assert torch.equal(adapter.layers[adapter.key(name)]["to_q"].weight, attn.to_q.weight)
    adapter.detach(parts.backbone)
    assert type(attn.processor).__name__ != "InterFrameProcessor"


def test_inter_frame_output_is_attention_to_the_reference_frame(backbone, adapter):
    """Out'_i = softmax(X_i W_Q' (X_m W_K)^T / sqrt(d)) X_m W_V W_O', head by head."""
    name, attn = next(iter(spatial_self_attentions(backbone.denoiser).items()))
    layer = adapter.layers[adapter.key(name)]
    torch.manual_seed(0)
    with torch.no_grad():
        layer["to_q"].weight.normal_(0, 0.3)
        layer["to_out"].weight.normal_(0, 0.3)
    b, f, length, dim = 2, 5, 6, attn.to_q.in_features
    x = torch.randn(b * f, length, dim)
    with torch.no_grad(), backbone.context.use(batch_size=b, num_frames=f, extras={"reference_frame": 1}):
        got = attn.processor.inter_frame(attn, x)
    heads = attn.heads
    expected = torch.zeros_like(got)
    with torch.no_grad():
        for s in range(b):
            xm = x[s * f + 1]
            k, v = attn.to_k(xm), attn.to_v(xm)
            for i in range(f):
                q = layer["to_q"](x[s * f + i])
                d = q.shape[-1] // heads
                outs = []
                for h in range(heads):
                    sl = slice(h * d, (h + 1) * d)
                    w = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(d), dim=-1)
                    outs.append(w @ v[:, sl])
                expected[s * f + i] = layer["to_out"](torch.cat(outs, dim=-1))
        torch.nn.init.zeros_(layer["to_out"].weight)
        layer["to_q"].weight.copy_(attn.to_q.weight)
    assert torch.allclose(got, expected, atol=1e-5)


def test_i2v_packs_the_middle_frame_as_the_only_given_frame(backbone):
    data = RGBASpriteClips(size=2, num_frames=8, height=32, width=32)
    task = TransparentTask(mode="i2v")
    batch = task.collate([data[0], data[1]])
    assert batch["rgba"].shape == (2, 8, 4, 32, 32)
    packed = task.pack(batch, training=True)
    assert [(s.name, s.num_frames) for s in packed.segments] == [("video", 8)]
    assert packed.given.tolist() == [[i == 3 for i in range(8)]] * 2 and packed.extras["reference_frame"] == 3
    assert torch.equal(packed.segments[0].video[:, 3], batch["rgba"][:, 3] * 2 - 1)
    with torch.no_grad():
        latents, layout = encode_packed(backbone, packed, training=True)
        whole = backbone.encode_video(batch["rgba"] * 2 - 1)
    assert layout.lengths == [8] and layout.given[0].tolist() == [i == 3 for i in range(8)]
    assert torch.allclose(latents, whole, atol=1e-5)
    short = task.pack({"rgba": batch["rgba"][:, :2], "prompt": batch["prompt"]}, training=True)
    assert short.given[0].tolist() == [True, False]  # a 2-frame clip: frame 0 is the middle
    with pytest.raises(LayerkitError, match="rgba"):
        task.pack({"prompt": ["x"]}, training=True)


def test_i2v_sampling_keeps_the_reference_frame_and_returns_rgba(backbone, adapter):
    from layerkit.training.data import default_collate

    task = TransparentTask(mode="i2v")
    batch = default_collate(task.sample_inputs({"num_samples": 1}, height=32, width=32, num_frames=4))
    packed = task.pack(batch, training=False)
    assert packed.given[0].tolist() == [False, True, False, False]
    parts = Parts(backbone, task, adapters={"inter_frame": adapter})
    result = denoise(parts, packed, SamplerOptions(steps=2, guidance_scale=2.0, progress=False),
                     generator=torch.Generator().manual_seed(0))
    latents = result.latents
    with torch.no_grad():
        given_latents, layout = encode_packed(backbone, packed)
    assert torch.equal(latents[:, :, 1], given_latents[:, :, 1])
    assert not given_latents[:, :, [0, 2, 3]].any(), "only the given frame is encoded at sampling"
    from layerkit.pipeline import decode_packed

    with torch.no_grad():
        decoded = decode_packed(backbone, latents, packed, layout)
    outputs = task.unpack(decoded, batch)
    assert outputs[0]["foreground"].shape == (4, 4, 32, 32) and outputs[0]["alpha"].shape == (4, 1, 32, 32)
    metrics = task.evaluate(outputs, batch)
    assert {"alpha_iou", "identity_drift", "colour_correct"} <= set(metrics)


def test_stage2_training_runs_two_steps_on_cpu(tmp_path):
    from safetensors import safe_open

    from layerkit.training.run import train

    registry()
    out = train(["+experiment=transparent_stage2", "backbone=animatediff_tiny", "trainer.max_steps=2",
                 f"output_dir={tmp_path / 'run'}", "data.num_frames=8", "data.height=32", "data.width=32"])
    with safe_open(str(out / "weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("adapters.inter_frame.layers.") for k in keys)
    assert {k.rsplit(".", 2)[-2] for k in keys} == {"to_q", "to_out"}


def test_held_out_sprites_come_from_the_test_split_or_the_val_split():
    from layerkit.errors import LayerkitError

    task = TransparentTask(mode="i2v")
    size = {"height": 32, "width": 32, "num_frames": 4}
    test = task.sample_inputs({"num_samples": 2}, **size)
    val = task.sample_inputs({"num_samples": 2, "split": "val"}, **size)
    assert [s["prompt"] for s in test] == [s["prompt"] for s in task.sample_inputs({"num_samples": 2, "split": "test"}, **size)]
    assert not torch.equal(test[0]["reference"], val[0]["reference"])
    with pytest.raises(LayerkitError, match="inputs.split must be val or test"):
        task.sample_inputs({"num_samples": 1, "split": "train"}, **size)


def test_a_reference_share_gives_the_middle_frame_to_that_share_of_training_clips():
    """``task.given_reference=0.5`` (the toy's RGB base: image- and text-to-video in one model):
    each training clip has its middle frame given with probability 0.5, drawn from torch's seeded
    generator; sampling gives it; a share outside [0, 1] is one sentence."""
    from layerkit.errors import LayerkitError

    task = TransparentTask(mode="i2v", given_reference=0.5)
    batch = {"rgba": torch.rand(64, 8, 4, 8, 8), "prompt": ["a red circle moving right"] * 64}
    torch.manual_seed(0)
    given = task.pack(batch, training=True).given
    torch.manual_seed(0)
    assert torch.equal(task.pack(batch, training=True).given, given)  # seeded
    assert not given[:, [0, 1, 2, 4, 5, 6, 7]].any() and 16 < int(given[:, 3].sum()) < 48
    assert task.pack(batch, training=False).given[:, 3].all()
    assert TransparentTask(given_reference=True).pack(batch, training=True).given[:, 3].all()
    assert not TransparentTask(given_reference=False).pack(batch, training=True).given.any()
    for bad in (1.5, -0.1, "yes", None):
        with pytest.raises(LayerkitError, match="share of training clips"):
            TransparentTask(given_reference=bad)
