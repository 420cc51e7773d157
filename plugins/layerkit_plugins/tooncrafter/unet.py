"""ToonCrafter's video UNet, with the key names of LayerAnimate's ``unet/`` folder.

The network is the video UNet of ToonCrafter (Xing et al. 2024; repo Doubiiu/ToonCrafter,
``lvdm/modules/networks/openaimodel3d.py`` and ``lvdm/modules/attention.py``), which LayerAnimate
(Yang et al. 2025; repo IamCreateAI/LayerAnimate, ``lvdm/models/unet.py``) uses unchanged as its
backbone. Its state dict uses LayerAnimate's ``unet/`` names exactly (ToonCrafter's
``model.diffusion_model.*`` names without the prefix, except ``time_embed.{0,2}`` ->
``time_embed.linear_{1,2}`` and ``fps_embedding.{0,2}`` -> ``fps_embedding.linear_{1,2}``), so the
authors' ``unet/config.json`` and weights load with ``from_pretrained``. LayerAnimate's masked layer
fusion is not part of this class: ``layeranimate.fusion.MaskedLayerFusion`` attaches to it.

Letters used for shapes: B batch, F frames (``temporal_length``, 16 for the released model), C
channels, h x w latent size, L tokens, D context width. Inside the network frames are folded into
the batch: a feature map is ``[(B F), C, h, w]`` with row ``b * F + f``.

Layout (full config: ``model_channels`` 320, ``channel_mult`` [1, 2, 4, 4], two blocks per level)::

    input_blocks.0             Conv2d(in_channels -> 320); then init_attn (temporal attention)
    input_blocks.1, 2          ResBlock | SpatialTransformer | TemporalTransformer     (320)
    input_blocks.3             Downsample
    input_blocks.4, 5 / 7, 8   same at 640 / 1280;  input_blocks.6, 9: Downsample
    input_blocks.10, 11        ResBlock (1280, level without attention)
    middle_block               ResBlock | SpatialTransformer | TemporalTransformer | ResBlock
    output_blocks.0 .. 11      ResBlock(cat[h, skip]) [| Spatial | Temporal] [| Upsample]
    out                        GroupNorm | SiLU | Conv2d(320 -> out_channels)

Every ResBlock carries a temporal convolution block (``temopral_conv``, the authors' spelling), every
SpatialTransformer is followed by a TemporalTransformer. Conditioning (``openaimodel3d.py`` forward):
the sinusoidal timestep embedding through ``time_embed`` plus the same embedding of the fps value
through ``fps_embedding``; text tokens through ``attn2`` of the spatial transformers, and per-frame
image tokens (from the ``Resampler``) through the decoupled image cross-attention of those ``attn2``
(``to_k_ip``/``to_v_ip``, IP-Adapter style: ``out = attn(q, text) + attn(q, image)``).

Attention runs through diffusers' ``Attention`` and its processors (SDPA by default). The image
cross-attention is the processor ``DecoupledImageAttnProcessor``; ``set_attn_processor`` keeps it
working with any other processor (see ``ImageAttentionMixin``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin, FeedForward
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from layerkit.errors import LayerkitError, ShapeError

# ----------------------------------------------------------------------------------------------
# Small layers
# ----------------------------------------------------------------------------------------------


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back (ToonCrafter ``basics.py`` GroupNormSpecific).

    Used where the authors use it: the two norms of every ResBlock and the output norm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def zero_init(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero (the authors' ``zero_module``) and return it."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


def fold_frames(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """``[(B F), C, h, w]`` -> ``[B, C, F, h, w]``."""
    bf, c, h, w = x.shape
    return x.reshape(bf // num_frames, num_frames, c, h, w).permute(0, 2, 1, 3, 4)


def unfold_frames(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, F, h, w]`` -> ``[(B F), C, h, w]``."""
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


