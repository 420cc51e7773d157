"""Layer-Animate stage 1 for transparent.t2v: LayerDiffuse's SD 1.5 transparent attention
(published key layout, strict loading, what it computes), the image UNet inside AnimateDiff,
t2v end to end through ``layerkit.sampling.run.sample``, and the sampling-only baseline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from layerkit_plugins.animatediff.backbone import AnimateDiff, tiny
from layerkit_plugins.animatediff.tiny import tiny_components
from layerkit_plugins.animatediff.transparent_attn import (
    TransparentAttention,
    attention_order,
    ldm_name,
    load_transparent_attention,
)
from safetensors.torch import save_file

from layerkit.errors import LayerkitError

# The unit order of layer_sd15_transparent_attn.safetensors (hookers.layers.0 .. 31), as the
# LayerDiffuse code that writes and reads it names the SD 1.5 attentions (LDM names).
PUBLISHED_SD15_ORDER = [
    f"{block}.1.transformer_blocks.0.attn{n}"
    for block in [*(f"input_blocks.{i}" for i in (1, 2, 4, 5, 7, 8)), *(f"output_blocks.{i}" for i in range(3, 12))]
    for n in (1, 2)
] + ["middle_block.1.transformer_blocks.0.attn1", "middle_block.1.transformer_blocks.0.attn2"]

# The same order on the tiny UNet (2 levels, 1 layer per block: 4 transformer blocks).
TINY_ORDER = [
    f"{base}.transformer_blocks.0.attn{n}"
    for base in ("down_blocks.0.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1",
                 "mid_block.attentions.0")
    for n in (1, 2)
]
RANK = 256  # the published file's rank


def sample_experiment(name: str) -> str:
    """``+experiment=NAME``, or ``experiment=NAME`` when the core's sample config already picks a
    default experiment in its defaults list (then a new one replaces it)."""
    import re

    from layerkit.config import core_config_dir

    text = (core_config_dir() / "sample.yaml").read_text()
    return ("" if re.search(r"^\s*-\s*experiment\s*:", text, re.M) else "+") + f"experiment={name}"


def _attn(unet: torch.nn.Module, name: str) -> torch.nn.Module:
    return unet.get_submodule(name)


def published_state(unet: torch.nn.Module, seed: int = 0, temporal: bool = True) -> dict[str, torch.Tensor]:
    """A state dict with the published key names and shapes for ``unet``'s attentions, written
    out here key by key (not through the loader's own classes)."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for i, name in enumerate(TINY_ORDER):
        attn = _attn(unet, name)
        inner = attn.to_k.out_features
        for key, linear in (("to_q_lora", attn.to_q), ("to_k_lora", attn.to_k), ("to_v_lora", attn.to_v),
                            ("to_out_lora", attn.to_out[0])):
            state[f"hookers.layers.{i}.{key}.0.down.weight"] = torch.randn(RANK, linear.in_features, generator=g) * 0.05
            state[f"hookers.layers.{i}.{key}.0.up.weight"] = torch.randn(linear.out_features, RANK, generator=g) * 0.05
        for key in ("temporal_i", "temporal_q", "temporal_k", "temporal_v", "temporal_o"):
            scale = (0.05 if temporal else 0.0) if key == "temporal_o" else inner ** -0.5
            state[f"hookers.layers.{i}.{key}.weight"] = torch.randn(inner, inner, generator=g) * scale
            state[f"hookers.layers.{i}.{key}.bias"] = torch.randn(inner, generator=g) * scale
        state[f"hookers.layers.{i}.temporal_n.weight"] = 1 + 0.1 * torch.randn(inner, generator=g)
        state[f"hookers.layers.{i}.temporal_n.bias"] = 0.1 * torch.randn(inner, generator=g)
    return state


@pytest.fixture(scope="module")
def tiny_unet() -> torch.nn.Module:
    return tiny_components(seed=0, transparent=False)["unet"].eval()


def test_published_key_layout_loads_strictly_into_the_tiny_unet(tiny_unet, tmp_path):
    assert attention_order(tiny_unet) == TINY_ORDER
    state = published_state(tiny_unet)
    assert len(state) == 20 * len(TINY_ORDER)
    path = tmp_path / "layer_sd15_transparent_attn.safetensors"
    save_file(state, str(path))
    module = load_transparent_attention(tiny_unet, path)
    own = module.state_dict()
    assert set(own) == set(state)  # no missing, no unexpected key
    assert all(torch.equal(own[k], v) for k, v in state.items())
    result = TransparentAttention(tiny_unet, rank=RANK).load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # the same units fit the AnimateDiff motion UNet's spatial attentions (same names)
    backbone = tiny(seed=0, transparent_attn=str(path))
    assert attention_order(backbone.denoiser) == TINY_ORDER
    assert all(torch.equal(backbone.transparent_attn.state_dict()[k], v) for k, v in state.items())


def test_sd15_unit_order_and_shapes_are_the_published_ones():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)  # SD 1.5's config
        module = TransparentAttention(unet, rank=RANK)
    order = attention_order(unet)
    assert [ldm_name(n, 2) for n in order] == PUBLISHED_SD15_ORDER
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert len(shapes) == 640
    assert shapes["hookers.layers.0.to_q_lora.0.down.weight"] == (256, 320)
    assert shapes["hookers.layers.1.to_k_lora.0.down.weight"] == (256, 768)  # attn2 reads CLIP tokens
    assert shapes["hookers.layers.1.to_v_lora.0.up.weight"] == (320, 256)
    assert shapes["hookers.layers.8.to_out_lora.0.up.weight"] == (1280, 256)
    assert shapes["hookers.layers.30.temporal_i.weight"] == (1280, 1280)
    assert shapes["hookers.layers.31.temporal_n.bias"] == (1280,)


