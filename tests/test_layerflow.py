"""LayerFlow on CogVideoX: layer embedding, every-sixth-block LoRAs, the stage data, the stages."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

TINY = ["backbone=cogvideox_tiny", "train.batch_size=1", "data.size=8"]


def lora_blocks(denoiser: torch.nn.Module, adapter: str) -> dict[int, set[str]]:
    """Block index -> projections carrying LoRA ``adapter``."""
    from peft.tuners.lora import LoraLayer

    out: dict[int, set[str]] = {}
    for name, module in denoiser.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            parts = name.split(".")
            out.setdefault(int(parts[1]), set()).add(".".join(parts[2:]))
    return out


def test_layer_embedding_changes_only_text_tokens_and_starts_at_the_expected_value():
    from layerkit_plugins.cogvideox.backbone import CogVideoX
    from layerkit_plugins.layerflow.adapter import LayerEmbedding

    backbone = CogVideoX(tiny=True).eval()
    embed = backbone.denoiser.patch_embed
    seen: list[torch.Tensor] = []
    embed.register_forward_hook(lambda m, a, out: seen.append(out))
    noisy, t = torch.randn(2, 4, 2, 4, 4), torch.tensor([500, 20])
    with torch.no_grad():
        cond = backbone.encode_prompt_blocks([["0, a red circle", "1, blue stripes", "2, a red circle over stripes"]] * 2)
        plain = backbone.predict(noisy, t, cond)
        adapter = LayerEmbedding()
        adapter.name = "layer_embedding"
        adapter.attach(backbone)
        embedded = backbone.predict(noisy, t, cond)
        adapter.detach(backbone)
        again = backbone.predict(noisy, t, cond)

    text, video = slice(0, 48), slice(48, None)
    assert torch.equal(seen[0][:, video], seen[1][:, video]), "video tokens untouched"
    linear, norm = adapter.embed  # Linear(1 -> 32) + LayerNorm(32), PyTorch's default init (released code)
    for k in range(3):
        expected = F.layer_norm(linear.weight[:, 0] * k + linear.bias, (32,))
        block = seen[1][:, text][:, 16 * k : 16 * (k + 1)] - seen[0][:, text][:, 16 * k : 16 * (k + 1)]
        torch.testing.assert_close(block, expected.expand_as(block), atol=1e-5, rtol=0)
    assert not torch.equal(plain, embedded)
    assert torch.equal(plain, again), "detach restores the backbone exactly"
    assert sorted(adapter.adapter_state_dict()) == ["embed.0.bias", "embed.0.weight", "embed.1.bias", "embed.1.weight"]


def test_motion_and_content_lora_sit_on_every_sixth_block_only(registry):
    from layerkit.config import compose
    from layerkit.pipeline import build_parts

    cfg = compose("train", ["+experiment=layerflow_stage3", *TINY], registry)
    parts = build_parts(cfg, registry, training=True)
    denoiser = parts.backbone.denoiser
    qkvo = {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"}
    for name, rank in (("motion_lora", 8), ("content_lora", 256)):
        assert lora_blocks(denoiser, name) == {5: qkvo, 11: qkvo}  # 12 blocks: index % 6 == 5
        layer = denoiser.transformer_blocks[5].attn1.to_q
        assert layer.r[name] == rank and layer.scaling[name] == pytest.approx(1 / rank)  # alpha 1
    trainable = {n for n, p in denoiser.named_parameters() if p.requires_grad}
    assert trainable and all(".content_lora." in n for n in trainable), "stage 3 trains the Content LoRA ..."
    # ... and the layer embedding, as the released stage-3 configs do
    assert all(p.requires_grad for p in parts.adapters["layer_embedding"].parameters())

    sampling = build_parts(compose("sample", ["+experiment=layerflow_stage3", "backbone=cogvideox_tiny"], registry),
                           registry, training=False)
    assert set(sampling.adapters) == {"layer_embedding", "content_lora"}, "Motion LoRA removed at inference"
    assert lora_blocks(sampling.backbone.denoiser, "motion_lora") == {}


def test_mixture_dataset_gives_frozen_and_copy_pasted_clips():
    from layerkit_plugins.layerflow.data import LayerFlowMixture

    data = LayerFlowMixture(size=12, static_fraction=0.5, num_frames=4, height=16, width=16)
    samples = [data[i] for i in range(len(data))]
    assert {s["is_static"] for s in samples} == {True, False}
    for s in samples:
        for key in ("foreground_rgb", "foreground_alpha", "background", "blended"):
            frozen = bool((s[key] == s[key][:1]).all())
            assert frozen or not s["is_static"], key
        fg, alpha = s["foreground_rgb"], s["foreground_alpha"]
        torch.testing.assert_close(s["blended"], fg * alpha + s["background"] * (1 - alpha))
        assert s["prompt"] == f"{s['foreground_prompt']} over {s['background_prompt']}"
    assert all(torch.equal(a, b) for a, b in zip(data[3].values(), LayerFlowMixture(
        size=12, static_fraction=0.5, num_frames=4, height=16, width=16)[3].values()) if isinstance(a, torch.Tensor))
    assert all(LayerFlowMixture(size=4, static_fraction=1.0, num_frames=4, height=16, width=16)[i]["is_static"]
               for i in range(4))


def test_task_packs_four_sub_clips_with_indexed_prompts_and_motion_scale(registry):
    from layerkit_plugins.layerflow.data import LayerFlowMixture

    from layerkit.training.data import default_collate

    task = registry.build("task", "layered", mode="fg2bg", scale_from={"motion_lora": "is_static"})
    data = LayerFlowMixture(size=6, static_fraction=0.5, num_frames=4, height=16, width=16)
    batch = default_collate([data[i] for i in range(6)])
    packed = task.pack(batch, training=True)
    assert [s.name for s in packed.segments] == ["foreground", "alpha", "background", "blended"]
    assert packed.given[0].tolist() == [True] * 8 + [False] * 8  # per frame: foreground and alpha given
    assert [p.split(",")[0] for p in packed.prompts[0]] == ["0", "1", "2"]
    assert packed.scales["motion_lora"].tolist() == [float(s) for s in batch["is_static"].tolist()]


def test_train_modes_give_each_batch_its_own_task(registry):
    import random

    from layerkit_plugins.layerflow.data import LayerFlowMixture

    from layerkit.errors import LayerkitError
    from layerkit.training.data import default_collate

    data = LayerFlowMixture(size=4, static_fraction=0.5, num_frames=4, height=16, width=16)
    batch = default_collate([data[i] for i in range(4)])
    task = registry.build("task", "layered", mode="generate", train_modes={"decompose": 1, "bg2fg": 1, "fg2bg": 0})
    random.seed(0)
    seen = set()
    for _ in range(20):
        rows = {tuple(r) for r in task.pack(batch, training=True).given.tolist()}
        assert len(rows) == 1, "one mode per batch"
        seen |= rows
    decompose, bg2fg = (False,) * 12 + (True,) * 4, (False,) * 8 + (True,) * 4 + (False,) * 4
    assert seen == {decompose, bg2fg}  # fg2bg has weight 0
    assert task.pack(batch, training=False).given.tolist()[0] == [False] * 16  # sampling: the task's own mode
    with pytest.raises(LayerkitError, match="train_modes must map modes"):
        registry.build("task", "layered", train_modes={"inpaint": 1})


def test_layerflow_packs_layers_in_order_with_frame_zero_in_front_for_fg2bg_and_bg2fg(registry):
    """The released code's packing for its one-pass causal VAE (sat/diffusion_video.py): the layers keep
    their order and the given ones are re-imposed in place; fg2bg and bg2fg put a copy of frame 0 in
    front (65 frames, 17 latent frames), given with the foreground in fg2bg, generated in bg2fg."""
    from layerkit_plugins.cogvideox.backbone import CogVideoX
    from layerkit_plugins.layerflow.data import LayerFlowMixture

    from layerkit.config import compose
    from layerkit.pipeline import latent_layout
    from layerkit.training.data import default_collate

    data = LayerFlowMixture(size=2, static_fraction=0.0, num_frames=16, height=16, width=16)
    batch = default_collate([data[i] for i in range(2)])
    backbone = CogVideoX(tiny=True, tiny_layers=2)
    layers = ["foreground", "alpha", "background", "blended"]
    cases = {  # mode -> (segments, latent frames given)
        "generate": (layers, []),
        "decompose": (layers, [12, 13, 14, 15]),
        "fg2bg": (["first_frame", *layers], list(range(9))),
        "bg2fg": (["first_frame", *layers], [9, 10, 11, 12]),
    }
    for mode, (order, given) in cases.items():
        cfg = compose("train", ["+experiment=layerflow_stage1", *TINY, f"task.mode={mode}"], registry)
        task = registry.build("task", "layered", **{k: v for k, v in cfg.task.items() if k != "name"})
        packed = task.pack(batch, training=True)
        assert [s.name for s in packed.segments] == order, mode
        layout = latent_layout(backbone, packed)
        assert len(layout.windows) == (17 if order[0] == "first_frame" else 16), mode
        assert torch.nonzero(layout.given[0]).flatten().tolist() == given, mode
        if order[0] == "first_frame":
            assert torch.equal(packed.segments[0].video, packed.segments[1].video[:, :1])


def test_rgb_layout_packs_three_sub_clips_and_trains(registry, tmp_path):
    """LayerFlow's RGB setting: [foreground over mid-grey, background, blended], no alpha clip."""
    from layerkit_plugins.layerflow.data import LayerFlowMixture

    from layerkit.training.data import default_collate
    from layerkit.training.run import train

    data = LayerFlowMixture(size=2, static_fraction=0.5, num_frames=4, height=16, width=16)
    batch = default_collate([data[i] for i in range(2)])
    task = registry.build("task", "layered", mode="fg2bg", layout="rgb")
    packed = task.pack(batch, training=True)
    assert [s.name for s in packed.segments] == ["foreground", "background", "blended"]
    assert packed.given[0].tolist() == [True] * 4 + [False] * 8
    expected = (batch["foreground_rgb"] * 2 - 1) * batch["foreground_alpha"]  # 0 (mid-grey) where alpha is 0
    assert torch.allclose(packed.segments[0].video, expected)
    out = train(["+experiment=layerflow_stage1", *TINY, "task.layout=rgb", "trainer.max_steps=1",
                 f"output_dir={tmp_path / 'rgb'}"], registry=registry)
    assert json.loads((out / "record.json").read_text())["global_step"] == 1