class TemporalConvBlock(nn.Module):
    """Four temporal convolutions with an identity residual (``openaimodel3d.py`` TemporalConvBlock,
    from ModelScope T2V; diffusers calls it ``TemporalConvLayer``).

    Each stage is GroupNorm -> SiLU -> (Dropout) -> Conv3d with a (3, 1, 1) kernel, i.e. a 1-D
    convolution over frames at every pixel; the last conv is zero-initialised so the block starts as
    the identity. ``spatial_aware`` (``tempspatial_aware``) uses (3, 3, 1) and (3, 1, 3) kernels.
    Input and output ``[(B F), C, h, w]``; GroupNorm statistics span all frames of a sample.
    """

    def __init__(self, channels: int, dropout: float = 0.1, spatial_aware: bool = False) -> None:
        super().__init__()
        if spatial_aware:
            k_h, p_h, k_w, p_w = (3, 3, 1), (1, 1, 0), (3, 1, 3), (1, 0, 1)
        else:
            k_h, p_h, k_w, p_w = (3, 1, 1), (1, 0, 0), (3, 1, 1), (1, 0, 0)
        self.conv1 = nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(),
                                   nn.Conv3d(channels, channels, k_h, padding=p_h))
        self.conv2 = nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(), nn.Dropout(dropout),
                                   nn.Conv3d(channels, channels, k_w, padding=p_w))
        self.conv3 = nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(), nn.Dropout(dropout),
                                   nn.Conv3d(channels, channels, k_h, padding=p_h))
        self.conv4 = nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(), nn.Dropout(dropout),
                                   zero_init(nn.Conv3d(channels, channels, k_w, padding=p_w)))

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        video = fold_frames(x, num_frames)
        out = self.conv4(self.conv3(self.conv2(self.conv1(video))))
        return unfold_frames(video + out)


class ResBlock(nn.Module):
    """The LDM residual block with a timestep embedding and a temporal conv (``openaimodel3d.py`` ResBlock).

    ``h = in_layers(x) + emb_layers(emb)``; ``h = out_layers(h)``; ``y = skip_connection(x) + h``;
    then ``temopral_conv`` over frames. With ``use_scale_shift_norm`` the embedding gives a scale and
    shift applied after the output norm (FiLM). x ``[(B F), C_in, h, w]``, emb ``[(B F), E]`` ->
    ``[(B F), C_out, h, w]``.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False, temporal_conv: bool = False,
                 tempspatial_aware: bool = False) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(32, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(32, out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)
        if temporal_conv:
            # The authors hard-code dropout 0.1 here whatever the config says.
            self.temopral_conv = TemporalConvBlock(out_channels, dropout=0.1, spatial_aware=tempspatial_aware)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, num_frames: int) -> torch.Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            norm, rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        h = self.skip_connection(x) + h
        if hasattr(self, "temopral_conv"):
            h = self.temopral_conv(h, num_frames)
        return h


class Downsample(nn.Module):
    """Halve h and w: a stride-2 3x3 conv (``op``), or 2x2 average pooling without ``conv_resample``."""

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double h and w: nearest-neighbour interpolation, then a 3x3 conv (``conv``) with ``conv_resample``."""

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[n, L, heads * d]`` -> ``[n, heads, L, d]``."""
    n, length, inner = x.shape
    return x.view(n, length, heads, inner // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[n, heads, L, d]`` -> ``[n, L, heads * d]``."""
    n, heads, length, d = x.shape
    return x.transpose(1, 2).reshape(n, length, heads * d)


