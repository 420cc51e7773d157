"""Tiny mock plugins that prove the protocols carry the three method families.

- ``mock.layer_controlnet`` + ``mock.layer_fusion``: a ControlNet-like control giving
  per-layer features [B, N, f, D, h, w] (each layer its own sample, LayerAnimate sec. 4.3;
  like a ControlNet it reads the timestep and the text conditioning of each guidance row),
  fused into the denoiser by cross-attention over layers with a validity mask; the control
  ``provides`` "layer_features", the adapter ``reads`` it.
- ``mock.inter_frame``: an attention processor that reads the keys and values of the
  middle frame (Layer-Animate RGBA's Inter-Frame Attention), zero-initialised output.
- a per-sample-scale peft LoRA is the real ``lora`` adapter, not a mock.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layerkit import hookimpl
from layerkit.layers import pad_layers
from layerkit.protocols import Adapter, Backbone, Control, Step


class LayerControlNet(Control):
    """Layer masks -> per-layer features at the denoiser's token grid, one sample per layer,
    modulated (as a ControlNet's blocks are) by the timestep and by cross-attention to the text
    conditioning of its own guidance row."""

    inputs = ("layer_masks_padded", "layer_validity")
    provides = ("layer_features",)

    def __init__(self, backbone: Backbone, capacity: int = 4, channels: int = 8) -> None:
        super().__init__()
        patch = backbone.denoiser.config.patch_size
        self.grid = lambda h, w: (backbone.latent_size(h, w)[0] // patch, backbone.latent_size(h, w)[1] // patch)
        self.capacity = capacity
        self.encoder = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.SiLU(),
                                     nn.Conv2d(channels, channels, 3, stride=2, padding=1))
        text_dim = backbone.denoiser.config.text_embed_dim
        self.time = nn.Linear(1, channels)
        self.text_k = nn.Linear(text_dim, channels)
        self.text_v = nn.Linear(text_dim, channels)

    def prepare(self, sample: dict[str, Any]) -> dict[str, Any]:
        masks, validity = pad_layers(sample["layer_masks"], self.capacity, name="layer_masks")
        return {**sample, "layer_masks_padded": masks, "layer_validity": validity}

    def forward(self, step: Step, backbone: Backbone) -> dict[str, Any]:
        masks = step.extras["layer_masks_padded"]  # [R, N, F, 1, H, W]
        r, n, f, _, height, width = masks.shape
        feats = self.encoder(masks.flatten(0, 2).float() * 2 - 1)  # each layer (and frame) its own sample
        feats = F.adaptive_avg_pool2d(feats, self.grid(height, width)).unflatten(0, (r, n, f))  # [R, N, F, D, h, w]
        text = step.cond["prompt_embeds"].to(feats.dtype)  # [R, L, E]: each row its own (guidance) text
        query = feats.mean(dim=(2, 4, 5))  # [R, N, D]: each layer its own sample
        weights = torch.einsum("rnd,rld->rnl", query, self.text_k(text)).softmax(-1)
        context = torch.einsum("rnl,rld->rnd", weights, self.text_v(text))  # [R, N, D]
        temb = self.time((step.timesteps.float() / 1000).unsqueeze(-1))  # [R, D]
        feats = feats + (context + temb[:, None])[:, :, None, :, None, None]
        return {"layer_features": {"features": feats, "validity": step.extras["layer_validity"]}}


class LayerFusion(Adapter):
    """Cross-attention from each video token to the N layer features at its pixel, with padded
    layers masked out; a zero-initialised projection adds the result to the block output."""

    reads = ("layer_features",)

    def __init__(self, channels: int = 8, block: int = 0) -> None:
        super().__init__()
        self.channels, self.block = channels, block
        self.handle = None

    def attach(self, backbone: Backbone) -> None:
        denoiser = backbone.denoiser
        hidden = denoiser.config.num_attention_heads * denoiser.config.attention_head_dim
        self.norm = nn.LayerNorm(hidden)
        self.q = nn.Linear(hidden, self.channels)
        self.out = nn.Linear(self.channels, hidden)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        context = backbone.context
        block = denoiser.transformer_blocks[self.block]

        def hook(module: nn.Module, args: tuple, output: tuple) -> tuple:
            if not context.active:
                return output
            hidden_states, encoder_states = output
            ctl = context.controls["layer_features"]
            feats, validity = ctl["features"], ctl["validity"]  # [B, N, F, D, h, w], [B, N]
            b, n, f, d, h, w = feats.shape
            keys = feats.permute(0, 2, 4, 5, 1, 3).reshape(b, f * h * w, n, d)  # per token: N layer features
            keys = keys.repeat(1, hidden_states.shape[1] // (f * h * w), 1, 1)  # the same layers for every sub-clip
            query = self.q(self.norm(hidden_states))  # [B, f*h*w, D]
            logits = torch.einsum("btd,btnd->btn", query, keys) / d**0.5
            logits = logits.masked_fill(~validity[:, None, :].bool(), float("-inf"))
            fused = torch.einsum("btn,btnd->btd", logits.softmax(-1), keys)
            return hidden_states + self.scale * self.out(fused), encoder_states

        self.handle = block.register_forward_hook(hook)
        self.attached = True

    def detach(self, backbone: Backbone) -> None:
        if self.handle is not None:
            self.handle.remove()
        self.attached = False


class InterFrameProcessor:
    """Wraps an attention processor; adds softmax(Q' K_m^T / sqrt(d)) V_m W_O' where K_m, V_m
    come from the middle frame through the frozen to_k / to_v."""

    def __init__(self, inner: Any, adapter: InterFrameAttention, context: Any, text_len: int) -> None:
        self.inner, self.adapter, self.context, self.text_len = inner, adapter, context, text_len

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        out, enc_out = self.inner(attn, hidden_states, encoder_hidden_states, **kwargs)
        f = self.context.num_frames
        b, t, d = hidden_states.shape
        frames = hidden_states.view(b, f, t // f, d)
        middle = frames[:, f // 2]
        q = self.adapter.to_q(frames)  # [B, F, T, D]
        k, v = attn.to_k(middle), attn.to_v(middle)  # frozen weights of the existing attention
        extra = F.scaled_dot_product_attention(q, k[:, None], v[:, None])
        out = out + self.adapter.scale * self.adapter.to_out(extra).reshape(b, t, d)
        return out, enc_out


class InterFrameAttention(Adapter):
    def __init__(self) -> None:
        super().__init__()
        self.saved: dict[str, Any] = {}

    def attach(self, backbone: Backbone) -> None:
        denoiser = backbone.denoiser
        hidden = denoiser.config.num_attention_heads * denoiser.config.attention_head_dim
        self.to_q = nn.Linear(hidden, hidden, bias=False)
        self.to_out = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)
        self.saved = dict(denoiser.attn_processors)
        text_len = denoiser.config.max_text_seq_length
        denoiser.set_attn_processor(
            {k: InterFrameProcessor(p, self, backbone.context, text_len) for k, p in self.saved.items()}
        )
        self.attached = True

    def detach(self, backbone: Backbone) -> None:
        backbone.denoiser.set_attn_processor(self.saved)
        self.attached = False


class MockPlugin:
    @hookimpl
    def register_controls(self, register):
        register("mock.layer_controlnet", LayerControlNet)

    @hookimpl
    def register_adapters(self, register):
        register("mock.layer_fusion", LayerFusion)
        register("mock.inter_frame", InterFrameAttention)
