"""LayerFlow's released checkpoints (the authors' SAT layout) -> layerkit weights.

The authors (github SihuiJi/LayerFlow, ``sat/``) release each model as a SAT/DeepSpeed
``<iteration>/mp_rank_00_model_states.pt`` whose ``module`` holds ``SATVideoDiffusionEngine``'s
state. What it holds and where it goes:

========================================================  ==============================================
SAT key (under ``model.diffusion_model.``)                layerkit
========================================================  ==============================================
``transformer.layers.N.*``, ``mixins.adaln_layer.*``,     the diffusers ``CogVideoXTransformer3DModel``
``mixins.patch_embed.*``, ``mixins.final_layer.*``,       state (``transformer/`` of a diffusers
``time_embed.*``, ``transformer.final_layernorm.*``       CogVideoX directory), renamed and split as
                                                          diffusers' SAT converter does
``transformer.layers.N.attention.{query_key_value,        Motion LoRA (``matrix_A``/``matrix_B``, rank 8)
dense}.matrix_{A,B,C,D}.j``                               and Content LoRA (``matrix_C``/``matrix_D``,
                                                          rank 256), peft ``lora_A``/``lora_B`` of
                                                          ``attn1.to_{q,k,v}`` (j = 0, 1, 2 of the fused
                                                          qkv) and ``attn1.to_out.0``
``mixins.pos_embed.txt_embedder.{0,1}.*``                 the ``layerflow.layer_embedding`` adapter
                                                          (``embed.0`` Linear(1 -> D), ``embed.1``
                                                          LayerNorm)
``mixins.pos_embed.pos_embedding``                        dropped after a check: it must be the fixed
                                                          sincos table diffusers computes itself
========================================================  ==============================================

Top-level ``conditioner.*`` (the frozen T5-XXL) and ``first_stage_model.*`` (the frozen 3D VAE)
are skipped when present: layerkit takes both from the base CogVideoX-2b directory.

The authors' ``LoraMixin`` wraps the attention of *every* one of the 30 layers (``LoraLinear``
keeps the base weight as ``original.weight``), but the released configs train only layers with
index % 6 == 5 (``not_trainable_prefixes: ['stage2_v3_part_6...']``): there ``matrix_A/B`` are the
Motion LoRA of the earlier stage and ``matrix_C/D`` the Content LoRA. On the 25 other layers
``matrix_A``/``matrix_C`` keep their random (Kaiming) initialisation and ``matrix_B``/``matrix_D``
their zero one, so those LoRAs add nothing; the converter checks that ``matrix_B``/``matrix_D``
are zero there and drops them. A non-zero ``matrix_D`` there is merged into the base weight
(the authors apply the Content LoRA at every step, scale 1); a non-zero ``matrix_B`` (a Motion LoRA
layerkit could only apply at a fixed scale) is an error. Both LoRAs use ``lora_alpha`` 1, so
their scalings are 1/8 and 1/256, as layerkit's ``layerflow_motion_lora`` /
``layerflow_content_lora`` presets.

Output names are the ones ``layerkit train`` writes to ``weights.safetensors``
(``backbone.denoiser.<module>.lora_A.<adapter>.weight``, ``adapters.<adapter>.embed.*``), so the
converted file goes wherever a stage-3 ``weights.safetensors`` goes. Command line::

    python -m layerkit_plugins.layerflow.sat ckpts_2b_lora/multi-layer-generation-rgba OUTDIR \\
        --base /models/CogVideoX-2b

writes ``OUTDIR/transformer/`` (diffusers format), ``OUTDIR/weights.safetensors``,
``OUTDIR/conversion.json`` and, with ``--base``, links the base model's other subfolders so that
``OUTDIR`` is a complete ``backbone.path``. See docs/layerflow_weights.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from layerkit.errors import LayerkitError

SAT_PREFIX = "model.diffusion_model."
#: frozen components stored beside the transformer in the authors' files (T5-XXL, 3D VAE)
FROZEN_PREFIXES = ("conditioner.", "first_stage_model.")
#: what the released configs train: layers with index % EVERY == OFFSET ("part_6")
EVERY, OFFSET = 6, 5
#: the authors' LoraMixin default (their configs do not set it): scaling = 1 / rank
LORA_ALPHA = 1.0
#: adapter names of the layerflow experiments (layerflow_stage2/3.yaml)
ADAPTERS = {"motion": "motion_lora", "content": "content_lora", "embedding": "layer_embedding"}
#: LoRA matrices per SAT projection, and the peft projections they sit on
LORA_MATRICES = {"motion": ("matrix_A", "matrix_B"), "content": ("matrix_C", "matrix_D")}
PROJECTIONS = {"query_key_value": ("to_q", "to_k", "to_v"), "dense": ("to_out.0",)}
#: largest |difference| tolerated between the stored position table and diffusers' sincos one
#: (the table is stored in bf16: rounding of values in [-1, 1] stays below 2^-9)
POSITION_TOLERANCE = 1e-2
DENOISER = "backbone.denoiser."

#: SAT name (under model.diffusion_model.) -> diffusers name, for weights outside the layers
_GLOBAL = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "mixins.patch_embed.proj": "patch_embed.proj",
    "mixins.patch_embed.text_proj": "patch_embed.text_proj",
    "mixins.final_layer.norm_final": "norm_out.norm",
    "mixins.final_layer.linear": "proj_out",
    "mixins.final_layer.adaLN_modulation.1": "norm_out.linear",
    "transformer.final_layernorm": "norm_final",
}
#: per-layer SAT name (``{i}`` the layer) -> diffusers name, one to one
_LAYER = {
    "transformer.layers.{i}.input_layernorm": "transformer_blocks.{i}.norm1.norm",
    "transformer.layers.{i}.post_attention_layernorm": "transformer_blocks.{i}.norm2.norm",
    "transformer.layers.{i}.attention.dense.original": "transformer_blocks.{i}.attn1.to_out.0",
    "transformer.layers.{i}.attention.dense": "transformer_blocks.{i}.attn1.to_out.0",  # without the LoRA mixin
    "transformer.layers.{i}.mlp.dense_h_to_4h": "transformer_blocks.{i}.ff.net.0.proj",
    "transformer.layers.{i}.mlp.dense_4h_to_h": "transformer_blocks.{i}.ff.net.2",
    "mixins.adaln_layer.query_layernorm_list.{i}": "transformer_blocks.{i}.attn1.norm_q",
    "mixins.adaln_layer.key_layernorm_list.{i}": "transformer_blocks.{i}.attn1.norm_k",
}
_QKV = ("transformer.layers.{i}.attention.query_key_value.original",
        "transformer.layers.{i}.attention.query_key_value")  # fused q, k, v rows -> to_q, to_k, to_v
_ADALN = "mixins.adaln_layer.adaLN_modulations.{i}.1"  # 12 chunks -> norm1.linear, norm2.linear
_POSITIONS = "mixins.pos_embed.pos_embedding"
_EMBEDDER = "mixins.pos_embed.txt_embedder"
_LORA_RE = re.compile(r"^transformer\.layers\.(\d+)\.attention\.(query_key_value|dense)\.(matrix_[ABCD])\.(\d+)$")
_LAYER_RE = re.compile(r"\.(\d+)\.")


@dataclass
class Converted:
    """A converted checkpoint: ``transformer`` in diffusers' names, ``trainable`` in layerkit's
    trainable-state names, ``config`` the diffusers transformer config, ``counts`` per component
    and ``notes`` (one line each) on what the conversion decided."""

    transformer: dict[str, torch.Tensor]
    trainable: dict[str, torch.Tensor]
    config: dict[str, Any]
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)

    def layerkit_config(self) -> dict[str, Any]:
        """The part of a layerkit config that describes these weights (``weights.safetensors``
        metadata: ``layerflow.export`` reads the LoRA ranks and alphas from it)."""
        adapters: dict[str, Any] = {}
        for kind in ("motion", "content"):
            name = ADAPTERS[kind]
            if kind in self.ranks:
                adapters[name] = {"name": "lora", "rank": self.ranks[kind], "alpha": LORA_ALPHA,
                                  "targets": ["to_q", "to_k", "to_v", "to_out.0"], "blocks": "transformer_blocks",
                                  "every": EVERY, "offset": OFFSET, "inference": kind == "content"}
        if any(k.startswith(f"adapters.{ADAPTERS['embedding']}.") for k in self.trainable):
            adapters[ADAPTERS["embedding"]] = {"name": "layerflow.layer_embedding"}
        return {"backbone": {"name": "cogvideox"}, "adapters": adapters}


# ----------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------
def checkpoint_file(path: str | os.PathLike) -> Path:
    """``path`` itself, or for a SAT save directory (``latest`` + ``<iteration>/``) its
    ``<iteration>/mp_rank_00_model_states.pt``."""
    path = Path(path)
    if path.is_dir():
        latest = path / "latest"
        if not latest.is_file():
            raise LayerkitError(f"'{path}' is a directory without a SAT 'latest' file; give the "
                                "mp_rank_00_model_states.pt file itself.")
        path = path / latest.read_text().strip() / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise LayerkitError(f"LayerFlow checkpoint '{path}' does not exist.")
    return path


def load_sat_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The flat state of a SAT checkpoint (or of a safetensors copy of its ``module``), read
    only through :func:`layerkit.io.weights.load_weights` (``torch.load(weights_only=True)``)."""
    from layerkit.io.weights import load_weights

    state = load_weights(checkpoint_file(path), allow_pickle=True)
    if not any(k.startswith(SAT_PREFIX) for k in state):
        first = next(iter(state), "no keys at all")
        raise LayerkitError(f"'{path}' is not a LayerFlow SAT checkpoint: it has no {SAT_PREFIX}* keys "
                            f"(first: '{first}').")
    return state