class DecoupledImageAttnProcessor:
    """Text cross-attention plus decoupled image cross-attention (``attention.py`` CrossAttention).

    For query rows q of ``attn2`` (``[(B F), h*w, C]``), text tokens ``[(B F), 77, D]`` and the
    image tokens of the same frame ``[(B F), L, D]``::

        out = softmax(q k^T / sqrt(d)) v + s * softmax(q k_ip^T / sqrt(d)) v_ip
        k, v = to_k(text), to_v(text);  k_ip, v_ip = to_k_ip(image), to_v_ip(image)

    then ``to_out``. ``s`` is 1.0, times ``tanh(alpha) + 1`` when ``attn`` has a learnable ``alpha``
    (``image_cross_attention_scale_learnable``). The image tokens arrive as the keyword argument
    ``image_hidden_states``; without them (no image condition) only the text term is computed, which
    is what the authors' code gives for an empty image context.

    ``base=None`` computes both terms with SDPA. With another processor as ``base`` (for example one a
    user sets with ``set_attn_processor``), the text term is ``base``'s output (already through
    ``to_out``) and the image term is added through ``to_out``'s weight without its bias, which is the
    same sum because ``to_out`` is linear (its dropout then acts on the two terms separately).
    """

    def __init__(self, base: Any | None = None, scale: float = 1.0) -> None:
        self.base = base
        self.scale = scale

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_hidden_states: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if self.base is not None:
            out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
            if image_hidden_states is None:
                return out
            image_out = self.image_attention(attn, attn.to_q(hidden_states), image_hidden_states)
            return out + attn.to_out[1](F.linear(image_out, attn.to_out[0].weight))

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.to_q(hidden_states)
        q = _split_heads(query, attn.heads)
        k = _split_heads(attn.to_k(context), attn.heads)
        v = _split_heads(attn.to_v(context), attn.heads)
        out = _merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask))
        if image_hidden_states is not None:
            out = out + self.image_attention(attn, query, image_hidden_states)
        return attn.to_out[1](attn.to_out[0](out.to(query.dtype)))

    def image_attention(self, attn: Attention, query: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """``s * softmax(q k_ip^T / sqrt(d)) v_ip`` before ``to_out``: ``[(B F), h*w, heads * d]``."""
        q = _split_heads(query, attn.heads)
        k = _split_heads(attn.to_k_ip(image), attn.heads)
        v = _split_heads(attn.to_v_ip(image), attn.heads)
        out = _merge_heads(F.scaled_dot_product_attention(q, k, v))
        scale = self.scale
        if hasattr(attn, "alpha"):
            scale = scale * (torch.tanh(attn.alpha) + 1)
        return scale * out


def _is_image_attention(module: nn.Module) -> bool:
    return isinstance(module, Attention) and hasattr(module, "to_k_ip")


def _accepts_image_tokens(processor: Any) -> bool:
    return "image_hidden_states" in inspect.signature(processor.__call__).parameters


class ImageAttentionMixin(AttentionMixin):
    """diffusers' ``attn_processors``/``set_attn_processor`` for models with decoupled image attention.

    After any ``set_attn_processor``, an ``attn2`` holding ``to_k_ip``/``to_v_ip`` whose new processor
    does not take ``image_hidden_states`` gets it wrapped in ``DecoupledImageAttnProcessor(base=...)``
    (plain SDPA ``AttnProcessor2_0`` is replaced by the native SDPA path), so the image condition is
    never dropped silently.
    """

    def set_attn_processor(self, processor: Any) -> None:
        super().set_attn_processor(processor)
        for module in self.modules():
            if _is_image_attention(module) and not _accepts_image_tokens(module.processor):
                base = None if type(module.processor) is AttnProcessor2_0 else module.processor
                module.set_processor(DecoupledImageAttnProcessor(base=base))

    def set_default_attn_processor(self) -> None:
        """SDPA everywhere (the processors the model is built with)."""
        self.set_attn_processor(AttnProcessor2_0())

    def enable_forward_chunking(self, chunk_size: int | None = None, dim: int = 0) -> None:
        """Run every feed-forward in chunks of ``chunk_size`` along ``dim`` (0: rows, 1: tokens); exact."""
        if dim not in (0, 1):
            raise LayerkitError(f"Forward chunking runs along dim 0 or 1, not {dim}.")
        for module in self.modules():
            if isinstance(module, TransformerBlock):
                module.set_chunk_feed_forward(chunk_size or 1, dim)

    def disable_forward_chunking(self) -> None:
        for module in self.modules():
            if isinstance(module, TransformerBlock):
                module.set_chunk_feed_forward(None, 0)


def _attention(dim: int, heads: int, dim_head: int, context_dim: int | None = None,
               dropout: float = 0.0) -> Attention:
    """The authors' CrossAttention shape: q/k/v without bias, ``to_out`` = Linear + Dropout."""
    return Attention(query_dim=dim, cross_attention_dim=context_dim, heads=heads, dim_head=dim_head,
                     dropout=dropout, bias=False, out_bias=True, processor=AttnProcessor2_0())


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention, GEGLU feed-forward, each pre-normed and residual
    (``attention.py`` BasicTransformerBlock; the names of diffusers' ``BasicTransformerBlock``).

    ``attn2`` attends to ``context`` (text, ``[n, 77, D]``) in spatial transformers and is a second
    self-attention in temporal ones (``context_dim=None``, ``temporal_selfatt_only``). With
    ``image_cross_attention`` it also holds ``to_k_ip``/``to_v_ip`` (and ``alpha`` if learnable) and
    runs ``DecoupledImageAttnProcessor``. x ``[n, L, C]`` -> ``[n, L, C]``.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 dropout: float = 0.0, image_cross_attention: bool = False,
                 image_cross_attention_scale_learnable: bool = False) -> None:
        super().__init__()
        inner = heads * dim_head
        self.attn1 = _attention(dim, heads, dim_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, activation_fn="geglu")
        self.attn2 = _attention(dim, heads, dim_head, context_dim=context_dim, dropout=dropout)
        if image_cross_attention:
            self.attn2.to_k_ip = nn.Linear(context_dim, inner, bias=False)
            self.attn2.to_v_ip = nn.Linear(context_dim, inner, bias=False)
            if image_cross_attention_scale_learnable:
                self.attn2.alpha = nn.Parameter(torch.tensor(0.0))
            self.attn2.set_processor(DecoupledImageAttnProcessor())
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self._chunk_size: int | None = None
        self._chunk_dim = 0

    def set_chunk_feed_forward(self, chunk_size: int | None, dim: int = 0) -> None:
        self._chunk_size, self._chunk_dim = chunk_size, dim

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                image_context: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), attention_mask=attention_mask) + x
        image = {} if image_context is None else {"image_hidden_states": image_context}
        mask = attention_mask if context is None else None
        x = self.attn2(self.norm2(x), encoder_hidden_states=context, attention_mask=mask, **image) + x
        y = self.norm3(x)
        if self._chunk_size is None:
            return self.ff(y) + x
        chunks = y.split(self._chunk_size, dim=self._chunk_dim)
        return torch.cat([self.ff(chunk) for chunk in chunks], dim=self._chunk_dim) + x