def test_a_unit_computes_lora_attention_plus_the_one_frame_temporal_branch(tiny_unet):
    state = published_state(tiny_unet, seed=1)
    module = load_transparent_attention(tiny_unet, state)
    name, i = TINY_ORDER[0], 0
    attn = _attn(tiny_unet, name)
    torch.manual_seed(0)
    h = torch.randn(2, 6, attn.to_q.in_features)
    with torch.no_grad():
        got = module.units[i](attn, h)

        def w(key: str, base: torch.nn.Linear) -> torch.Tensor:
            up, down = state[f"hookers.layers.{i}.{key}.0.up.weight"], state[f"hookers.layers.{i}.{key}.0.down.weight"]
            return base.weight + up @ down

        q, k, v = h @ w("to_q_lora", attn.to_q).T, h @ w("to_k_lora", attn.to_k).T, h @ w("to_v_lora", attn.to_v).T
        heads, d = attn.heads, q.shape[-1] // attn.heads
        outs = []
        for head in range(heads):
            sl = slice(head * d, (head + 1) * d)
            weights = torch.softmax(q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(d), dim=-1)
            outs.append(weights @ v[..., sl])
        a = torch.cat(outs, dim=-1) @ w("to_out_lora", attn.to_out[0]).T + attn.to_out[0].bias
        x = h + a

        def lin(key: str, t: torch.Tensor) -> torch.Tensor:
            return t @ state[f"hookers.layers.{i}.{key}.weight"].T + state[f"hookers.layers.{i}.{key}.bias"]

        normed = torch.nn.functional.layer_norm(x, x.shape[-1:], state[f"hookers.layers.{i}.temporal_n.weight"],
                                                state[f"hookers.layers.{i}.temporal_n.bias"], eps=1e-6)
        expected = x + lin("temporal_o", lin("temporal_v", lin("temporal_i", normed))) - h
    assert torch.allclose(got, expected, atol=1e-5)


