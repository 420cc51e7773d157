"""``layeranimate.fusion``: LayerAnimate's masked layer fusion (sec. 4.3) attached to the tooncrafter
backbone's UNet decoder.

It reads ``layer_features`` (what ``layeranimate.layer_controlnet`` provides) from the step context
and, through forward pre-hooks on the fused decoder blocks (output blocks 3, 4, 6, 7, 9, 10 at the
released size), adds to each skip connection the zero-initialised fusion of the N layer features at
every pixel (:class:`~.fusion.MaskedLayerFusion`). Untrained, it adds exactly 0: LayerAnimate then
is ToonCrafter. ``pretrained`` loads the authors' 54 ``masked_layer_fusion_*`` weights, which they
ship inside ``unet/`` (a LayerAnimate ``unet/`` folder or weights file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerkit.errors import LayerkitError
from layerkit.protocols import Adapter, Backbone


def read_authors_fusion(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``masked_layer_fusion_*`` tensors of a LayerAnimate ``unet/`` folder or weights file."""
    from layerkit.io.weights import load_weights

    path = Path(path)
    if path.is_dir():
        files = [path / n for n in ("diffusion_pytorch_model.safetensors", "model.safetensors") if (path / n).is_file()]
        if not files:
            raise LayerkitError(f"LayerAnimate unet folder '{path}' holds no diffusion_pytorch_model.safetensors.")
        path = files[0]
    from layerkit_plugins.layeranimate.fusion import split_fusion_keys

    _, fusion = split_fusion_keys(load_weights(path))
    if not fusion:
        raise LayerkitError(f"'{path}' holds no masked_layer_fusion_* weights (LayerAnimate's unet/ has 54).")
    return fusion


class LayerFusion(Adapter):
    reads = ("layer_features",)

    def __init__(self, pretrained: str | None = None, trainable: bool = True, scale: float = 1.0) -> None:
        super().__init__()
        self.pretrained, self.trainable, self.scale = pretrained, bool(trainable), float(scale)
        self.fusion: nn.Module | None = None
        self._handles: list[Any] = []

    def attach(self, backbone: Backbone) -> None:
        from layerkit_plugins.layeranimate.fusion import MaskedLayerFusion

        unet = backbone.denoiser
        if not hasattr(unet, "output_blocks"):
            raise LayerkitError(f"adapter '{self.name}' needs the tooncrafter backbone's UNet; "
                                f"{type(unet).__name__} has no output_blocks.")
        if self.fusion is None:
            self.fusion = MaskedLayerFusion.from_unet_config(unet.config)
            if self.pretrained:
                state = self.fusion.from_authors_keys(read_authors_fusion(self.pretrained))
                missing, unexpected = self.fusion.load_state_dict(state, strict=False)
                if missing or unexpected:
                    raise LayerkitError(f"the fusion weights of '{self.pretrained}' do not fit this UNet: missing "
                                        f"{list(missing)[:3]}, unexpected {list(unexpected)[:3]}.")
            param = next(unet.parameters())
            self.fusion.to(param.device, param.dtype)
        self.fusion.requires_grad_(self.trainable)
        context = backbone.context
        for index in self.fusion.block_indices:
            self._handles.append(unet.output_blocks[index].register_forward_pre_hook(self._hook(index, context)))
        self.attached = True

    def _hook(self, index: int, context: Any):
        position = self.fusion.block_indices.index(index)

        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if not context.active or "layer_features" not in context.controls or self.scale == 0:
                return None
            published = context.controls["layer_features"]
            features = published["features"]
            feature = features[len(features) - 1 - position]  # decoder block pairs with its skip's encoder block
            joined, *rest = args
            c_h = self.fusion.hidden_channels[index]
            h, skip = joined[:, :c_h], joined[:, c_h:]
            fused = self.fusion.fuse(index, h, skip, feature.to(h.dtype), published["validity"].to(h.device))
            if self.scale != 1:
                fused = skip + self.scale * (fused - skip)
            return (torch.cat([h, fused], dim=1), *rest)

        return hook

    def detach(self, backbone: Backbone) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.attached = False