class SpatialTransformer(nn.Module):
    """Attention within each frame (``attention.py`` SpatialTransformer).

    GroupNorm(32, eps 1e-6) -> ``proj_in`` (Linear with ``use_linear``, else 1x1 conv) -> transformer
    blocks over the h*w tokens of each frame -> zero-initialised ``proj_out`` -> + input.
    x ``[(B F), C, h, w]``, context ``[(B F), 77, D]``, image_context ``[(B F), L, D]`` or None.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int = 1, context_dim: int | None = None,
                 use_linear: bool = True, image_cross_attention: bool = False,
                 image_cross_attention_scale_learnable: bool = False) -> None:
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList([
            TransformerBlock(inner, heads, dim_head, context_dim=context_dim,
                             image_cross_attention=image_cross_attention,
                             image_cross_attention_scale_learnable=image_cross_attention_scale_learnable)
            for _ in range(depth)
        ])
        self.proj_out = zero_init(nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                image_context: torch.Tensor | None = None) -> torch.Tensor:
        n, _, h, w = x.shape
        y = self.norm(x)
        if not self.use_linear:
            y = self.proj_in(y)
        y = y.flatten(2).transpose(1, 2)  # [(B F), h*w, C]
        if self.use_linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context=context, image_context=image_context)
        if self.use_linear:
            y = self.proj_out(y)
        y = y.transpose(1, 2).reshape(n, -1, h, w)
        if not self.use_linear:
            y = self.proj_out(y)
        return y + x


class TemporalTransformer(nn.Module):
    """Attention across frames at every pixel (``attention.py`` TemporalTransformer).

    GroupNorm(32, eps 1e-6) over the whole clip ``[B, C, F, h, w]`` -> tokens ``[(B h w), F, C]`` ->
    ``proj_in`` (Linear with ``use_linear``, else a kernel-1 Conv1d as in ``init_attn``) -> transformer
    blocks whose ``attn1`` and ``attn2`` are both self-attention over the F frames (no positional
    encoding; a lower-triangular mask with ``causal_attention``) -> zero-initialised ``proj_out``
    -> + input. x ``[(B F), C, h, w]`` -> same.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int = 1, use_linear: bool = True,
                 causal_attention: bool = False, temporal_length: int | None = None) -> None:
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.causal_attention = causal_attention
        self.temporal_length = temporal_length
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv1d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(inner, heads, dim_head) for _ in range(depth)])
        self.proj_out = zero_init(nn.Linear(inner, channels) if use_linear else nn.Conv1d(inner, channels, 1))

    def _project(self, proj: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """Apply ``proj`` to ``[n, F, C]`` tokens, whether it is a Linear or a Conv1d."""
        if self.use_linear:
            return proj(tokens)
        return proj(tokens.transpose(1, 2)).transpose(1, 2)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        video = fold_frames(x, num_frames)  # [B, C, F, h, w]
        b, c, f, h, w = video.shape
        tokens = self.norm(video).permute(0, 3, 4, 2, 1).reshape(b * h * w, f, c)
        tokens = self._project(self.proj_in, tokens)
        mask = None
        if self.causal_attention:
            mask = torch.ones(f, f, dtype=torch.bool, device=x.device).tril().expand(tokens.shape[0], f, f)
        for block in self.transformer_blocks:
            tokens = block(tokens, attention_mask=mask)
        tokens = self._project(self.proj_out, tokens)
        out = tokens.reshape(b, h, w, f, c).permute(0, 3, 4, 1, 2).reshape(b * f, c, h, w)
        return out + x


# ----------------------------------------------------------------------------------------------
# Blocks and the encoder shared with LayerAnimate's Layer ControlNet
# ----------------------------------------------------------------------------------------------


class UNetBlock(nn.ModuleList):
    """One entry of ``input_blocks``/``middle_block``/``output_blocks`` (the authors'
    ``TimestepEmbedSequential``): its layers run in order, each given what it needs.

    Called positionally as ``block(h, emb, context, image_context, num_frames)`` with h
    ``[(B F), C, h, w]``, emb ``[(B F), E]``, context ``[(B F), 77, D]``, image_context
    ``[(B F), L, D]`` or None. A forward pre-hook on an output block therefore sees
    ``args[0] = torch.cat([h, skip], dim=1)``.
    """

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                image_context: torch.Tensor | None = None, num_frames: int = 1) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb, num_frames)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context, image_context)
            elif isinstance(layer, TemporalTransformer):
                h = layer(h, num_frames)
            else:
                h = layer(h)
        return h

    def has_spatial_attention(self) -> bool:
        return any(isinstance(layer, SpatialTransformer) for layer in self)


