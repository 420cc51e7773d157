"""Key converters for ToonCrafter's UNet and image projector (plain functions on state dicts).

- ToonCrafter's ``model.ckpt`` (a Lightning checkpoint: ``{"state_dict": ...}``; a DeepSpeed one:
  ``{"module": ...}`` with keys prefixed ``_forward_module.``) -> ``ToonCrafterUNet`` names
  (prefix ``model.diffusion_model.`` removed, ``time_embed.{0,2}`` -> ``time_embed.linear_{1,2}``,
  ``fps_embedding.{0,2}`` -> ``fps_embedding.linear_{1,2}``; DynamiCrafter 256's
  ``framestride_embed`` is the fps embedding) and ``image_proj_model.`` -> ``Resampler``
  (LayerAnimate notes 1.4; ToonCrafter ``scripts/evaluation/inference.py`` load_model_checkpoint).
- ``ToonCrafterUNet`` <-> diffusers ``UNet3DConditionModel`` (ModelScope T2V), the same network
  without fps embedding and image cross-attention (notes 1.5): ``input_blocks`` -> ``down_blocks``,
  ``middle_block`` -> ``mid_block``, ``output_blocks`` -> ``up_blocks``, ``init_attn.0`` ->
  ``transformer_in`` (Conv1d weights ``[o, i, 1]`` <-> Linear ``[o, i]``), ResBlock
  ``in_layers/emb_layers/out_layers/skip_connection`` -> ``norm1, conv1 / time_emb_proj /
  norm2, conv2 / conv_shortcut``, ``temopral_conv`` -> ``temp_convs``.

Every converter returns a new dict and raises ``LayerkitError`` naming the first key it cannot map.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from layerkit.errors import LayerkitError

UNET_PREFIX = "model.diffusion_model."
RESAMPLER_PREFIX = "image_proj_model."
DEEPSPEED_PREFIX = "_forward_module."

_EMBEDDING_RENAMES = {"time_embed": "time_embed", "fps_embedding": "fps_embedding",
                      "framestride_embed": "fps_embedding"}
_EMBEDDING_LAYERS = {"0": "linear_1", "2": "linear_2", "linear_1": "linear_1", "linear_2": "linear_2"}

# ResBlock parts, ToonCrafter -> diffusers ResnetBlock2D.
_RESNET_RENAMES = {"in_layers.0.": "norm1.", "in_layers.2.": "conv1.", "emb_layers.1.": "time_emb_proj.",
                   "out_layers.0.": "norm2.", "out_layers.3.": "conv2.", "skip_connection.": "conv_shortcut."}
# Keys of ToonCrafterUNet that UNet3DConditionModel has no place for.
_NOT_IN_UNET3D = ("fps_embedding.", ".to_k_ip.", ".to_v_ip.", ".attn2.alpha", "masked_layer_fusion_")


def checkpoint_state_dict(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The flat state dict of a loaded ``model.ckpt``: its ``state_dict``, its DeepSpeed ``module``
    (``_forward_module.`` prefix removed), or ``checkpoint`` itself when it is already flat."""
    if "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], Mapping):
        return checkpoint["state_dict"]
    if "module" in checkpoint and isinstance(checkpoint["module"], Mapping):
        return {k.removeprefix(DEEPSPEED_PREFIX): v for k, v in checkpoint["module"].items()}
    return checkpoint