def test_stage3_trains_two_steps_on_cpu(registry, tmp_path):
    from layerkit.training.run import train

    out = train(["+experiment=layerflow_stage3", *TINY, "trainer.max_steps=2", f"output_dir={tmp_path / 'run'}"],
                registry=registry)
    weights = load_file(str(out / "weights.safetensors"))
    lora = [k for k in weights if ".lora_" in k]
    assert lora and all(".content_lora." in k for k in lora) and len(lora) == 2 * 4 * 2
    assert {k for k in weights if ".lora_" not in k} == {f"adapters.layer_embedding.embed.{i}.{p}"
                                                          for i in (0, 1) for p in ("weight", "bias")}
    record = json.loads((out / "record.json").read_text())
    assert record["global_step"] == 2 and record["final_loss"] is not None


def test_stages_chain_through_their_weights_files(registry, tmp_path):
    """Stage 1 trains blocks 5/11 + layer embedding, stage 2 the Motion LoRA: stage 3 starts from both."""
    from layerkit.config import compose
    from layerkit.io.weights import load_weights
    from layerkit.pipeline import build_parts, load_trainable_state, weight_files
    from layerkit.training.module import LayerkitModule
    from layerkit.training.run import train

    one = ["trainer.max_steps=1", "optim.lr=1e-2"]
    w1 = train(["+experiment=layerflow_stage1", *TINY, *one, f"output_dir={tmp_path / 's1'}"],
               registry=registry) / "weights.safetensors"
    s1 = load_weights(w1)
    assert any(k.startswith("backbone.denoiser.transformer_blocks.11.") for k in s1)
    assert not any(k.startswith("backbone.denoiser.transformer_blocks.10.") for k in s1)
    w2 = train(["+experiment=layerflow_stage2", *TINY, *one, f"layerflow.stage1_weights={w1}",
                f"output_dir={tmp_path / 's2'}"], registry=registry) / "weights.safetensors"
    s2 = load_weights(w2)

    cfg = compose("train", ["+experiment=layerflow_stage3", *TINY, f"layerflow.stage1_weights={w1}",
                            f"layerflow.stage2_weights={w2}"], registry)
    parts = build_parts(cfg, registry, training=True)
    module = LayerkitModule(parts, {})
    for path in weight_files(cfg.init_from):
        load_trainable_state(module, path, parts=parts)
    state = module.state_dict()
    block = "backbone.denoiser.transformer_blocks.5.attn1.to_q."
    assert torch.equal(state[block + "base_layer.weight"], s1[block + "weight"]), "stage-1 block under the LoRAs"
    assert torch.equal(state[block + "lora_B.motion_lora.weight"], s2[block + "lora_B.motion_lora.weight"])
    assert s2[block + "lora_B.motion_lora.weight"].abs().sum() > 0, "stage 2 trained the Motion LoRA"
    for key in ("adapters.layer_embedding.embed.0.weight", "adapters.layer_embedding.embed.1.bias"):
        assert torch.equal(state[key], s2[key])
        assert not torch.equal(s1[key], s2[key]), "stage 2 kept training the layer embedding"