@dataclass
class UNetSpec:
    """The architecture arguments the UNet and the Layer ControlNet share, with their block factories."""

    model_channels: int
    num_res_blocks: int
    attention_resolutions: Sequence[int]
    dropout: float
    channel_mult: Sequence[int]
    conv_resample: bool
    context_dim: int | None
    use_scale_shift_norm: bool
    num_heads: int
    num_head_channels: int
    transformer_depth: int
    use_linear: bool
    temporal_conv: bool
    tempspatial_aware: bool
    temporal_attention: bool
    use_causal_attention: bool
    temporal_length: int | None
    image_cross_attention: bool
    image_cross_attention_scale_learnable: bool

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def heads(self, channels: int) -> tuple[int, int]:
        """(heads, dim_head) at ``channels``: fixed head width if ``num_head_channels`` is set."""
        if self.num_head_channels == -1:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels

    def res_block(self, channels: int, out_channels: int | None = None) -> ResBlock:
        return ResBlock(channels, self.time_embed_dim, self.dropout, out_channels=out_channels,
                        use_scale_shift_norm=self.use_scale_shift_norm, temporal_conv=self.temporal_conv,
                        tempspatial_aware=self.tempspatial_aware)

    def attention_layers(self, channels: int) -> list[nn.Module]:
        """A SpatialTransformer, followed by a TemporalTransformer with ``temporal_attention``."""
        heads, dim_head = self.heads(channels)
        layers: list[nn.Module] = [SpatialTransformer(
            channels, heads, dim_head, depth=self.transformer_depth, context_dim=self.context_dim,
            use_linear=self.use_linear, image_cross_attention=self.image_cross_attention,
            image_cross_attention_scale_learnable=self.image_cross_attention_scale_learnable)]
        if self.temporal_attention:
            layers.append(TemporalTransformer(
                channels, heads, dim_head, depth=self.transformer_depth, use_linear=self.use_linear,
                causal_attention=self.use_causal_attention, temporal_length=self.temporal_length))
        return layers

    def init_attention(self) -> UNetBlock:
        """``init_attn``: temporal attention right after the input conv, 8 heads of
        ``num_head_channels``, Conv1d projections (the authors never pass ``use_linear`` here)."""
        return UNetBlock([TemporalTransformer(self.model_channels, 8, self.num_head_channels,
                                              depth=self.transformer_depth, use_linear=False)])

    def input_blocks(self, in_channels: int) -> tuple[nn.ModuleList, list[int]]:
        """The encoder: ``input_blocks`` and the channel count of each block's output (its skip)."""
        blocks = nn.ModuleList([UNetBlock([nn.Conv2d(in_channels, self.model_channels, 3, padding=1)])])
        skip_channels = [self.model_channels]
        ch, ds = self.model_channels, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                layers = [self.res_block(ch, mult * self.model_channels)]
                ch = mult * self.model_channels
                if ds in self.attention_resolutions:
                    layers += self.attention_layers(ch)
                blocks.append(UNetBlock(layers))
                skip_channels.append(ch)
            if level != len(self.channel_mult) - 1:
                blocks.append(UNetBlock([Downsample(ch, self.conv_resample)]))
                skip_channels.append(ch)
                ds *= 2
        return blocks, skip_channels


