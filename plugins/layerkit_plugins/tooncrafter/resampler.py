"""The image projector of ToonCrafter and LayerAnimate: a Perceiver resampler with per-frame queries.

ToonCrafter ``lvdm/modules/encoders/resampler.py`` (= LayerAnimate ``lvdm/models/condition.py``
Resampler, folder ``image_projector/``), itself IP-Adapter Plus' resampler with one set of
``num_queries`` learned queries per frame. Input: the 257 tokens of the OpenCLIP ViT-H/14 vision
transformer for the first frame, ``[B, 257, embedding_dim]`` (before ``ln_post``/``proj``). Output:
``[B, video_length * num_queries, output_dim]``; frame f's image tokens for the UNet are rows
``[f * num_queries, (f + 1) * num_queries)``.

Each of the ``depth`` layers: the queries (``latents``) attend to ``cat(image tokens, latents)``
(``PerceiverAttention``: both LayerNormed, q from the latents, k/v from the concatenation), then a
feed-forward (LayerNorm, Linear x ff_mult, GELU, Linear), both residual; then ``proj_out`` and
``norm_out``. Key names are the authors' (51 keys at the released size: dim 1024, depth 4,
dim_head 64, heads 12, num_queries 16, embedding_dim 1280, output_dim 1024, ff_mult 4,
video_length 16 -> 48,787,456 parameters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from layerkit.errors import ShapeError


class PerceiverAttention(nn.Module):
    """Latents ``[B, Q, dim]`` attend to ``cat(x, latents)`` with x ``[B, N, dim]`` -> ``[B, Q, dim]``.

    The authors scale q and k by ``dim_head ** -0.25`` each and take the softmax in float32; SDPA's
    ``dim_head ** -0.5`` scale is the same product.
    """

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8) -> None:
        super().__init__()
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, q_len, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, q_len, -1))


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """LayerNorm -> Linear(dim, mult*dim, no bias) -> GELU -> Linear(mult*dim, dim, no bias)."""
    inner = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


class Resampler(ModelMixin, ConfigMixin):
    """Image tokens ``[B, N, embedding_dim]`` -> ``[B, video_length * num_queries, output_dim]``.

    ``video_length=None`` gives a single set of ``num_queries`` queries (image models). Defaults are
    the released ToonCrafter/LayerAnimate projector.
    """

    @register_to_config
    def __init__(self, dim: int = 1024, depth: int = 4, dim_head: int = 64, heads: int = 12,
                 num_queries: int = 16, embedding_dim: int = 1280, output_dim: int = 1024, ff_mult: int = 4,
                 video_length: int | None = 16) -> None:
        super().__init__()
        total_queries = num_queries * (video_length or 1)
        self.latents = nn.Parameter(torch.randn(1, total_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList([
            nn.ModuleList([PerceiverAttention(dim, dim_head=dim_head, heads=heads), feed_forward(dim, ff_mult)])
            for _ in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.config.embedding_dim:
            raise ShapeError(f"Resampler input has shape {tuple(x.shape)}, expected [B, N, "
                             f"{self.config.embedding_dim}].")
        x = self.proj_in(x.to(self.dtype))
        latents = self.latents.expand(x.shape[0], -1, -1)
        for attention, ff in self.layers:
            latents = attention(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))