def _merged_unet(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The plain tiny UNet with the q/k/v/out deltas added to its weights, computed here."""
    unet = tiny_components(seed=0, transparent=False)["unet"].eval()
    with torch.no_grad():
        for i, name in enumerate(TINY_ORDER):
            attn = _attn(unet, name)
            for key, linear in (("to_q_lora", attn.to_q), ("to_k_lora", attn.to_k), ("to_v_lora", attn.to_v),
                                ("to_out_lora", attn.to_out[0])):
                linear.weight += state[f"hookers.layers.{i}.{key}.0.up.weight"] @ state[
                    f"hookers.layers.{i}.{key}.0.down.weight"]
    return unet


def test_stage1_image_unet_with_the_file_matches_diffusers_on_the_merged_unet():
    """With its temporal branch zero, the loaded file is exactly its merged weight deltas; stage 1
    through layerkit's loop then equals diffusers' StableDiffusionPipeline on the merged UNet."""
    from diffusers import StableDiffusionPipeline

    reference_unet = tiny_components(seed=0, transparent=False)["unet"]
    state = published_state(reference_unet, seed=2, temporal=False)
    backbone = AnimateDiff(transparent_attn=state, transparent_attn_video=False, **tiny_components(seed=0)).eval()
    merged = _merged_unet(state)
    pipe = StableDiffusionPipeline(vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer,
                                   unet=merged, scheduler=backbone.make_scheduler("sample"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle", "a blue square"]
    ref = pipe(prompts, height=32, width=32, num_inference_steps=3, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(4), output_type="latent").images
    got = backbone.generate_images(prompts, height=32, width=32, steps=3, guidance_scale=7.5,
                                   generator=torch.Generator().manual_seed(4), return_latents=True)
    assert got.shape == ref.shape == (2, 4, 4, 4)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-4), (got - ref).abs().max()  # latents reach ~30 here
    # stage 2 is untouched (transparent_attn_video=false) and the image UNet shares the video UNet's modules
    assert not backbone.transparent_attn.enabled
    x, t, c = torch.randn(1, 4, 4, 4), torch.tensor([300]), torch.randn(1, 16, 32)
    with torch.no_grad():
        plain = reference_unet.eval()(x, t, c).sample
        assert torch.equal(backbone.image_unet()(x, t, c).sample, plain)
        with backbone.transparent_attn.switched(True):
            assert torch.allclose(backbone.image_unet()(x, t, c).sample, merged(x, t, c).sample, atol=1e-5)
    assert backbone.image_unet().conv_in is backbone.denoiser.conv_in
    # the temporal branch does act once it is not zero
    moving = AnimateDiff(transparent_attn=published_state(reference_unet, seed=2), **tiny_components(seed=0)).eval()
    other = moving.generate_images(prompts, height=32, width=32, steps=3, guidance_scale=7.5,
                                   generator=torch.Generator().manual_seed(4), return_latents=True)
    assert (other - ref).abs().max().item() > 1e-3


def test_files_for_other_models_are_refused_with_a_sentence(tiny_unet):
    state = published_state(tiny_unet)
    extra = {**state, "hookers.layers.8.to_q_lora.0.down.weight": torch.zeros(RANK, 32)}
    with pytest.raises(LayerkitError, match="holds 9 attention units but this UNet has 8"):
        load_transparent_attention(tiny_unet, extra)
    joint = {**state, "hookers.layers.0.to_q_lora.1.down.weight": torch.zeros(RANK, 32)}
    with pytest.raises(LayerkitError, match="across 2 images"):
        load_transparent_attention(tiny_unet, joint)
    with pytest.raises(LayerkitError, match="hookers.layers"):
        load_transparent_attention(tiny_unet, {"diffusion_model.input_blocks.1.1.x.lora_down.weight": torch.zeros(1)})
    wrong = dict(state)
    wrong["hookers.layers.3.to_k_lora.0.down.weight"] = torch.zeros(RANK, 768)
    with pytest.raises(LayerkitError, match="another shape"):
        load_transparent_attention(tiny_unet, wrong)
    with pytest.raises(LayerkitError, match="backbone.transparent_attn"):
        tiny(seed=0).generate_images(["a"], height=32, width=32, steps=1)


def test_t2v_runs_stage1_then_stage2_and_writes_rgba_prores(tmp_path):
    from layerkit.io.video import read_video
    from layerkit.sampling.run import sample

    path = tmp_path / "layer_sd15_transparent_attn.safetensors"
    save_file(published_state(tiny_components(seed=0, transparent=False)["unet"], seed=3), str(path))
    prompt = "a green square"
    out = sample([sample_experiment("transparent_t2v"), "backbone=animatediff_tiny", f"backbone.transparent_attn={path}",
                  "sampler.num_frames=4", "sampler.height=32", "sampler.width=32", "sampler.steps=2",
                  "sampler.progress=false", f"+inputs.prompt={prompt}", "seed=7", "device=cpu",
                  f"output_dir={tmp_path / 'out'}"])
    video = read_video(out / "foreground.mov", bits=8)  # ProRes 4444 is 10-bit; compared in 8 bits
    assert video.has_alpha and video.frames.shape == (4, 32, 32, 4)
    assert (out / "alpha.mp4").is_file() and (out / "record.json").is_file()

    # frame m of the video is stage 1's image for this prompt and seed, through the stage-2 encoder
    backbone = tiny(seed=0, transparent_attn=str(path)).eval()
    image = backbone.generate_images([prompt], height=32, width=32, steps=2, guidance_scale=7.5,
                                     generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        again = backbone.decode_latents(backbone.encode_video(image[:, None] * 2 - 1))[0, 0]
    expected = ((again.permute(1, 2, 0).clamp(-1, 1) + 1) / 2 * 255).numpy()
    m = (4 - 1) // 2
    got = video.frames[m].astype(np.float32)
    assert np.abs(got - expected).mean() < 3.0  # ProRes 4444 is near-lossless, not lossless
    assert np.abs(got[..., 3] - expected[..., 3]).max() <= 2.0


def test_t2v_without_its_stage1_stage_or_weights_fails_with_a_sentence(tmp_path):
    from layerkit.sampling.run import sample

    common = ["backbone=animatediff_tiny", "sampler.num_frames=2", "sampler.height=32", "sampler.width=32",
              "sampler.steps=1", "sampler.progress=false", "device=cpu"]
    t2v = sample_experiment("transparent_t2v")
    with pytest.raises(LayerkitError, match="stage 1"):
        sample([t2v, "~stages.image", "backbone.transparent_attn=random", *common, f"output_dir={tmp_path / 'a'}"])
    with pytest.raises(LayerkitError, match="transparent_attn"):
        sample([t2v, *common, f"output_dir={tmp_path / 'b'}"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_baseline_is_a_sampling_only_experiment_without_inter_frame_attention(tmp_path):
    from layerkit.config import compose
    from layerkit.registry import get_registry
    from layerkit.training.run import train

    registry = get_registry()
    cfg = compose("sample", [sample_experiment("transparent_baseline"), "backbone=animatediff_tiny"], registry)
    assert dict(cfg.adapters) == {} and list(cfg.trainable) == []
    assert cfg.task.name == "transparent.t2v" and cfg.stages.image.name == "transparent.image"
    full = compose("sample", [sample_experiment("transparent_t2v"), "backbone=animatediff_tiny"], registry)
    assert full.adapters.inter_frame.name == "transparent.inter_frame_attention"
    with pytest.raises(LayerkitError, match="sampling-only.*trains nothing"):
        train(["+experiment=transparent_baseline", "backbone=animatediff_tiny", f"output_dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run").exists()
