"""Exported LayerFlow LoRAs: the diffusers file loads into CogVideoXPipeline and reproduces layerkit's
output; the ComfyUI file has ComfyUI's generic layout on its native CogVideoX names and converts back."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file

from layerkit.errors import LayerkitError

LAYERS = 6  # blocks 0..5: the every-sixth-block LoRAs sit on block 5
QKVO = ("q", "k", "v", "attn_out")


def lora(name: str, rank: int):
    """LayerFlow's LoRA placement (q, k, v, out of blocks i % 6 == 5), alpha 1, weights perturbed."""
    from layerkit_plugins.lora.adapter import LoRAAdapter

    adapter = LoRAAdapter(rank=rank, alpha=1, blocks="transformer_blocks", every=6, offset=5)
    adapter.name = name
    return adapter


def perturb(adapter, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.lora_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.fixture
def trained():
    """Tiny CogVideoX with a Motion LoRA (rank 8) and a Content LoRA (rank 256) on the same layers."""
    from layerkit_plugins.cogvideox.backbone import CogVideoX

    backbone = CogVideoX(tiny=True, tiny_layers=LAYERS).eval()
    motion, content = lora("motion_lora", 8), lora("content_lora", 256)
    motion.attach(backbone)
    content.attach(backbone)
    perturb(motion, 1)
    perturb(content, 2)
    g = torch.Generator().manual_seed(3)
    inputs = (torch.randn(2, 4, 2, 4, 4, generator=g), torch.tensor([700, 30]), torch.randn(2, 16, 32, generator=g))
    return backbone, content, inputs


def layerkit_output(backbone, inputs, motion_scale: float = 0.0) -> torch.Tensor:
    """Content LoRA at scale 1, Motion LoRA at ``motion_scale`` (removed at inference in LayerFlow)."""
    noisy, t, text = inputs
    with torch.no_grad(), backbone.context.use(batch_size=2, num_frames=2,
                                               scales={"motion_lora": torch.full((2,), motion_scale)}):
        return backbone.predict(noisy, t, {"prompt_embeds": text})


def transformer_output(transformer, inputs) -> torch.Tensor:
    noisy, t, text = inputs
    with torch.no_grad():
        out = transformer(hidden_states=noisy.permute(0, 2, 1, 3, 4), encoder_hidden_states=text, timestep=t,
                          return_dict=False)[0]
    return out.permute(0, 2, 1, 3, 4)


def test_diffusers_export_loads_into_cogvideox_pipeline_and_matches(trained, tmp_path):
    from diffusers import CogVideoXPipeline
    from layerkit_plugins.cogvideox.backbone import tiny_components

    backbone, content, inputs = trained
    written = content.export(backbone, str(tmp_path), ["diffusers"])
    assert [p.split("/")[-1] for p in written] == ["content_lora.diffusers.safetensors"]
    state = load_file(written[0])
    assert len(state) == 4 * 2 and all(k.startswith("transformer.transformer_blocks.5.attn1.") for k in state)
    raw = content.lora_parameters()
    key = "transformer_blocks.5.attn1.to_q.lora_B.weight"
    assert torch.equal(state[f"transformer.{key}"], raw[key].detach() / 256), "alpha/rank = 1/256 folded into lora_B"

    pipe = CogVideoXPipeline(**tiny_components(seed=0, layers=LAYERS))  # same seeded weights, separate modules
    base = transformer_output(pipe.transformer, inputs)
    pipe.load_lora_weights(str(tmp_path), weight_name="content_lora.diffusers.safetensors", adapter_name="content")
    theirs = transformer_output(pipe.transformer, inputs)
    ours = layerkit_output(backbone, inputs)
    diff = (theirs - ours).abs().max().item()
    print(f"max abs diff, CogVideoXPipeline + exported LoRA vs layerkit: {diff:.3g}")
    assert diff <= 1e-5
    assert (ours - base).abs().max() > 1e-3, "the LoRA changes the output (the comparison means something)"
    assert (layerkit_output(backbone, inputs, motion_scale=1.0) - ours).abs().max() > 1e-3, \
        "only the exported adapter is in the file"


def test_comfyui_export_layout_and_round_trip(trained, tmp_path):
    from layerkit_plugins.cogvideox.backbone import tiny_components
    from layerkit_plugins.layerflow.export import comfyui_to_diffusers
    from layerkit_plugins.lora.adapter import read_comfyui_lora

    from layerkit.io.weights import read_metadata

    backbone, content, inputs = trained
    comfy_path, diffusers_path = sorted(content.export(backbone, str(tmp_path), ["comfyui", "diffusers"]))
    assert comfy_path.endswith("content_lora.comfyui.safetensors")
    state = load_file(comfy_path)
    assert set(state) == {f"diffusion_model.blocks.5.{m}.{part}" for m in QKVO
                          for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    for m in QKVO:
        assert state[f"diffusion_model.blocks.5.{m}.lora_down.weight"].shape == (256, 32)  # A [rank, in]
        assert state[f"diffusion_model.blocks.5.{m}.lora_up.weight"].shape == (32, 256)  # B [out, rank]
        assert state[f"diffusion_model.blocks.5.{m}.alpha"].dim() == 0 and state[f"diffusion_model.blocks.5.{m}.alpha"] == 1
    assert read_metadata(comfy_path)["layerkit_adapter"] == "content_lora"

    # back to layerkit's raw weights, exactly
    lora, alphas = read_comfyui_lora(state, "CogVideoXTransformer3DModel")
    raw = {k: v.detach() for k, v in content.lora_parameters().items()}
    assert lora.keys() == raw.keys() and all(torch.equal(lora[k], raw[k]) for k in raw)
    assert set(alphas.values()) == {1.0}
    # and to the diffusers export, exactly
    back = comfyui_to_diffusers(comfy_path)
    exported = load_file(diffusers_path)
    assert back.keys() == exported.keys() and all(torch.equal(back[k], exported[k]) for k in back)

    # ComfyUI's patch, W + strength * (alpha / rank) * up @ down, reproduces the LoRA's output
    transformer = tiny_components(seed=0, layers=LAYERS)["transformer"]
    weights = transformer.state_dict()
    for m in QKVO:
        key = "diffusion_model.blocks.5." + m
        down, up, alpha = state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"], state[f"{key}.alpha"]
        name = {"q": "to_q", "k": "to_k", "v": "to_v", "attn_out": "to_out.0"}[m]
        weights[f"transformer_blocks.5.attn1.{name}.weight"] += 1.0 * (alpha / down.shape[0]) * (up @ down)
    transformer.load_state_dict(weights)
    diff = (transformer_output(transformer, inputs) - layerkit_output(backbone, inputs)).abs().max().item()
    assert diff <= 1e-5, diff


def test_export_formats_are_checked_and_unknown_models_skip_comfyui(tmp_path):
    from layerkit_plugins.cogvideox.backbone import CogVideoX

    backbone = CogVideoX(tiny=True, tiny_layers=LAYERS)
    adapter = lora("content_lora", 4)
    adapter.attach(backbone)
    with pytest.raises(LayerkitError, match=r"unknown LoRA export format\(s\) \['kohya'\]; export.formats takes"):
        adapter.export(backbone, str(tmp_path), ["diffusers", "kohya"])

    backbone.denoiser.__class__ = type("ToyDenoiser", (type(backbone.denoiser),), {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = adapter.export(backbone, str(tmp_path), ["diffusers", "comfyui"])
    assert [p.split("/")[-1] for p in written] == ["content_lora.diffusers.safetensors"]
    assert any("not exported for ComfyUI" in str(w.message) for w in caught)


def test_export_from_a_stage_weights_file_matches_the_training_export(registry, tmp_path):
    from layerkit_plugins.layerflow.export import export_lora, main

    from layerkit.config import compose, to_plain
    from layerkit.io.weights import save_weights
    from layerkit.pipeline import build_parts
    from layerkit.training.module import LayerkitModule

    cfg = compose("train", ["+experiment=layerflow_stage3", "backbone=cogvideox_tiny"], registry)
    parts = build_parts(cfg, registry, training=True)
    content = parts.adapters["content_lora"]
    perturb(content, 5)
    module = LayerkitModule(parts, to_plain(cfg))
    weights = save_weights(tmp_path / "weights.safetensors", module.trainable_state_dict(),
                           metadata={"layerkit_config": to_plain(cfg)})
    live = content.export(parts.backbone, str(tmp_path / "live"), ["diffusers", "comfyui"])
    offline = export_lora(weights, "content_lora", tmp_path / "offline")
    for a, b in zip(sorted(live), sorted(offline), strict=True):
        sa, sb = load_file(a), load_file(b)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert len(load_file(sorted(offline)[0])) == 2 * 4 * 3  # blocks 5 and 11 of 12, q/k/v/out, down/up/alpha

    with pytest.raises(LayerkitError, match=r"holds no weights of LoRA 'motion_lora' \(it was frozen in that stage"):
        export_lora(weights, "motion_lora", tmp_path / "x")
    with pytest.raises(LayerkitError, match=r"has no LoRA adapter 'style'; its LoRA adapters are \['content_lora', 'motion_lora'\]"):
        export_lora(weights, "style", tmp_path / "x")
    assert main([str(weights), "--out", str(tmp_path / "cli"), "--formats", "comfyui"]) == 0
    assert (tmp_path / "cli" / "content_lora.comfyui.safetensors").is_file()
    assert main([str(weights), "--adapter", "nothing", "--out", str(tmp_path / "cli")]) == 2
