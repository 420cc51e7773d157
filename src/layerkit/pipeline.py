"""The steps training and sampling share: build the parts, encode a packed batch, run
controls, call the denoiser inside the step context. One ``pack``, one ``predict``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from layerkit.config import params
from layerkit.errors import LayerkitError
from layerkit.protocols import Adapter, Backbone, Control, Packed, Task
from layerkit.registry import Registry


@dataclass
class Parts:
    backbone: Backbone
    task: Task
    controls: dict[str, Control] = field(default_factory=dict)
    adapters: dict[str, Adapter] = field(default_factory=dict)


def build_parts(cfg: DictConfig, registry: Registry, *, training: bool) -> Parts:
    """Backbone, task, controls and adapters from a composed config; adapters attached."""
    backbone = registry.build("backbone", cfg.backbone.name, **params(cfg.backbone))
    if not isinstance(backbone, Backbone):
        raise LayerkitError(f"backbone '{cfg.backbone.name}' did not build a layerkit Backbone.")
    task = registry.build("task", cfg.task.name, **params(cfg.task))
    controls: dict[str, Control] = {}
    for key, node in (cfg.get("controls") or {}).items():
        if node is not None:
            control = registry.build("control", node.name, backbone=backbone, **params(node))
            control.name = key
            controls[key] = control
    backbone.set_trainable(list(cfg.get("trainable") or []) if training else [])
    adapters: dict[str, Adapter] = {}
    for key, node in (cfg.get("adapters") or {}).items():
        if node is None:
            continue
        kwargs = params(node)
        if not training and kwargs.pop("inference", True) is False:
            continue  # e.g. LayerFlow's Motion LoRA is removed at inference
        kwargs.pop("inference", None)
        adapter = registry.build("adapter", node.name, **kwargs)
        adapter.name = key
        adapter.attach(backbone)
        adapters[key] = adapter
    return Parts(backbone, task, controls, adapters)


def add_control_inputs(packed: Packed, batch: dict[str, Any], controls: dict[str, Control]) -> Packed:
    """Copy the batch keys each control reads into ``packed.extras``."""
    for name, control in controls.items():
        for key in control.inputs:
            if key not in batch:
                raise LayerkitError(f"control '{name}' needs '{key}' in the batch; the dataset or task does not provide it.")
            packed.extras[key] = batch[key]
    return packed


def trainable_names(root: nn.Module) -> list[str]:
    return [n for n, p in root.named_parameters() if p.requires_grad]


def encode_packed(backbone: Backbone, packed: Packed) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Encode each segment on its own and concatenate along latent frames.

    Returns latents [B, C, f, h, w] (zeros where a segment has no video), the per-frame
    given mask [B, f] and the latent length of each segment.
    """
    b = packed.batch_size
    h, w = backbone.latent_size(packed.height, packed.width)
    chunks, lengths = [], []
    param = next(backbone.parameters())
    device = backbone.execution_device
    for seg in packed.segments:
        f = backbone.latent_frames(seg.num_frames)
        if seg.video is not None:
            if seg.video.shape[1] != seg.num_frames:
                raise LayerkitError(
                    f"segment '{seg.name}' has {seg.video.shape[1]} frames, expected {seg.num_frames}."
                )
            lat = backbone.encode_video(seg.video.to(device))
        else:
            lat = torch.zeros(b, backbone.latent_channels, f, h, w, device=device, dtype=param.dtype)
        chunks.append(lat)
        lengths.append(lat.shape[2])
    latents = torch.cat(chunks, dim=2)
    given = torch.cat(
        [packed.given[:, i : i + 1].expand(b, n) for i, n in enumerate(lengths)], dim=1
    ).to(latents.device)
    return latents, given, lengths


def frame_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B, f] -> broadcastable to latents [B, C, f, h, w]."""
    return mask[:, None, :, None, None].to(like.device)


def expand_rows(tree: Any, copies: int, rows: int) -> Any:
    """Repeat every tensor whose leading dimension is ``rows`` ``copies`` times (for CFG)."""
    if copies == 1:
        return tree
    if isinstance(tree, torch.Tensor):
        return torch.cat([tree] * copies, dim=0) if tree.dim() > 0 and tree.shape[0] == rows else tree
    if isinstance(tree, Mapping):
        return {k: expand_rows(v, copies, rows) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(expand_rows(v, copies, rows) for v in tree)
    return tree


def predict(
    parts: Parts,
    packed: Packed,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    cond: dict[str, Any],
    *,
    copies: int = 1,
) -> torch.Tensor:
    """Run the controls, then the denoiser with adapters reading the step context.

    ``copies`` > 1 when ``noisy`` stacks classifier-free-guidance copies ([uncond; cond]).
    """
    b = packed.batch_size
    control_out = {
        name: control(packed, parts.backbone, noisy[:b], timesteps[:b]) for name, control in parts.controls.items()
    }
    scales = {k: v.to(noisy.device, noisy.dtype) for k, v in packed.scales.items()}
    with parts.backbone.context.use(
        batch_size=noisy.shape[0],
        num_frames=noisy.shape[2],
        scales=expand_rows(scales, copies, b),
        controls=expand_rows(control_out, copies, b),
        extras=expand_rows(packed.extras, copies, b),
    ):
        return parts.backbone.predict(noisy, timesteps, cond)


def _base_layer_key(key: str, own: dict[str, torch.Tensor]) -> str:
    stem, _, leaf = key.rpartition(".")
    wrapped = f"{stem}.base_layer.{leaf}"
    return wrapped if wrapped in own else key


def load_trainable_state(module: nn.Module, path: str | Path, *, allow_pickle: bool = False) -> list[str]:
    """Load trainable weights into ``module``; every key in the file must exist in it."""
    from layerkit.io.weights import load_weights

    state = load_weights(path, allow_pickle=allow_pickle)
    own = module.state_dict()
    # a layer a LoRA wraps keeps its weight under ``base_layer`` (peft): map earlier stages onto it
    state = {(k if k in own else _base_layer_key(k, own)): v for k, v in state.items()}
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise LayerkitError(
            f"weights file '{path}' has {len(unexpected)} keys this model does not have "
            f"(first: {unexpected[0]}), so it was trained with another backbone or adapter set."
        )
    wrong = [k for k, v in state.items() if tuple(own[k].shape) != tuple(v.shape)]
    if wrong:
        k = wrong[0]
        raise LayerkitError(
            f"weights file '{path}' holds {k} with shape {tuple(state[k].shape)}, expected {tuple(own[k].shape)}."
        )
    module.load_state_dict(state, strict=False)
    return list(state)