# ----------------------------------------------------------------------------------------
# SAT -> layerkit
# ----------------------------------------------------------------------------------------
def _split_keys(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """The transformer's keys without ``model.diffusion_model.``; frozen T5/VAE keys counted and
    dropped; anything else an error."""
    inner, frozen = {}, 0
    for key, value in state.items():
        if key.startswith(SAT_PREFIX):
            inner[key[len(SAT_PREFIX):]] = value
        elif key.startswith(FROZEN_PREFIXES):
            frozen += 1
        else:
            raise LayerkitError(f"SAT checkpoint key '{key}' has no layerkit counterpart (expected {SAT_PREFIX}*, "
                                f"{', '.join(p + '*' for p in FROZEN_PREFIXES)}).")
    return inner, frozen


def infer_config(inner: Mapping[str, torch.Tensor], base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``CogVideoXTransformer3DModel`` arguments: widths and depth read from the weights, the rest
    (sample size, text length, position scales) from ``base`` or CogVideoX-2B's defaults."""
    def need(key: str) -> torch.Tensor:
        if key not in inner:
            raise LayerkitError(f"the SAT checkpoint lacks {SAT_PREFIX}{key}, so it is not a CogVideoX transformer.")
        return inner[key]

    proj, text = need("mixins.patch_embed.proj.weight"), need("mixins.patch_embed.text_proj.weight")
    head_dim = need("mixins.adaln_layer.query_layernorm_list.0.weight").shape[0]
    hidden, patch = proj.shape[0], proj.shape[-1]
    if proj.dim() != 4:
        raise LayerkitError(f"{SAT_PREFIX}mixins.patch_embed.proj.weight has shape {tuple(proj.shape)}; only 2-D patch "
                            "embeddings (CogVideoX 1.0) are supported.")
    layers = {int(m.group(1)) for k in inner if (m := re.match(r"transformer\.layers\.(\d+)\.", k))}
    config = {k: v for k, v in dict(base or {}).items() if not k.startswith("_")}
    config.update(num_layers=len(layers), num_attention_heads=hidden // head_dim, attention_head_dim=head_dim,
                  in_channels=proj.shape[1], out_channels=need("mixins.final_layer.linear.weight").shape[0] // patch**2,
                  patch_size=patch, text_embed_dim=text.shape[1],
                  time_embed_dim=need("time_embed.0.weight").shape[0])
    if sorted(layers) != list(range(len(layers))):
        raise LayerkitError(f"the SAT checkpoint's transformer layers are not numbered 0..{len(layers) - 1}.")
    return config


def check_positions(table: torch.Tensor, config: Mapping[str, Any]) -> str:
    """``mixins.pos_embed.pos_embedding`` [1, text + f*h*w, D] must be zero on its text rows and
    diffusers' 3-D sincos table on its video rows (which diffusers computes itself); a learned
    table cannot be carried over. Returns a note."""
    from diffusers.models.embeddings import get_3d_sincos_pos_embed

    key = SAT_PREFIX + _POSITIONS
    if table.is_meta:
        return f"{key}: not checked (meta tensor)."
    rows = table.reshape(-1, table.shape[-1]).float()
    patch = int(config.get("patch_size", 2))
    grid_h, grid_w = int(config.get("sample_height", 60)) // patch, int(config.get("sample_width", 90)) // patch
    nonzero = (rows != 0).any(dim=1).nonzero()
    text = int(nonzero[0]) if len(nonzero) else rows.shape[0]
    frames, rest = divmod(rows.shape[0] - text, grid_h * grid_w)
    if rest or frames == 0:
        raise LayerkitError(f"{key} has {rows.shape[0]} rows, {text} of them zero text rows; the rest is not a whole "
                            f"number of {grid_h}x{grid_w} patch grids, so it is not CogVideoX's sincos table.")
    expected = get_3d_sincos_pos_embed(rows.shape[-1], (grid_w, grid_h), frames,
                                       float(config.get("spatial_interpolation_scale", 1.875)),
                                       float(config.get("temporal_interpolation_scale", 1.0)),
                                       output_type="pt").flatten(0, 1).float()
    diff = float((rows[text:] - expected).abs().max())
    if diff > POSITION_TOLERANCE:
        raise LayerkitError(f"{key} differs from CogVideoX's sincos position table by up to {diff:.3g} (a learned "
                            "table), which the diffusers transformer cannot carry.")
    return f"{key}: {text} text rows + {frames} latent frames of {grid_h}x{grid_w}, the sincos table (max diff {diff:.2g}); dropped."


def _is_zero(value: torch.Tensor) -> bool:
    """All zero (a meta tensor, which has no values, counts as zero)."""
    if value.is_meta or value.numel() == 0:
        return True
    return not bool(value.abs().max() > 0)


def convert_sat_state(state: Mapping[str, torch.Tensor], *, base_config: Mapping[str, Any] | None = None,
                      every: int = EVERY, offset: int = OFFSET, adapters: Mapping[str, str] | None = None,
                      positions: bool = True) -> Converted:
    """A LayerFlow SAT state (flat, ``model.diffusion_model.*`` keys) -> :class:`Converted`.

    ``adapters`` renames the layerkit adapters (keys ``motion``, ``content``, ``embedding``);
    LoRAs are placed on layers with index % ``every`` == ``offset``. ``positions=False`` skips
    the check of the stored sincos table. Unknown keys raise a one-sentence ``LayerkitError``.
    """
    names = {**ADAPTERS, **dict(adapters or {})}
    inner, frozen = _split_keys(state)
    config = infer_config(inner, base_config)
    out = Converted(transformer={}, trainable={}, config=config)
    out.counts = {"sat_keys": len(state), "frozen_skipped": frozen, "lora_untrained_dropped": 0, "lora_merged": 0}
    lora: dict[tuple[int, str, str, int], torch.Tensor] = {}
    layer_keys = {tpl: re.compile("^" + re.escape(tpl).replace(re.escape("{i}"), r"(\d+)") + r"\.(weight|bias)$")
                  for tpl in (*_LAYER, *_QKV, _ADALN)}

    for key, value in inner.items():
        if m := _LORA_RE.match(key):
            lora[(int(m.group(1)), m.group(2), m.group(3), int(m.group(4)))] = value
            continue
        stem, _, leaf = key.rpartition(".")
        if stem in _GLOBAL and leaf in ("weight", "bias"):
            out.transformer[f"{_GLOBAL[stem]}.{leaf}"] = value
            continue
        if key == _POSITIONS:
            out.notes.append(check_positions(value, config) if positions else f"{SAT_PREFIX}{key}: dropped unchecked.")
            continue
        if key.startswith(_EMBEDDER + ".") and (m := re.match(r"^\.([01])\.(weight|bias)$", key[len(_EMBEDDER):])):
            out.trainable[f"adapters.{names['embedding']}.embed.{m.group(1)}.{m.group(2)}"] = value
            continue
        for tpl, pattern in layer_keys.items():
            if m := pattern.match(key):
                i, leaf = m.group(1), m.group(2)
                if tpl in _QKV:
                    for proj, part in zip(PROJECTIONS["query_key_value"], value.chunk(3, dim=0), strict=True):
                        out.transformer[f"transformer_blocks.{i}.attn1.{proj}.{leaf}"] = part.clone()
                elif tpl == _ADALN:  # [shift, scale, gate] x (msa, mlp, text msa, text mlp)
                    c = value.chunk(12, dim=0)
                    out.transformer[f"transformer_blocks.{i}.norm1.linear.{leaf}"] = torch.cat(c[0:3] + c[6:9])
                    out.transformer[f"transformer_blocks.{i}.norm2.linear.{leaf}"] = torch.cat(c[3:6] + c[9:12])
                else:
                    out.transformer[f"{_LAYER[tpl].replace('{i}', i)}.{leaf}"] = value
                break
        else:
            raise LayerkitError(f"SAT checkpoint key '{SAT_PREFIX}{key}' has no layerkit counterpart.")

    _place_lora(out, lora, every=every, offset=offset, names=names)
    out.counts.update(transformer=len(out.transformer),
                      motion_lora=sum(f".{names['motion']}." in k for k in out.trainable),
                      content_lora=sum(f".{names['content']}." in k for k in out.trainable),
                      layer_embedding=sum(k.startswith(f"adapters.{names['embedding']}.") for k in out.trainable))
    if not out.counts["layer_embedding"]:
        out.notes.append("no txt_embedder in this checkpoint (its config has no learnable_txt_embed): sample without "
                         "the layer embedding adapter.")
    _check_complete(out)
    return out


def _place_lora(out: Converted, lora: Mapping[tuple[int, str, str, int], torch.Tensor], *, every: int, offset: int,
                names: Mapping[str, str]) -> None:
    """Trained layers' LoRAs -> peft names; untrained ones checked zero (or merged, see module doc)."""
    for (layer, sat_proj, matrix, j), value in lora.items():
        projections = PROJECTIONS[sat_proj]
        if j >= len(projections):
            raise LayerkitError(f"SAT checkpoint key '{SAT_PREFIX}transformer.layers.{layer}.attention.{sat_proj}."
                                f"{matrix}.{j}' has no layerkit counterpart ({sat_proj} has {len(projections)} parts).")
        kind = "motion" if matrix in LORA_MATRICES["motion"] else "content"
        down, up = LORA_MATRICES[kind]
        other = (layer, sat_proj, up if matrix == down else down, j)
        if other not in lora:
            raise LayerkitError(f"SAT checkpoint key '{SAT_PREFIX}transformer.layers.{layer}.attention.{sat_proj}."
                                f"{matrix}.{j}' has no partner {other[2]}.")
        rank = (value if matrix == down else lora[other]).shape[0]
        if out.ranks.setdefault(kind, rank) != rank:
            raise LayerkitError(f"the {kind} LoRA of layer {layer} has rank {rank}, another layer {out.ranks[kind]}.")
        module = f"transformer_blocks.{layer}.attn1.{projections[j]}"
        if layer % every == offset:
            part = "lora_A" if matrix == down else "lora_B"
            out.trainable[f"{DENOISER}{module}.{part}.{names[kind]}.weight"] = value
            continue
        if matrix == down:
            continue  # judged with its partner: A/C may be random when B/D is zero
        out.counts["lora_untrained_dropped"] += 2
        if _is_zero(value):
            continue
        key = f"{SAT_PREFIX}transformer.layers.{layer}.attention.{sat_proj}.{matrix}.{j}"
        if kind == "motion":
            raise LayerkitError(f"{key} is not zero although layer {layer} is not one of the LoRA layers "
                                f"(index % {every} == {offset}), and layerkit's Motion LoRA exists only there.")
        weight = out.transformer[f"{module}.weight"]
        delta = (value.float() @ lora[other].float()) * (LORA_ALPHA / rank)
        out.transformer[f"{module}.weight"] = (weight.float() + delta).to(weight.dtype)
        out.counts["lora_merged"] += 2
        out.notes.append(f"{key}: non-zero Content LoRA outside the LoRA layers, merged into {module}.weight.")


def _check_complete(out: Converted) -> None:
    """Every key and shape of the diffusers transformer, nothing more (checked on ``meta``)."""
    from diffusers import CogVideoXTransformer3DModel

    with torch.device("meta"):
        expected = CogVideoXTransformer3DModel(**out.config).state_dict()
    missing = [k for k in expected if k not in out.transformer]
    if missing:
        raise LayerkitError(f"the SAT checkpoint lacks the weight for diffusers' {missing[0]} "
                            f"({len(missing)} missing in all).")
    extra = [k for k in out.transformer if k not in expected]
    if extra:
        raise LayerkitError(f"the converted weight {extra[0]} has no place in CogVideoXTransformer3DModel.")
    wrong = [k for k, v in expected.items() if tuple(v.shape) != tuple(out.transformer[k].shape)]
    if wrong:
        k = wrong[0]
        raise LayerkitError(f"the converted {k} has shape {tuple(out.transformer[k].shape)}, diffusers expects "
                            f"{tuple(expected[k].shape)}.")


# ----------------------------------------------------------------------------------------
# layerkit -> SAT (the inverse: tests, and writing weights back for the authors' code)
# ----------------------------------------------------------------------------------------
def to_sat(transformer: Mapping[str, torch.Tensor], trainable: Mapping[str, torch.Tensor], *,
           ranks: Mapping[str, int] | None = None, every: int = EVERY, offset: int = OFFSET,
           adapters: Mapping[str, str] | None = None, position_table: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Diffusers transformer + layerkit trainable state -> the authors' SAT layout (``model.
    diffusion_model.*``). Every layer gets the four LoRA matrices as the authors' ``LoraMixin``
    does; layers without layerkit LoRAs get random ``matrix_A``/``matrix_C`` and zero
    ``matrix_B``/``matrix_D``. ``position_table`` [1, text + f*h*w, D] is stored as
    ``mixins.pos_embed.pos_embedding`` when given."""
    names = {**ADAPTERS, **dict(adapters or {})}
    ranks = {"motion": 8, "content": 256, **dict(ranks or {})}
    sat: dict[str, torch.Tensor] = {}
    reverse_global = {v: k for k, v in _GLOBAL.items()}
    layers = sorted({int(k.split(".")[1]) for k in transformer if k.startswith("transformer_blocks.")})
    for key, value in transformer.items():
        stem, _, leaf = key.rpartition(".")
        if stem in reverse_global:
            sat[f"{reverse_global[stem]}.{leaf}"] = value
    for i in layers:
        block = f"transformer_blocks.{i}"
        for leaf in ("weight", "bias"):
            sat[f"{_QKV[0].format(i=i)}.{leaf}"] = torch.cat([transformer[f"{block}.attn1.{p}.{leaf}"]
                                                              for p in PROJECTIONS["query_key_value"]])
            n1 = transformer[f"{block}.norm1.linear.{leaf}"].chunk(6, dim=0)
            n2 = transformer[f"{block}.norm2.linear.{leaf}"].chunk(6, dim=0)
            sat[f"{_ADALN.format(i=i)}.{leaf}"] = torch.cat(n1[0:3] + n2[0:3] + n1[3:6] + n2[3:6])
            for tpl, target in _LAYER.items():
                if tpl.endswith(".attention.dense"):
                    continue  # the LoRA mixin's ".original" form is written
                sat[f"{tpl.format(i=i)}.{leaf}"] = transformer[f"{target.format(i=i)}.{leaf}"]
        for sat_proj, projections in PROJECTIONS.items():
            for j, proj in enumerate(projections):
                module = f"{DENOISER}{block}.attn1.{proj}"
                base = transformer[f"{block}.attn1.{proj}.weight"]
                for kind, (down, up) in LORA_MATRICES.items():
                    prefix = f"transformer.layers.{i}.attention.{sat_proj}"
                    a = trainable.get(f"{module}.lora_A.{names[kind]}.weight")
                    b = trainable.get(f"{module}.lora_B.{names[kind]}.weight")
                    if a is None or b is None or i % every != offset:
                        r = ranks[kind]
                        a = torch.randn(r, base.shape[1], generator=generator).to(base) / base.shape[1] ** 0.5
                        b = torch.zeros(base.shape[0], r, dtype=base.dtype, device=base.device)
                    sat[f"{prefix}.{down}.{j}"], sat[f"{prefix}.{up}.{j}"] = a, b
    for key, value in trainable.items():
        if key.startswith(f"adapters.{names['embedding']}.embed."):
            sat[f"{_EMBEDDER}.{key.split('.embed.', 1)[1]}"] = value
    if position_table is not None:
        sat[_POSITIONS] = position_table
    return {SAT_PREFIX + k: v for k, v in sat.items()}


def sincos_table(config: Mapping[str, Any], text_length: int, latent_frames: int) -> torch.Tensor:
    """The position table the authors' ``Basic3DPositionEmbeddingMixin`` stores: ``text_length``
    zero rows, then CogVideoX's 3-D sincos table for ``latent_frames`` frames."""
    from diffusers.models.embeddings import get_3d_sincos_pos_embed

    patch = int(config.get("patch_size", 2))
    grid = (int(config.get("sample_width", 90)) // patch, int(config.get("sample_height", 60)) // patch)
    width = int(config.get("num_attention_heads", 30)) * int(config.get("attention_head_dim", 64))
    video = get_3d_sincos_pos_embed(width, grid, latent_frames, float(config.get("spatial_interpolation_scale", 1.875)),
                                    float(config.get("temporal_interpolation_scale", 1.0)), output_type="pt")
    return torch.cat([torch.zeros(text_length, width), video.flatten(0, 1).float()]).unsqueeze(0)


# ----------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------
DTYPES = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BASE_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler", "model_index.json")


def write_converted(converted: Converted, directory: str | os.PathLike, *, base: str | os.PathLike | None = None,
                    dtype: torch.dtype | None = None, source: str = "") -> list[Path]:
    """``directory/transformer/`` (diffusers), ``directory/weights.safetensors`` (layerkit names),
    ``directory/conversion.json``; with ``base`` (a diffusers CogVideoX-2b directory) its other
    parts are linked in so that ``directory`` is a complete ``backbone.path``."""
    from diffusers import CogVideoXTransformer3DModel

    from layerkit.io.weights import save_weights

    directory = Path(directory)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    (directory / "transformer").mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        CogVideoXTransformer3DModel(**converted.config).save_config(str(directory / "transformer"))
    written = [directory / "transformer" / "config.json"]
    written.append(save_weights(directory / "transformer" / "diffusion_pytorch_model.safetensors",
                                {k: cast(v) for k, v in converted.transformer.items()}, metadata={"format": "pt"}))
    written.append(save_weights(directory / "weights.safetensors", {k: cast(v) for k, v in converted.trainable.items()},
                                metadata={"format": "pt", "layerkit_config": converted.layerkit_config(),
                                          "layerkit_source": source or "LayerFlow SAT checkpoint"}))
    record = {"source": source, "counts": converted.counts, "ranks": converted.ranks, "notes": converted.notes}
    (directory / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
    written.append(directory / "conversion.json")
    if base is not None:
        for part in BASE_PARTS:
            src, dst = Path(base).resolve() / part, directory / part
            if src.exists() and not dst.exists():
                dst.symlink_to(src, target_is_directory=src.is_dir())
                written.append(dst)
    return written


def base_transformer_config(base: str | os.PathLike | None) -> dict[str, Any] | None:
    if base is None:
        return None
    path = Path(base) / "transformer" / "config.json"
    if not path.is_file():
        raise LayerkitError(f"--base '{base}' has no transformer/config.json; give a diffusers CogVideoX-2b directory.")
    return json.loads(path.read_text())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m layerkit_plugins.layerflow.sat",
                                     description="Convert a released LayerFlow SAT checkpoint to layerkit weights.")
    parser.add_argument("checkpoint", help="mp_rank_00_model_states.pt, or the SAT directory holding 'latest'")
    parser.add_argument("outdir", help="output directory")
    parser.add_argument("--base", default=None,
                        help="diffusers CogVideoX-2b directory: its transformer config is used and its vae/, "
                             "text_encoder/, tokenizer/, scheduler/ are linked into OUTDIR")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="keep", help="dtype of the written weights")
    parser.add_argument("--no-position-check", action="store_true",
                        help="drop the stored position table without comparing it with the sincos one")
    args = parser.parse_args(argv)
    try:
        path = checkpoint_file(args.checkpoint)
        converted = convert_sat_state(load_sat_checkpoint(path), base_config=base_transformer_config(args.base),
                                      positions=not args.no_position_check)
        for written in write_converted(converted, args.outdir, base=args.base, dtype=DTYPES[args.dtype],
                                       source=str(path)):
            print(written)
    except LayerkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, count in converted.counts.items():
        print(f"{name}: {count}")
    for note in converted.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
