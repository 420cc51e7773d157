"""LayerAnimate's masked layer fusion, as a module beside the ToonCrafter UNet.

Paper: LayerAnimate (Yang et al. 2025) section 4.3 ("Masked Layer Fusion Attention"); code:
IamCreateAI/LayerAnimate ``lvdm/models/unet.py`` L494-533 (construction) and L609-627 (forward),
where the fusion lives inside the UNet as ``masked_layer_fusion_{norm,attn,out}_list.{i}``.

It sits in the first two decoder blocks of every level with attention (output blocks 3, 4, 6, 7,
9, 10 at the released size). For decoder block k, with h ``[(B F), C_h, h, w]`` the decoder state
before the skip is joined, skip ``[(B F), C, h, w]`` and the Layer ControlNet's feature for that
skip ``[B, N, F, C, h, w]``::

    q    = LayerNorm(C_h)(h)                  one token per pixel and frame: [(B F h w), 1, C_h]
    k, v = the N layer features at that pixel  [(B F h w), N, C]   (not normalised)
    a    = Attention(q, k, v), C / num_head_channels heads, padded layers masked out (validity)
    skip = skip + Conv3x3(C_h -> C, zero-initialised)(a as [(B F), C_h, h, w])

then the block runs on ``cat([h, skip])``. With the zero-initialised convs the fusion adds exactly 0,
so an untrained LayerAnimate is ToonCrafter. Padded layers get no weight; if a sample has no valid
layer at all, the authors' ``masked_fill(-max)`` makes the softmax uniform over all N layers (the
mean of the values), and this module reproduces that rather than returning NaN or zero.

Layer features pair with decoder blocks from the end of the ControlNet's list (the authors'
``controls.pop()``): block 3 gets the feature of input block 8, 4 <- 7, 6 <- 5, 7 <- 4, 9 <- 2,
10 <- 1, i.e. the encoder block whose skip that decoder block consumes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from layerkit.errors import LayerkitError, ShapeError
from layerkit_plugins.tooncrafter.unet import zero_init

AUTHORS_PREFIX = "masked_layer_fusion_"
_AUTHORS_KEY = re.compile(r"^masked_layer_fusion_(norm|attn|out)_list\.(\d+)\.(.+)$")
_OWN_KEY = re.compile(r"^blocks\.(\d+)\.(norm|attn|out)\.(.+)$")


def fusion_layout(model_channels: int, channel_mult: Sequence[int], num_res_blocks: int,
                  attention_resolutions: Sequence[int], num_head_channels: int = -1,
                  num_heads: int = -1) -> list[tuple[int, int, int, int, int]]:
    """The fused decoder blocks of a UNet config, in decoder order.

    One tuple per block: ``(block_index, C_h, C, heads, dim_head)``: C_h the decoder state's channels
    (query), C the skip/layer feature channels (keys, values, conv output).
    """
    layout = []
    ch = model_channels * channel_mult[-1]
    ds = 2 ** (len(channel_mult) - 1)
    index = 0
    for level, mult in reversed(list(enumerate(channel_mult))):
        for i in range(num_res_blocks + 1):
            hidden, ch = ch, model_channels * mult
            if ds in attention_resolutions and i < num_res_blocks:
                if num_head_channels == -1:
                    heads, dim_head = num_heads, ch // num_heads
                else:
                    heads, dim_head = ch // num_head_channels, num_head_channels
                layout.append((index, hidden, ch, heads, dim_head))
            if level and i == num_res_blocks:
                ds //= 2
            index += 1
    return layout


class FusionBlock(nn.Module):
    """The (norm, attn, out) triple of one decoder block; keys ``norm.*``, ``attn.*``, ``out.*``."""

    def __init__(self, hidden_channels: int, channels: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_channels)
        self.attn = Attention(query_dim=hidden_channels, cross_attention_dim=channels, heads=heads,
                              dim_head=dim_head, bias=False, out_bias=True, processor=AttnProcessor2_0())
        self.out = zero_init(nn.Conv2d(hidden_channels, channels, 3, padding=1))


class MaskedLayerFusion(nn.Module):
    """The masked layer fusion of every fused decoder block (``blocks[str(k)]`` for output block k).

    Build it with ``MaskedLayerFusion.from_unet_config(unet.config)``. ``fuse`` is the computation
    of one block; ``attach`` hooks all of them onto a ``ToonCrafterUNet`` for one forward.
    ``from_authors_keys``/``to_authors_keys`` convert between this module's state dict and the
    authors' 54 ``masked_layer_fusion_*`` keys of LayerAnimate's ``unet/`` file.
    """

    def __init__(self, model_channels: int = 320, channel_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, attention_resolutions: Sequence[int] = (4, 2, 1),
                 num_head_channels: int = 64, num_heads: int = -1) -> None:
        super().__init__()
        layout = fusion_layout(model_channels, channel_mult, num_res_blocks, attention_resolutions,
                               num_head_channels, num_heads)
        self.block_indices = [index for index, *_ in layout]
        self.hidden_channels = {index: hidden for index, hidden, *_ in layout}
        self.blocks = nn.ModuleDict({str(index): FusionBlock(hidden, ch, heads, dim_head)
                                     for index, hidden, ch, heads, dim_head in layout})

    @classmethod
    def from_unet_config(cls, config: Mapping[str, Any]) -> MaskedLayerFusion:
        names = ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions",
                 "num_head_channels", "num_heads")
        return cls(**{name: config[name] for name in names if name in config})

    def fuse(self, block_index: int, h: torch.Tensor, skip: torch.Tensor, layer_features: torch.Tensor,
             validity: torch.Tensor) -> torch.Tensor:
        """The new skip of output block ``block_index``: ``skip + out(attn(norm(h), layer features))``.

        h ``[(B F), C_h, h, w]``, skip ``[(B F), C, h, w]``, layer_features ``[B, N, F, C, h, w]``,
        validity ``[B, N]`` (bool, or float with 1 = valid layer and 0 = padding).
        """
        if str(block_index) not in self.blocks:
            raise LayerkitError(f"Output block {block_index} has no masked layer fusion (fused blocks: "
                                f"{self.block_indices}).")
        block = self.blocks[str(block_index)]
        b, n, f, c, height, width = layer_features.shape
        if h.shape[0] != b * f or h.shape[2:] != (height, width) or skip.shape[1] != c:
            raise ShapeError(f"Layer features of shape {tuple(layer_features.shape)} do not match the decoder "
                             f"state {tuple(h.shape)} and skip {tuple(skip.shape)} of output block {block_index}.")
        if validity.shape != (b, n):
            raise ShapeError(f"validity has shape {tuple(validity.shape)}, expected [{b}, {n}].")

        tokens = b * f * height * width
        query = block.norm(h.permute(0, 2, 3, 1)).reshape(tokens, 1, -1)             # [(B F h w), 1, C_h]
        keys = layer_features.permute(0, 2, 4, 5, 1, 3).reshape(tokens, n, c)       # [(B F h w), N, C]
        keys = keys.to(query.dtype)

        valid = validity > 0.5 if validity.dtype != torch.bool else validity        # [B, N]
        none_valid = ~valid.any(dim=1)                                               # [B]
        # A sample without any valid layer attends to all of them (no fully masked row for SDPA);
        # its output is then replaced by the authors' uniform average below.
        allowed = valid | none_valid[:, None]
        mask = allowed[:, None, :].expand(b, f * height * width, n).reshape(tokens, 1, n)
        fused = block.attn(query, encoder_hidden_states=keys, attention_mask=mask)   # [(B F h w), 1, C_h]
        if bool(none_valid.any()):
            uniform = block.attn.to_out[0](block.attn.to_v(keys).mean(dim=1, keepdim=True))
            row_none_valid = none_valid[:, None].expand(b, f * height * width).reshape(tokens, 1, 1)
            fused = torch.where(row_none_valid, uniform, fused)

        fused = fused.reshape(b * f, height, width, -1).permute(0, 3, 1, 2)         # [(B F), C_h, h, w]
        return skip + block.out(fused)

    @contextmanager
    def attach(self, unet: nn.Module, layer_features: Sequence[torch.Tensor],
               validity: torch.Tensor) -> Iterator[None]:
        """Within the ``with`` block, ``unet`` runs with the fusion (forward pre-hooks on its output blocks).

        ``layer_features`` is the Layer ControlNet's list in encoder order; it pairs with the fused
        decoder blocks from the end. The hook splits the block's input ``cat([h, skip])`` after
        ``C_h`` channels, fuses, and passes ``cat([h, new skip])`` on.
        """
        if len(layer_features) != len(self.block_indices):
            raise LayerkitError(f"Got {len(layer_features)} layer features for {len(self.block_indices)} fused "
                                "decoder blocks.")
        pairs = dict(zip(self.block_indices, reversed(list(layer_features))))

        def hook_for(index: int):
            def hook(module: nn.Module, args: tuple) -> tuple:
                joined, *rest = args
                c_h = self.hidden_channels[index]
                h, skip = joined[:, :c_h], joined[:, c_h:]
                return (torch.cat([h, self.fuse(index, h, skip, pairs[index], validity)], dim=1), *rest)
            return hook

        handles = [unet.output_blocks[index].register_forward_pre_hook(hook_for(index))
                   for index in self.block_indices]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def from_authors_keys(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The authors' ``masked_layer_fusion_{norm,attn,out}_list.{i}.*`` -> ``blocks.{k}.{norm,attn,out}.*``.

        Keys without the ``masked_layer_fusion_`` prefix are ignored (pass a whole LayerAnimate
        ``unet/`` state dict); a fusion key that does not map raises a LayerkitError naming it.
        """
        out = {}
        for key, value in state_dict.items():
            if not key.startswith(AUTHORS_PREFIX):
                continue
            match = _AUTHORS_KEY.match(key)
            if match is None or int(match.group(2)) >= len(self.block_indices):
                raise LayerkitError(f"Cannot map the fusion key {key!r} onto this MaskedLayerFusion.")
            part, i, rest = match.group(1), int(match.group(2)), match.group(3)
            out[f"blocks.{self.block_indices[i]}.{part}.{rest}"] = value
        return out

    def to_authors_keys(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This module's state dict -> the authors' ``masked_layer_fusion_*`` keys."""
        out = {}
        for key, value in state_dict.items():
            match = _OWN_KEY.match(key)
            if match is None or int(match.group(1)) not in self.block_indices:
                raise LayerkitError(f"Cannot map the key {key!r} onto the authors' masked layer fusion keys.")
            index, part, rest = int(match.group(1)), match.group(2), match.group(3)
            out[f"{AUTHORS_PREFIX}{part}_list.{self.block_indices.index(index)}.{rest}"] = value
        return out


def split_fusion_keys(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A LayerAnimate ``unet/`` state dict -> (backbone keys for ``ToonCrafterUNet``, the authors' fusion keys)."""
    backbone = {k: v for k, v in state_dict.items() if not k.startswith(AUTHORS_PREFIX)}
    fusion = {k: v for k, v in state_dict.items() if k.startswith(AUTHORS_PREFIX)}
    return backbone, fusion