def tooncrafter_to_unet(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """ToonCrafter ``model.ckpt`` (loaded, or its state dict) -> ``ToonCrafterUNet`` state dict.

    Keys outside ``model.diffusion_model.`` (VAE, CLIP, image projector, DDPM buffers) are left out.
    """
    out = {}
    for key, value in checkpoint_state_dict(checkpoint).items():
        if not key.startswith(UNET_PREFIX):
            continue
        name = key[len(UNET_PREFIX):]
        head, _, rest = name.partition(".")
        if head in _EMBEDDING_RENAMES:
            layer, _, param = rest.partition(".")
            if layer not in _EMBEDDING_LAYERS or not param:
                raise LayerkitError(f"Cannot map the ToonCrafter key {key!r} onto ToonCrafterUNet.")
            name = f"{_EMBEDDING_RENAMES[head]}.{_EMBEDDING_LAYERS[layer]}.{param}"
        out[name] = value
    if not out:
        raise LayerkitError(f"The checkpoint has no UNet weights (no key starts with {UNET_PREFIX!r}).")
    return out


def unet_to_tooncrafter(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``ToonCrafterUNet`` state dict -> ToonCrafter's ``model.diffusion_model.*`` names."""
    out = {}
    for key, value in state_dict.items():
        head, _, rest = key.partition(".")
        if head in ("time_embed", "fps_embedding"):
            layer, _, param = rest.partition(".")
            if layer not in ("linear_1", "linear_2") or not param:
                raise LayerkitError(f"Cannot map the key {key!r} onto ToonCrafter's UNet names.")
            key = f"{head}.{'0' if layer == 'linear_1' else '2'}.{param}"
        elif head.startswith("masked_layer_fusion_"):
            raise LayerkitError(f"Cannot map the key {key!r} onto ToonCrafter's UNet names (ToonCrafter "
                                "has no masked layer fusion).")
        out[UNET_PREFIX + key] = value
    return out


def tooncrafter_to_resampler(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """ToonCrafter ``model.ckpt`` -> ``Resampler`` state dict (the ``image_proj_model.`` keys)."""
    out = {k[len(RESAMPLER_PREFIX):]: v for k, v in checkpoint_state_dict(checkpoint).items()
           if k.startswith(RESAMPLER_PREFIX)}
    if not out:
        raise LayerkitError(f"The checkpoint has no image projector (no key starts with {RESAMPLER_PREFIX!r}).")
    return out


def tooncrafter_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """ToonCrafter's yaml ``unet_config.params`` -> ``ToonCrafterUNet`` arguments (``fs_*`` -> ``fps_*``)."""
    renames = {"fs_condition": "fps_condition", "default_fs": "default_fps"}
    return {renames.get(k, k): (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}


# ----------------------------------------------------------------------------------------------
# ToonCrafterUNet <-> diffusers UNet3DConditionModel
# ----------------------------------------------------------------------------------------------


def _indices(state_dict: Mapping[str, Any], pattern: str) -> list[int]:
    """The integers captured by ``pattern`` (one group) over the keys, sorted and unique."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state_dict if (m := regex.match(k))})


def _block_pairs(levels: int, blocks: int, upsample_child: dict[int, int]) -> list[tuple[str, str]]:
    """(ToonCrafterUNet prefix, UNet3DConditionModel prefix) for every block.

    ``blocks`` is ``num_res_blocks``; ``upsample_child[u]`` the position of the Upsample inside the
    last output block of up level u (1 without attention, 3 after spatial and temporal attention).
    """
    pairs = [("time_embed.", "time_embedding."), ("input_blocks.0.0.", "conv_in."),
             ("init_attn.0.", "transformer_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]

    def resnet(ours: str, theirs: str, temporal: str) -> None:
        pairs.append((f"{ours}temopral_conv.", temporal))
        pairs.extend((f"{ours}{a}", f"{theirs}{b}") for a, b in _RESNET_RENAMES.items())

    for level in range(levels):
        for j in range(blocks):
            index = 1 + level * (blocks + 1) + j
            down = f"down_blocks.{level}."
            resnet(f"input_blocks.{index}.0.", f"{down}resnets.{j}.", f"{down}temp_convs.{j}.")
            pairs.append((f"input_blocks.{index}.1.", f"{down}attentions.{j}."))
            pairs.append((f"input_blocks.{index}.2.", f"{down}temp_attentions.{j}."))
        if level < levels - 1:
            index = 1 + level * (blocks + 1) + blocks
            pairs.append((f"input_blocks.{index}.0.op.", f"down_blocks.{level}.downsamplers.0.conv."))

    resnet("middle_block.0.", "mid_block.resnets.0.", "mid_block.temp_convs.0.")
    pairs += [("middle_block.1.", "mid_block.attentions.0."), ("middle_block.2.", "mid_block.temp_attentions.0.")]
    resnet("middle_block.3.", "mid_block.resnets.1.", "mid_block.temp_convs.1.")

    for up in range(levels):
        for j in range(blocks + 1):
            index = up * (blocks + 1) + j
            theirs = f"up_blocks.{up}."
            resnet(f"output_blocks.{index}.0.", f"{theirs}resnets.{j}.", f"{theirs}temp_convs.{j}.")
            if up < levels - 1 and j == blocks:
                pairs.append((f"output_blocks.{index}.{upsample_child[up]}.conv.", f"{theirs}upsamplers.0.conv."))
            pairs.append((f"output_blocks.{index}.1.", f"{theirs}attentions.{j}."))
            pairs.append((f"output_blocks.{index}.2.", f"{theirs}temp_attentions.{j}."))
    return pairs


def _rename(state_dict: Mapping[str, torch.Tensor], pairs: list[tuple[str, str]], what: str) -> dict[str, torch.Tensor]:
    """Replace the longest matching prefix of every key; raise naming the first key without one."""
    pairs = sorted(pairs, key=lambda pair: len(pair[0]), reverse=True)
    out = {}
    for key, value in state_dict.items():
        for old, new in pairs:
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            raise LayerkitError(f"Cannot map the key {key!r} onto {what}.")
    return out


def unet_to_unet3d(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``ToonCrafterUNet`` state dict -> diffusers ``UNet3DConditionModel`` state dict.

    The UNet must have no fps embedding and no image cross-attention (UNet3DConditionModel has
    neither); such keys raise. ``num_res_blocks`` and the number of levels are read from the keys.
    """
    for key in state_dict:
        if any(part in key for part in _NOT_IN_UNET3D):
            raise LayerkitError(f"Cannot map the key {key!r} onto UNet3DConditionModel (it has no fps "
                                "embedding, image cross-attention or layer fusion).")
    downsamplers = _indices(state_dict, r"^input_blocks\.(\d+)\.0\.op\.")
    last = max(_indices(state_dict, r"^input_blocks\.(\d+)\."), default=0)
    blocks = downsamplers[0] - 1 if downsamplers else last
    levels = (last + 1) // (blocks + 1)
    upsample_child = {}
    for up in range(levels - 1):
        index = up * (blocks + 1) + blocks
        children = _indices(state_dict, rf"^output_blocks\.{index}\.(\d+)\.conv\.")
        upsample_child[up] = children[-1] if children else 1
    out = _rename(state_dict, _block_pairs(levels, blocks, upsample_child), "UNet3DConditionModel")
    for name in ("transformer_in.proj_in.weight", "transformer_in.proj_out.weight"):
        if name in out and out[name].ndim == 3:
            out[name] = out[name].squeeze(-1)
    return out


def unet3d_to_unet(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``UNet3DConditionModel`` state dict -> ``ToonCrafterUNet`` state dict."""
    blocks = len(_indices(state_dict, r"^down_blocks\.0\.resnets\.(\d+)\."))
    levels = len(_indices(state_dict, r"^down_blocks\.(\d+)\."))
    upsample_child = {up: 3 if f"up_blocks.{up}.attentions.0.norm.weight" in state_dict else 1
                      for up in range(levels - 1)}
    pairs = [(theirs, ours) for ours, theirs in _block_pairs(levels, blocks, upsample_child)]
    out = _rename(state_dict, pairs, "ToonCrafterUNet")
    for name in ("init_attn.0.proj_in.weight", "init_attn.0.proj_out.weight"):
        if name in out and out[name].ndim == 2:
            out[name] = out[name].unsqueeze(-1)
    return out


def unet3d_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``ToonCrafterUNet`` config -> ``UNet3DConditionModel`` arguments (raises if not representable)."""
    levels = len(config["channel_mult"])
    checks = {
        "image_cross_attention": not config["image_cross_attention"],
        "fps_condition": not config["fps_condition"],
        "temporal_conv": config["temporal_conv"], "temporal_attention": config["temporal_attention"],
        "addition_attention": config["addition_attention"], "use_linear": config["use_linear"],
        "transformer_depth": config["transformer_depth"] == 1,
        "num_head_channels": config["num_head_channels"] > 0,
        "attention_resolutions": sorted(set(config["attention_resolutions"])) == [2**i for i in range(levels - 1)],
        "use_scale_shift_norm": not config.get("use_scale_shift_norm", False),
        "conv_resample": config.get("conv_resample", True),
        "use_causal_attention": not config.get("use_causal_attention", False),
        "tempspatial_aware": not config.get("tempspatial_aware", False),
    }
    for name, ok in checks.items():
        if not ok:
            raise LayerkitError(f"UNet3DConditionModel cannot represent this UNet ({name}={config.get(name)!r}).")
    mc = config["model_channels"]
    return {
        "in_channels": config["in_channels"], "out_channels": config["out_channels"],
        "block_out_channels": [mc * m for m in config["channel_mult"]],
        "down_block_types": ["CrossAttnDownBlock3D"] * (levels - 1) + ["DownBlock3D"],
        "up_block_types": ["UpBlock3D"] + ["CrossAttnUpBlock3D"] * (levels - 1),
        "layers_per_block": config["num_res_blocks"], "cross_attention_dim": config["context_dim"],
        "attention_head_dim": config["num_head_channels"], "norm_num_groups": 32, "norm_eps": 1e-5,
    }


def unet_config_from_unet3d(config: Mapping[str, Any]) -> dict[str, Any]:
    """``UNet3DConditionModel`` config -> ``ToonCrafterUNet`` arguments (no fps, no image attention)."""
    channels = list(config["block_out_channels"])
    levels = len(channels)
    if (any(c % channels[0] for c in channels) or list(config["down_block_types"])
            != ["CrossAttnDownBlock3D"] * (levels - 1) + ["DownBlock3D"]):
        raise LayerkitError("Only UNet3DConditionModel layouts with cross-attention on every level but the last "
                            "and channels multiple of the first convert to ToonCrafterUNet.")
    return {
        "in_channels": config["in_channels"], "out_channels": config["out_channels"],
        "model_channels": channels[0], "channel_mult": [c // channels[0] for c in channels],
        "num_res_blocks": config["layers_per_block"], "attention_resolutions": [2**i for i in range(levels - 1)],
        "context_dim": config["cross_attention_dim"], "num_head_channels": config["attention_head_dim"],
        "use_linear": True, "temporal_conv": True, "temporal_attention": True, "addition_attention": True,
        "image_cross_attention": False, "fps_condition": False, "temporal_length": None, "dropout": 0.0,
    }


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], assign: bool = False) -> None:
    """``model.load_state_dict(state_dict, strict=True)``, raising a LayerkitError naming the first
    missing, unexpected or wrongly shaped key instead of PyTorch's list."""
    expected = model.state_dict()
    for key, value in state_dict.items():
        if key not in expected:
            raise LayerkitError(f"Unexpected key {key!r} for {type(model).__name__}.")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise LayerkitError(f"Key {key!r} has shape {tuple(value.shape)}, {type(model).__name__} expects "
                                f"{tuple(expected[key].shape)}.")
    for key in expected:
        if key not in state_dict:
            raise LayerkitError(f"Missing key {key!r} for {type(model).__name__}.")
    model.load_state_dict(state_dict, strict=True, assign=assign)