def test_unconditional_text_is_zero_embeddings_in_cfg_and_in_per_block_prompt_dropout(registry):
    """Released code: force_uc_zero_embeddings=['txt'] for CFG, and ucg_rate drops each prompt block on its
    own to zeros; the layer embedding is added afterwards (on text_proj's output), so it stays."""
    from layerkit.config import compose
    from layerkit.pipeline import build_parts
    from layerkit.protocols import Packed, Segment

    cfg = compose("train", ["+experiment=layerflow_stage1", *TINY], registry)
    assert cfg.backbone.uncond == "zeros" and cfg.train.prompt_dropout_per_block
    parts = build_parts(cfg, registry, training=True)
    backbone = parts.backbone
    prompts = [["0, a red circle", "1, blue stripes", "2, a red circle over blue stripes"]] * 2
    packed = Packed([Segment("video", 8)], torch.zeros(2, 8, dtype=torch.bool), prompts, 32, 32)
    with torch.no_grad():
        cond = backbone.encode_conditions(packed)
        negative = backbone.negative_conditions(packed, cond, "")
        assert torch.count_nonzero(negative["prompt_embeds"]) == 0 and negative["prompt_embeds"].shape == \
            cond["prompt_embeds"].shape
        drop = torch.tensor([[False, True, False], [True, True, True]])
        dropped = backbone.encode_conditions(packed, drop=drop)["prompt_embeds"]
    tokens = cond["prompt_embeds"].shape[1] // 3
    assert torch.count_nonzero(dropped[0, tokens:2 * tokens]) == 0, "block 1 of sample 0 dropped alone"
    assert torch.equal(dropped[0, :tokens], cond["prompt_embeds"][0, :tokens])
    assert torch.count_nonzero(dropped[1]) == 0
    # a prompt the user left out ("", unprefixed by the layered task) is the dropped block's zeros, not
    # T5's encoding of "" (a text the model never saw in training): with a dropped block on top too
    left_out = Packed(packed.segments, packed.given, [["0, a red circle", "", "2, a red circle over blue stripes"],
                                                      ["", "", ""]], 32, 32)
    with torch.no_grad():
        assert torch.equal(backbone.encode_conditions(left_out)["prompt_embeds"][0], dropped[0])
        assert torch.count_nonzero(backbone.encode_conditions(left_out)["prompt_embeds"][1]) == 0
        both = backbone.encode_conditions(left_out, drop=torch.tensor([[True, False, False], [False] * 3]))
    assert torch.count_nonzero(both["prompt_embeds"][0, :2 * tokens]) == 0
    assert torch.equal(both["prompt_embeds"][0, 2 * tokens:], cond["prompt_embeds"][0, 2 * tokens:])
    # the empty-prompt encoding (CogVideoXPipeline's way) is not zero: the two really differ
    backbone.uncond = "empty_prompt"
    with torch.no_grad():
        assert torch.count_nonzero(backbone.negative_conditions(packed, cond, "")["prompt_embeds"]) > 0


def test_layerflow_optimiser_is_the_released_one(registry):
    from layerkit.config import compose, to_plain
    from layerkit.pipeline import build_parts
    from layerkit.training.module import LayerkitModule

    for stage in ("layerflow_stage1", "layerflow_stage2", "layerflow_stage3"):
        cfg = compose("train", [f"+experiment={stage}", *TINY], registry)
        module = LayerkitModule(build_parts(cfg, registry, training=True), to_plain(cfg))
        config = module.configure_optimizers()
        optimizer = config["optimizer"] if isinstance(config, dict) else config
        group = optimizer.param_groups[0]
        assert isinstance(optimizer, torch.optim.AdamW), stage
        assert group["betas"] == (0.9, 0.95) and group["weight_decay"] == 1e-4 and group["eps"] == 1e-8, stage
        assert module.ema_decay == 0.0, "the released EMA is never saved nor used for sampling"