def check_architecture(config: dict[str, Any]) -> None:
    """Refuse the authors' options this implementation does not build, in one sentence each."""
    if config.get("use_relative_position"):
        raise LayerkitError("use_relative_position=True is not supported: ToonCrafter and LayerAnimate use "
                            "no relative position in temporal attention (set it to false).")
    if config.get("dims", 2) != 2:
        raise LayerkitError(f"dims={config['dims']} is not supported: the video UNet uses 2-D convolutions.")
    if config.get("resblock_updown"):
        raise LayerkitError("resblock_updown=True is not supported: ToonCrafter resamples with plain "
                            "Downsample/Upsample layers.")
    if not config.get("temporal_selfatt_only", True):
        raise LayerkitError("temporal_selfatt_only=False is not supported: the authors' UNet always uses "
                            "temporal self-attention only.")
    if config.get("num_heads", -1) == -1 and config.get("num_head_channels", -1) == -1:
        raise LayerkitError("Either num_heads or num_head_channels must be set.")
    if config.get("addition_attention") and config.get("num_head_channels", -1) == -1:
        raise LayerkitError("addition_attention needs num_head_channels (init_attn uses 8 heads of that width).")


def spec_from_config(config: dict[str, Any]) -> UNetSpec:
    check_architecture(config)
    names = UNetSpec.__dataclass_fields__
    return UNetSpec(**{name: config[name] for name in names})


