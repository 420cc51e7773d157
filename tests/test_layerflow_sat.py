"""The authors' LayerFlow SAT checkpoints -> layerkit (layerkit_plugins.layerflow.sat).

Key names and shapes below are written from the authors' code (github SihuiJi/LayerFlow, sat/):
``dit_video_concat.py`` (DiffusionTransformer and its mixins), ``lora.py`` (LoraMixin wraps every
layer's ``attention.query_key_value`` and ``attention.dense`` in a LoraLinear holding
``original`` plus ``matrix_A/B`` (motion, rank 8) and ``matrix_C/D`` (content, rank 256), one
per output partition: 3 for the fused qkv, 1 for dense) and the released
``configs/cogvideox_2b_stage2_gen_rgba.yaml`` (30 layers, hidden 1920, 30 heads, time_embed_dim
512, 64 frames -> 16 latent frames of 60x90, text_length 678 = 3 x 226, learnable_txt_embed).
They are independent of the converter's own tables.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from layerkit.errors import LayerkitError

SAT = "model.diffusion_model."


def sat_layout(*, layers: int = 30, hidden: int = 1920, heads: int = 30, text_dim: int = 4096, channels: int = 16,
               patch: int = 2, time_dim: int = 512, motion_r: int = 8, content_r: int = 256, text_length: int = 678,
               latent_frames: int = 16, latent_hw: tuple[int, int] = (60, 90), txt_embed: bool = True,
               frozen: bool = True) -> dict[str, tuple[int, ...]]:
    """Every key of the authors' ``module`` state (``model.diffusion_model.*``) with its shape."""
    out: dict[str, tuple[int, ...]] = {}

    def linear(name: str, n_out: int, n_in: int) -> None:
        out[f"{SAT}{name}.weight"], out[f"{SAT}{name}.bias"] = (n_out, n_in), (n_out,)

    def norm(name: str, width: int) -> None:
        out[f"{SAT}{name}.weight"], out[f"{SAT}{name}.bias"] = (width,), (width,)

    linear("time_embed.0", time_dim, hidden)
    linear("time_embed.2", time_dim, time_dim)
    grid = (latent_hw[0] // patch) * (latent_hw[1] // patch)
    out[f"{SAT}mixins.pos_embed.pos_embedding"] = (1, text_length + latent_frames * grid, hidden)
    if txt_embed:
        linear("mixins.pos_embed.txt_embedder.0", hidden, 1)
        norm("mixins.pos_embed.txt_embedder.1", hidden)
    out[f"{SAT}mixins.patch_embed.proj.weight"] = (hidden, channels, patch, patch)
    out[f"{SAT}mixins.patch_embed.proj.bias"] = (hidden,)
    linear("mixins.patch_embed.text_proj", hidden, text_dim)
    for i in range(layers):
        linear(f"mixins.adaln_layer.adaLN_modulations.{i}.1", 12 * hidden, time_dim)
        norm(f"mixins.adaln_layer.query_layernorm_list.{i}", hidden // heads)
        norm(f"mixins.adaln_layer.key_layernorm_list.{i}", hidden // heads)
        layer = f"transformer.layers.{i}"
        norm(f"{layer}.input_layernorm", hidden)
        norm(f"{layer}.post_attention_layernorm", hidden)
        for proj, parts in (("query_key_value", 3), ("dense", 1)):
            linear(f"{layer}.attention.{proj}.original", parts * hidden, hidden)
            for j in range(parts):
                out[f"{SAT}{layer}.attention.{proj}.matrix_A.{j}"] = (motion_r, hidden)
                out[f"{SAT}{layer}.attention.{proj}.matrix_B.{j}"] = (hidden, motion_r)
                out[f"{SAT}{layer}.attention.{proj}.matrix_C.{j}"] = (content_r, hidden)
                out[f"{SAT}{layer}.attention.{proj}.matrix_D.{j}"] = (hidden, content_r)
        linear(f"{layer}.mlp.dense_h_to_4h", 4 * hidden, hidden)
        linear(f"{layer}.mlp.dense_4h_to_h", hidden, 4 * hidden)
    norm("transformer.final_layernorm", hidden)
    norm("mixins.final_layer.norm_final", hidden)
    linear("mixins.final_layer.linear", patch * patch * channels, hidden)
    linear("mixins.final_layer.adaLN_modulation.1", 2 * hidden, time_dim)
    if frozen:  # SATVideoDiffusionEngine also saves its frozen T5 and VAE (a sample of their keys)
        out["conditioner.embedders.0.transformer.shared.weight"] = (32128, 4096)
        out["first_stage_model.encoder.conv_in.conv.weight"] = (128, 3, 3, 3, 3)
    return out


def layerkit_names(converted, own: dict[str, torch.Tensor], adapters) -> dict[str, torch.Tensor]:
    """Converted weights under the names of a model with the LoRAs attached (a wrapped layer's
    base weight moves to ``base_layer``, as ``load_trainable_state`` places it)."""
    full = dict(converted.trainable)
    for key, value in converted.transformer.items():
        name = "backbone.denoiser." + key
        if name not in own:
            name = next(m for a in adapters if (m := a.map_key(name, own)) is not None)
        full[name] = value
    return full


def _build_adapters(registry, backbone):
    """The adapters of +experiment=layerflow_stage3 (training: Motion and Content LoRA, layer
    embedding), built from the composed config and attached as build_parts does."""
    from layerkit.config import compose, params

    cfg = compose("train", ["+experiment=layerflow_stage3"], registry)
    adapters = {}
    for key, node in cfg.adapters.items():
        kwargs = params(node)
        kwargs.pop("inference", None)
        adapter = registry.build("adapter", node.name, **kwargs)
        adapter.name = key
        adapter.attach(backbone)
        adapters[key] = adapter
    return adapters


def test_full_size_sat_layout_converts_with_no_missing_or_unexpected_key_on_meta(registry):
    from diffusers import CogVideoXTransformer3DModel
    from layerkit_plugins.layerflow.sat import convert_sat_state, to_sat

    from layerkit.protocols import Backbone
    from layerkit.sampling.run import Container

    shapes = sat_layout()
    with torch.device("meta"):
        state = {k: torch.empty(s, dtype=torch.bfloat16) for k, s in shapes.items()}
        converted = convert_sat_state(state)
        backbone = Backbone()
        backbone.denoiser = CogVideoXTransformer3DModel()  # CogVideoX-2B's config (diffusers' defaults)
        adapters = _build_adapters(registry, backbone)
    assert set(adapters) == {"layer_embedding", "motion_lora", "content_lora"}
    container = Container(SimpleNamespace(backbone=backbone, controls={}, adapters=adapters))
    own = container.state_dict()
    full = layerkit_names(converted, own, adapters.values())
    result = container.load_state_dict(full, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys

    counts = converted.counts
    print("full-size SAT layout:", counts)
    assert counts["sat_keys"] == len(shapes) == 1043  # 1041 transformer keys + 2 sampled T5/VAE keys
    assert counts["frozen_skipped"] == 2
    assert counts["transformer"] == 736
    assert counts["motion_lora"] == counts["content_lora"] == 40  # 5 layers x 4 projections x (A, B)
    assert counts["layer_embedding"] == 4
    assert counts["lora_untrained_dropped"] == 25 * 16  # 25 layers x (3 + 1 partitions) x 4 matrices
    assert converted.ranks == {"motion": 8, "content": 256}
    assert sorted({int(k.split(".")[3]) for k in converted.trainable if ".lora_" in k}) == [5, 11, 17, 23, 29]

    # the inverse writes exactly the authors' key set and shapes
    with torch.device("meta"):
        back = to_sat(converted.transformer, converted.trainable,
                      position_table=torch.empty(1, 678 + 16 * 30 * 45, 1920))
    expected = {k: s for k, s in shapes.items() if k.startswith(SAT)}
    assert {k: tuple(v.shape) for k, v in back.items()} == expected


@pytest.fixture
def tiny_round_trip(registry, tmp_path):
    """A tiny CogVideoX with the stage-3 LayerFlow adapters (random LoRAs and layer embedding),
    its weights in the SAT layout, written as a safetensors copy of ``module``."""
    from layerkit_plugins.layerflow.sat import sincos_table, to_sat

    from layerkit.config import compose
    from layerkit.io.weights import save_weights
    from layerkit.pipeline import build_parts
    from layerkit.sampling.run import Container

    parts = build_parts(compose("train", ["+experiment=layerflow_stage3", "backbone=cogvideox_tiny"], registry),
                        registry, training=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in parts.backbone.denoiser.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for p in parts.adapters["layer_embedding"].parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    state = Container(parts).state_dict()
    trainable = {k: v for k, v in state.items() if ".lora_" in k or k.startswith("adapters.")}
    transformer = {k.removeprefix("backbone.denoiser.").replace(".base_layer.", "."): v for k, v in state.items()
                   if k.startswith("backbone.denoiser.") and ".lora_" not in k}
    config = dict(parts.backbone.denoiser.config)
    sat = to_sat(transformer, trainable, position_table=sincos_table(config, 3 * 16, 3), generator=g)
    path = save_weights(tmp_path / "module.safetensors", sat)
    return SimpleNamespace(parts=parts, trainable=trainable, transformer=transformer, config=config, sat=sat, path=path)


def test_tiny_round_trip_through_the_sat_layout_gives_the_same_denoiser_output(registry, tmp_path, tiny_round_trip):
    from layerkit_plugins.cogvideox.backbone import save_components, tiny_components
    from layerkit_plugins.layerflow.export import export_lora
    from layerkit_plugins.layerflow.sat import convert_sat_state, load_sat_checkpoint, write_converted

    from layerkit.config import compose
    from layerkit.pipeline import build_parts, load_trainable_state
    from layerkit.sampling.run import Container

    rt = tiny_round_trip
    assert sum(".matrix_" in k for k in rt.sat) == 12 * 16  # every layer carries the four matrices
    converted = convert_sat_state(load_sat_checkpoint(rt.path), base_config=rt.config)
    assert set(converted.transformer) == set(rt.transformer)
    assert all(torch.equal(converted.transformer[k], v) for k, v in rt.transformer.items())
    assert set(converted.trainable) == set(rt.trainable)
    assert all(torch.equal(converted.trainable[k], v) for k, v in rt.trainable.items())
    assert converted.counts["lora_untrained_dropped"] == 10 * 16 and converted.counts["lora_merged"] == 0
    assert any("sincos table" in n for n in converted.notes)

    # the user's path: OUTDIR as backbone.path (other parts linked from a base directory whose
    # transformer is a differently seeded one), weights.safetensors loaded like a stage's weights
    base = save_components(tiny_components(seed=1), tmp_path / "base")
    out = tmp_path / "converted"
    write_converted(converted, out, base=base, source=str(rt.path))
    overrides = ["+experiment=layerflow_stage3", f"backbone.path={out}", "backbone.max_text_tokens=16"]
    fresh = build_parts(compose("train", overrides, registry), registry, training=True)
    load_trainable_state(Container(fresh), out / "weights.safetensors", parts=fresh)

    g = torch.Generator().manual_seed(1)
    noisy, t = torch.randn(2, 4, 3, 4, 4, generator=g), torch.tensor([700, 30])
    cond = {"prompt_embeds": torch.randn(2, 48, 32, generator=g),
            "prompt_block_index": torch.arange(3).repeat_interleave(16)[None]}
    with torch.no_grad():
        direct = rt.parts.backbone.predict(noisy, t, cond)
        loaded = fresh.backbone.predict(noisy, t, cond)
        for key in ("content_lora", "motion_lora", "layer_embedding"):  # each part matters
            rt.parts.adapters[key].scale = 0.0
            assert not torch.allclose(rt.parts.backbone.predict(noisy, t, cond), direct, atol=1e-4), key
            rt.parts.adapters[key].scale = 1.0
    diff = float((direct - loaded).abs().max())
    print(f"tiny round trip: max |direct - converted| = {diff:.3g} over {direct.numel()} outputs")
    assert diff < 1e-6

    # the converted file exports like a trained stage-3 file
    exported = export_lora(out / "weights.safetensors", "content_lora", tmp_path / "export", ["diffusers"])
    assert [p.rsplit("/", 1)[-1] for p in exported] == ["content_lora.diffusers.safetensors"]


def test_fused_qkv_with_both_loras_as_the_authors_compute_it_equals_the_peft_projections(tiny_round_trip):
    """The authors' LoraLinear on the fused qkv of a LoRA layer: ``x W^T + b`` plus, per partition
    j, ``(x A_j^T) B_j^T / 8 * scale`` (motion) and ``(x C_j^T) D_j^T / 256`` (content), the
    partitions concatenated; layerkit's peft-wrapped to_q, to_k, to_v give the same, in that order."""
    rt = tiny_round_trip
    prefix = f"{SAT}transformer.layers.5.attention.query_key_value"
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2))
    fused = x @ rt.sat[f"{prefix}.original.weight"].T + rt.sat[f"{prefix}.original.bias"]
    motion = torch.cat([x @ rt.sat[f"{prefix}.matrix_A.{j}"].T @ rt.sat[f"{prefix}.matrix_B.{j}"].T for j in range(3)], -1)
    content = torch.cat([x @ rt.sat[f"{prefix}.matrix_C.{j}"].T @ rt.sat[f"{prefix}.matrix_D.{j}"].T for j in range(3)], -1)
    attn = rt.parts.backbone.denoiser.transformer_blocks[5].attn1
    with torch.no_grad():
        ours = torch.cat([attn.to_q(x), attn.to_k(x), attn.to_v(x)], -1)
    diff = float((fused + motion / 8 + content / 256 - ours).abs().max())
    print(f"fused qkv (authors' formula) vs peft to_q/to_k/to_v: max diff {diff:.3g}")
    assert diff < 1e-5


def test_untrained_lora_matrices_are_checked_merged_or_refused(tiny_round_trip):
    from layerkit_plugins.layerflow.sat import LORA_ALPHA, convert_sat_state

    rt = tiny_round_trip
    layer = f"{SAT}transformer.layers.0.attention.query_key_value"
    # a non-zero Content LoRA on an untrained layer: merged into that projection (k = partition 1)
    sat = dict(rt.sat)
    sat[f"{layer}.matrix_D.1"] = torch.randn(32, 256) * 0.1
    converted = convert_sat_state(sat, base_config=rt.config)
    delta = sat[f"{layer}.matrix_D.1"] @ sat[f"{layer}.matrix_C.1"] * (LORA_ALPHA / 256)
    merged = converted.transformer["transformer_blocks.0.attn1.to_k.weight"]
    diff = float((merged - rt.transformer["transformer_blocks.0.attn1.to_k.weight"] - delta).abs().max())
    print(f"merged Content LoRA: max diff {diff:.3g}")
    assert diff < 1e-6 and converted.counts["lora_merged"] == 2
    assert torch.equal(converted.transformer["transformer_blocks.0.attn1.to_q.weight"],
                       rt.transformer["transformer_blocks.0.attn1.to_q.weight"])
    # a non-zero Motion LoRA there cannot be represented
    sat = dict(rt.sat)
    sat[f"{layer}.matrix_B.2"] = torch.ones(32, 8)
    with pytest.raises(LayerkitError, match=r"matrix_B\.2 is not zero") as err:
        convert_sat_state(sat, base_config=rt.config)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("case", ["unknown", "learned_positions", "missing"])
def test_what_cannot_be_mapped_is_one_sentence_naming_the_key(tiny_round_trip, case):
    from layerkit_plugins.layerflow.sat import convert_sat_state

    sat = dict(tiny_round_trip.sat)
    if case == "unknown":
        sat[f"{SAT}mixins.patch_embed.new_proj.weight"] = torch.zeros(2, 2)
        match = r"'model\.diffusion_model\.mixins\.patch_embed\.new_proj\.weight' has no layerkit counterpart"
    elif case == "learned_positions":
        sat[f"{SAT}mixins.pos_embed.pos_embedding"] = sat[f"{SAT}mixins.pos_embed.pos_embedding"] + 0.1
        match = r"pos_embedding differs from CogVideoX's sincos position table"
    else:
        del sat[f"{SAT}transformer.layers.3.mlp.dense_4h_to_h.bias"]
        match = r"lacks the weight for diffusers' transformer_blocks\.3\.ff\.net\.2\.bias"
    with pytest.raises(LayerkitError, match=match) as err:
        convert_sat_state(sat, base_config=tiny_round_trip.config)
    assert "\n" not in str(err.value) and str(err.value).count(". ") == 0


def test_cli_writes_a_diffusers_transformer_and_layerkit_weights(tiny_round_trip, tmp_path, capsys):
    from diffusers import CogVideoXTransformer3DModel
    from layerkit_plugins.layerflow.sat import main

    from layerkit.io.weights import load_weights, read_metadata

    rt = tiny_round_trip
    base = tmp_path / "base"
    rt.parts.backbone.denoiser.save_config(str(base / "transformer"))  # what --base reads: transformer/config.json
    assert main([str(rt.path), str(tmp_path / "out"), "--base", str(base), "--dtype", "bf16"]) == 0
    printed = capsys.readouterr().out
    assert "content_lora: 16" in printed and "motion_lora: 16" in printed and "layer_embedding: 4" in printed
    model = CogVideoXTransformer3DModel.from_pretrained(str(tmp_path / "out" / "transformer"))
    assert model.config.num_layers == 12 and model.config.max_text_seq_length == 16
    weights = load_weights(tmp_path / "out" / "weights.safetensors")
    assert set(weights) == set(rt.trainable) and all(v.dtype == torch.bfloat16 for v in weights.values())
    adapters = read_metadata(tmp_path / "out" / "weights.safetensors")["layerkit_config"]["adapters"]
    assert adapters["content_lora"]["rank"] == 256 and adapters["motion_lora"]["alpha"] == 1.0

    assert main([str(tmp_path / "nowhere.pt"), str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_authors_pickle_layout_reads_through_load_weights(tiny_round_trip, tmp_path):
    """``<dir>/latest`` + ``<dir>/1000/mp_rank_00_model_states.pt`` holding ``{'module': state}``
    beside DeepSpeed's non-tensor bookkeeping."""
    from layerkit_plugins.layerflow.sat import convert_sat_state, load_sat_checkpoint

    root = tmp_path / "multi-layer-generation-rgba"
    (root / "1000").mkdir(parents=True)
    (root / "latest").write_text("1000")
    torch.save({"module": tiny_round_trip.sat, "buffer_names": [], "optimizer": None, "iteration": 1000,
                "global_steps": 1000, "dp_world_size": 1, "mp_world_size": 1, "ds_version": "0.14.0"},
               root / "1000" / "mp_rank_00_model_states.pt")
    converted = convert_sat_state(load_sat_checkpoint(root), base_config=tiny_round_trip.config)
    assert converted.counts["content_lora"] == 16