def as_batch(value: torch.Tensor | float | int, batch: int, device: torch.device) -> torch.Tensor:
    """A scalar or ``[B]`` (or ``[1]``) timestep/fps as a ``[B]`` tensor."""
    value = torch.as_tensor(value, device=device)
    if value.ndim == 0:
        value = value[None]
    if value.ndim != 1 or value.shape[0] not in (1, batch):
        raise ShapeError(f"timestep/fps has shape {tuple(value.shape)}, expected a scalar or [{batch}].")
    return value.expand(batch)


def embed_time(model: nn.Module, timestep: torch.Tensor | float | int, fps: torch.Tensor | float | int | None,
               batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``time_embed(sinusoid(t)) (+ fps_embedding(sinusoid(fps)))``: ``[B, 4 * model_channels]``.

    The sinusoid is ``[cos, sin]`` with frequencies ``exp(-ln(10000) i / (C/2))`` (ToonCrafter
    ``timestep_embedding`` = diffusers ``Timesteps(C, flip_sin_to_cos=True, downscale_freq_shift=0)``).
    ``fps=None`` uses ``config.default_fps``.
    """
    emb = model.time_embed(model.time_proj(as_batch(timestep, batch, device)).to(dtype))
    if model.config.fps_condition:
        fps = model.config.default_fps if fps is None else fps
        emb = emb + model.fps_embedding(model.time_proj(as_batch(fps, batch, device)).to(dtype))
    return emb


def frame_image_tokens(context_img: torch.Tensor, num_frames: int, temporal_length: int | None) -> torch.Tensor:
    """``[B, F*L, D]`` -> ``[(B F), L, D]``: row ``b*F + f`` gets tokens ``[f*L, (f+1)*L)`` of sample b."""
    b, tokens, d = context_img.shape
    if temporal_length is not None and num_frames != temporal_length:
        raise LayerkitError(f"The image condition needs exactly {temporal_length} frames (the model's "
                            f"temporal_length), got {num_frames}.")
    if tokens % num_frames:
        raise ShapeError(f"context_img has {tokens} tokens, not a multiple of the {num_frames} frames.")
    return context_img.reshape(b * num_frames, tokens // num_frames, d)


class GradientCheckpointingMixin:
    """``block(*args)``, through the checkpointing function diffusers installs when enabled."""

    gradient_checkpointing = False

    def run_block(self, block: nn.Module, *args: Any) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


@dataclass
class ToonCrafterUNetOutput(BaseOutput):
    """sample: ``[B, C_out, F, h, w]``."""

    sample: torch.Tensor


class ToonCrafterUNet(ImageAttentionMixin, GradientCheckpointingMixin, ModelMixin, ConfigMixin):
    """ToonCrafter's video UNet (LayerAnimate backbone) with LayerAnimate's ``unet/`` key names.

    Constructor arguments are the authors' config names (LayerAnimate ``unet/config.json``; ToonCrafter
    ``configs/inference_512_v1.0.yaml`` with ``fs_*`` renamed ``fps_*``); the defaults are that released
    model (1516 keys, 1,438,854,980 parameters). Accepted and ignored: ``masked_layer_fusion`` (the
    fusion is ``layeranimate.fusion.MaskedLayerFusion``; its 54 ``masked_layer_fusion_*`` keys in a
    LayerAnimate ``unet/`` file are skipped by ``from_pretrained``), ``use_checkpoint`` (use
    ``enable_gradient_checkpointing``), ``use_fp16`` (the dtype follows the weights). Refused with a
    LayerkitError: ``use_relative_position``, ``resblock_updown``, ``dims != 2``,
    ``temporal_selfatt_only=False``.

    Adapters on the decoder: the skip connection is joined as ``torch.cat([h, skip], dim=1)`` and
    ``output_blocks[k]`` is called on it right away, positionally as
    ``output_blocks[k](cat, emb, context, image_context, num_frames)``; a forward pre-hook on
    ``output_blocks[k]`` receives that concatenation as ``args[0]`` (the first ``C_h`` channels are
    h, the rest the skip) and may return replaced args. LayerAnimate's masked layer fusion is
    attached this way (``MaskedLayerFusion.attach``).
    """

    _supports_gradient_checkpointing = True
    _keys_to_ignore_on_load_unexpected = [r"^masked_layer_fusion_"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 8,
        model_channels: int = 320,
        out_channels: int = 4,
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (4, 2, 1),
        dropout: float = 0.1,
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        conv_resample: bool = True,
        dims: int = 2,
        context_dim: int | None = 1024,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        num_heads: int = -1,
        num_head_channels: int = 64,
        transformer_depth: int = 1,
        use_linear: bool = True,
        use_checkpoint: bool = False,
        temporal_conv: bool = True,
        tempspatial_aware: bool = False,
        temporal_attention: bool = True,
        use_relative_position: bool = False,
        use_causal_attention: bool = False,
        temporal_length: int | None = 16,
        addition_attention: bool = True,
        temporal_selfatt_only: bool = True,
        image_cross_attention: bool = True,
        image_cross_attention_scale_learnable: bool = False,
        masked_layer_fusion: bool = False,
        default_fps: int = 24,
        fps_condition: bool = True,
        use_fp16: bool = False,
    ) -> None:
        super().__init__()
        spec = spec_from_config(dict(self.config))

        self.time_proj = Timesteps(model_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(model_channels, spec.time_embed_dim)
        if fps_condition:
            self.fps_embedding = TimestepEmbedding(model_channels, spec.time_embed_dim)
            zero_init(self.fps_embedding.linear_2)

        self.input_blocks, skip_channels = spec.input_blocks(in_channels)
        if addition_attention:
            self.init_attn = spec.init_attention()

        ch = skip_channels[-1]
        middle: list[nn.Module] = [spec.res_block(ch), *spec.attention_layers(ch), spec.res_block(ch)]
        self.middle_block = UNetBlock(middle)

        self.output_blocks = nn.ModuleList()
        ds = 2 ** (len(channel_mult) - 1)
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [spec.res_block(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers += spec.attention_layers(ch)
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(UNetBlock(layers))

        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(),
                                 zero_init(nn.Conv2d(model_channels, out_channels, 3, padding=1)))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, context_text: torch.Tensor,
                context_img: torch.Tensor | None = None, fps: torch.Tensor | float | int | None = None,
                return_dict: bool = True) -> ToonCrafterUNetOutput | tuple[torch.Tensor]:
        """Predict for a clip (``openaimodel3d.py`` UNetModel.forward).

        sample ``[B, C_in, F, h, w]`` (noisy latent and concatenated image latent, channels first),
        timestep ``[B]`` or a scalar, context_text ``[B, 77, D]``, context_img ``[B, F*L, D]`` (L image
        tokens per frame from the Resampler; F must equal ``temporal_length``) or None, fps ``[B]``, a
        scalar or None (``default_fps``). Returns ``[B, C_out, F, h, w]``.
        """
        if sample.ndim != 5 or sample.shape[1] != self.config.in_channels:
            raise ShapeError(f"sample has shape {tuple(sample.shape)}, expected [B, "
                             f"{self.config.in_channels}, F, h, w].")
        b, _, num_frames, _, _ = sample.shape
        dtype = self.dtype

        emb = embed_time(self, timestep, fps, b, sample.device, dtype).repeat_interleave(num_frames, dim=0)
        context = context_text.to(dtype).repeat_interleave(num_frames, dim=0)
        image_context = None
        if context_img is not None and self.config.image_cross_attention:
            image_context = frame_image_tokens(context_img.to(dtype), num_frames, self.config.temporal_length)
        args = (emb, context, image_context, num_frames)

        h = unfold_frames(sample.to(dtype))
        skips = []
        for index, block in enumerate(self.input_blocks):
            h = self.run_block(block, h, *args)
            if index == 0 and self.config.addition_attention:
                h = self.run_block(self.init_attn, h, *args)
            skips.append(h)
        h = self.run_block(self.middle_block, h, *args)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = self.run_block(block, h, *args)
        out = fold_frames(self.out(h), num_frames).to(sample.dtype)
        if not return_dict:
            return (out,)
        return ToonCrafterUNetOutput(sample=out)
