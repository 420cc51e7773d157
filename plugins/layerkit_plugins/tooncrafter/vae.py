"""The two VAEs of ToonCrafter / LayerAnimate: the SD 1.x KL-f8 VAE and the dual-reference video VAE.

* **SD VAE** (LayerAnimate's ``vae/`` folder, used for image-to-video): diffusers' ``AutoencoderKL``
  (scaling factor 0.18215). The published weights use the LDM key layout (``encoder.down.N.block.M``,
  ``mid.attn_1.{q,k,v,proj_out}`` as 1x1 convolutions, 248 keys); :func:`ldm_to_diffusers_vae_state`
  converts them with diffusers' own ``convert_ldm_vae_checkpoint`` and :func:`diffusers_to_ldm_vae_state`
  goes back. :func:`load_sd_vae` reads a LayerAnimate ``vae/`` folder, a diffusers ``AutoencoderKL``
  folder, an LDM weights file or a state dict.

* **Dual-reference VAE** (:class:`DualRefAutoencoderKL`; ToonCrafter's ``AutoencoderKL_Dualref``,
  ``first_stage_model.*`` of ``model.ckpt`` and LayerAnimate's ``vae_dualref/``): the same encoder,
  which can also hand back its hidden states, and SGM's ``VideoDecoder`` in ``time_mode="conv-only"``
  (every ResnetBlock followed by a temporal ResBlock with Conv3d (3,1,1) kernels mixed in by a learned
  ``mix_factor``; ``conv_out`` followed by a temporal ``time_mix_conv``) plus ``decoder.attn_refinement``,
  which injects the encoder hidden states of the first and the last frame: a zero-initialised 1x1
  conv added to the first/last frame at decoder levels 0 and 1 and after ``norm_out`` (``Combiner``),
  and cross-attention of every frame onto the tokens of both reference frames at levels 2 and 3
  (8 heads x 64, zero-initialised output projection). The state dict uses the authors' LDM names
  exactly (396 keys) so ``model.ckpt`` (prefix stripped) and LayerAnimate's folder load strictly.

Letters: B videos, F frames per video (``timesteps`` in the authors' code), N = B*F frame rows in
the order ``b * F + f``, h x w latent size, H x W image size.

Faithful details (ToonCrafter ``lvdm/models/autoencoder.py``, ``lvdm/models/autoencoder_dualref.py``,
``lvdm/modules/networks/ae_modules.py``):

* the dual-reference decode path never applies ``post_quant_conv`` (the authors' ``decode`` skips it
  whenever keyword arguments are passed, which the video decoder always gets); the weights stay in
  the state dict;
* GroupNorm: 32 groups, eps 1e-6 in the spatial blocks, eps 1e-5 in the temporal ``time_stack``;
* every attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (the reference
  cross-attention at level 2 would need ~107 GB as naive attention); the reference tokens are shared
  by all frames of a video instead of being copied per frame (same result, far less memory).

The decoder can run in bf16 (``vae.decoder.to(torch.bfloat16)``; :meth:`DualRefAutoencoderKL.decode`
casts its inputs to the decoder's dtype); the encoder can run per frame or in chunks of frames.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from layerkit.errors import LayerkitError, ShapeError

#: latent scaling of the SD 1.x VAE (ToonCrafter ``scale_factor``)
SCALING_FACTOR = 0.18215

#: ``ddconfig`` of the released VAEs (ToonCrafter ``configs/inference_512_v1.0.yaml``)
DDCONFIG: dict[str, Any] = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}
#: a tiny ``ddconfig`` for tests: 4 levels (8x down-sampling) of 32/32/64/64 channels, so that the
#: dual-reference cross-attention of levels 2 and 3 exists (GroupNorm needs channels % 32 == 0)
TINY_DDCONFIG: dict[str, Any] = {**DDCONFIG, "resolution": 32, "ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1}

#: sizes of the published layouts (NOTES 2 and 3.1): LayerAnimate ``vae/`` (SD VAE, LDM names) and
#: ``vae_dualref/`` == ToonCrafter ``first_stage_model.*``
SD_VAE_NUM_KEYS, SD_VAE_NUM_PARAMS = 248, 83_653_863
DUAL_REF_VAE_NUM_KEYS, DUAL_REF_VAE_NUM_PARAMS = 396, 99_941_907

_VAE_PREFIXES = ("first_stage_model.", "vae.")
_LDM_TOP = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin")


# ----------------------------------------------------------------------------------------------
# Building blocks with the LDM names
# ----------------------------------------------------------------------------------------------


def _group_norm(channels: int, eps: float = 1e-6) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=eps, affine=True)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _frames_first(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """``[(B F), C, h, w]`` -> view ``[B, C, F, h, w]`` (no copy)."""
    n, c, h, w = x.shape
    return x.view(n // num_frames, num_frames, c, h, w).transpose(1, 2)


def _frames_back(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, F, h, w]`` -> ``[(B F), C, h, w]``."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


class ResnetBlock(nn.Module):
    """LDM ResnetBlock without time embedding: norm1, conv1, norm2, dropout, conv2, 1x1 ``nin_shortcut``."""

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections ``q, k, v, proj_out`` (SDPA)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        n, c, hh, ww = x.shape
        q, k, v = (p(h).reshape(n, 1, c, hh * ww).transpose(-1, -2) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(-1, -2).reshape(n, c, hh, ww))


class Downsample(nn.Module):
    """LDM down-sampling: pad (0, 1, 0, 1) then a stride-2 3x3 conv (or 2x2 average pooling)."""

    def __init__(self, channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, 2, 2)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


def _check_ddconfig(ddconfig: Mapping[str, Any], what: str) -> None:
    if ddconfig.get("use_linear_attn", False) or ddconfig.get("attn_type", "vanilla") == "linear":
        raise LayerkitError(f"{what}: ddconfig use_linear_attn/attn_type 'linear' is not supported, expected softmax attention.")
    if not ddconfig.get("double_z", True):
        raise LayerkitError(f"{what}: ddconfig double_z must be true (a KL autoencoder predicts mean and log-variance).")
    for ch in {ddconfig["ch"] * m for m in ddconfig["ch_mult"]}:
        if ch % 32:
            raise LayerkitError(f"{what}: ddconfig ch * ch_mult gives {ch} channels, expected multiples of 32 (GroupNorm with 32 groups).")


class Encoder(nn.Module):
    """The LDM KL encoder (``conv_in``, ``down.N.{block,attn,downsample}``, ``mid``, ``norm_out``, ``conv_out``).

    ``forward(x, return_hidden_states=True)`` also returns the authors' hidden states: the output of
    the last block of every level (``ch * ch_mult[i]`` channels at H / 2**i) followed by the
    ``conv_in`` output (``ch`` channels at H), the order the dual-reference decoder expects.
    """

    def __init__(self, *, ch: int, out_ch: int = 3, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int] = (), dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True, **ignored: Any):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        curr_res = resolution
        in_ch_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, return_hidden_states: bool = False):
        h = first = self.conv_in(x)
        hidden: list[torch.Tensor] = []
        for i_level, down in enumerate(self.down):
            for i_block, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if return_hidden_states:
                hidden.append(h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        h = self.conv_out(F.silu(self.norm_out(h)))
        if return_hidden_states:
            hidden.append(first)
            return h, hidden
        return h


class TemporalResBlock(nn.Module):
    """The ``time_stack`` of a VideoResBlock: the authors' ResBlock with ``dims=3``, no time embedding.

    ``in_layers`` = [GroupNorm(eps 1e-5), SiLU, Conv3d], ``out_layers`` = [GroupNorm, SiLU, Dropout,
    zero Conv3d], identity skip; input and output ``[B, C, F, h, w]``.
    """

    def __init__(self, channels: int, dropout: float = 0.0, kernel_size: Sequence[int] = (3, 1, 1)):
        super().__init__()
        kernel_size = tuple(kernel_size)
        padding = tuple(k // 2 for k in kernel_size)
        self.in_layers = nn.Sequential(_group_norm(channels, eps=1e-5), nn.SiLU(),
                                       nn.Conv3d(channels, channels, kernel_size, padding=padding))
        self.out_layers = nn.Sequential(_group_norm(channels, eps=1e-5), nn.SiLU(), nn.Dropout(dropout),
                                        _zero(nn.Conv3d(channels, channels, kernel_size, padding=padding)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out_layers(self.in_layers(x))


class VideoResnetBlock(ResnetBlock):
    """SGM ``VideoResBlock``: a spatial ResnetBlock, then ``time_stack`` over the frames mixed in by
    ``alpha = sigmoid(mix_factor)``: ``alpha * temporal + (1 - alpha) * spatial``."""

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0,
                 video_kernel_size: Sequence[int] = (3, 1, 1), alpha: float = 0.0):
        super().__init__(in_channels, out_channels, dropout)
        self.time_stack = TemporalResBlock(self.out_channels, dropout, video_kernel_size)
        self.mix_factor = nn.Parameter(torch.tensor([float(alpha)]))

    def forward(self, x: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        x = super().forward(x)
        if num_frames is None:  # skip_video
            return x
        spatial = _frames_first(x, num_frames)
        temporal = self.time_stack(spatial)
        mixed = torch.lerp(spatial, temporal, torch.sigmoid(self.mix_factor).to(temporal.dtype))
        return _frames_back(mixed)


class AE3DConv(nn.Conv2d):
    """The decoder's ``conv_out``: a 3x3 Conv2d followed by ``time_mix_conv``, a Conv3d over frames."""

    def __init__(self, in_channels: int, out_channels: int, video_kernel_size: Sequence[int] = (3, 1, 1)):
        super().__init__(in_channels, out_channels, kernel_size=3, padding=1)
        video_kernel_size = tuple(video_kernel_size)
        self.time_mix_conv = nn.Conv3d(out_channels, out_channels, video_kernel_size,
                                       padding=tuple(k // 2 for k in video_kernel_size))

    def forward(self, x: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        x = super().forward(x)
        if num_frames is None:
            return x
        return _frames_back(self.time_mix_conv(_frames_first(x, num_frames)))


class ReferenceCombiner(nn.Module):
    """The authors' ``Combiner``: a zero-initialised 1x1 conv of the reference maps added to the first
    frame (first reference) and the last frame (last reference) of every video."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        b, c, refs, h, w = context.shape
        ref = self.conv(_frames_back(context)).view(b, refs, c, h, w)
        if torch.is_grad_enabled() and (x.requires_grad or ref.requires_grad):
            x = x.clone()
        frames = x.view(b, num_frames, c, h, w)
        frames[:, 0] += ref[:, 0]
        frames[:, -1] += ref[:, 1]
        return x


class ReferenceCrossAttention(nn.Module):
    """The authors' ``MemoryEfficientCrossAttentionWrapperFusion``: every pixel of every frame attends
    to the tokens of both reference frames of its video.

    ``norm`` (GroupNorm) on the query map only, ``to_q/to_k/to_v`` without bias (``heads * dim_head``
    inner width, 8 x 64 in the released model), zero-initialised ``to_out.0``, residual. Keys/values
    are computed once per video and shared by its frames; ``frames_per_chunk`` bounds how many
    frames' queries go through SDPA at once (``None``: all).
    """

    def __init__(self, query_dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.norm = _group_norm(query_dim)
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(query_dim, inner, bias=False)
        self.to_v = nn.Linear(query_dim, inner, bias=False)
        self.to_out = nn.Sequential(_zero(nn.Linear(inner, query_dim)), nn.Dropout(dropout))
        self.frames_per_chunk: int | None = None

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        n, c, h, w = x.shape
        b = n // num_frames
        tokens = context.permute(0, 2, 3, 4, 1).reshape(b, -1, context.shape[1])  # [B, 2*h*w, C]
        k, v = self._heads(self.to_k(tokens)), self._heads(self.to_v(tokens))
        step = self.frames_per_chunk or num_frames
        outs = []
        for start in range(0, num_frames, step):
            rows = _frames_first(x, num_frames)[:, :, start:start + step]  # [B, C, f, h, w]
            f = rows.shape[2]
            q = self.norm(_frames_back(rows))  # [(B f), C, h, w]
            q = q.view(b, f, c, h * w).permute(0, 1, 3, 2).reshape(b, f * h * w, c)
            out = F.scaled_dot_product_attention(self._heads(self.to_q(q)), k, v)
            out = self.to_out(out.transpose(1, 2).reshape(b, f * h * w, self.heads * self.dim_head))
            outs.append(out.view(b, f, h, w, c))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return x + out.permute(0, 1, 4, 2, 3).reshape(n, c, h, w)


class VideoDecoder(nn.Module):
    """SGM ``VideoDecoder`` (``time_mode="conv-only"``) with the dual-reference ``attn_refinement``.

    ``forward(z [(B F), z_channels, h, w], ref_context=None | list, num_frames=F)``. ``ref_context``
    holds ``len(ch_mult) + 1`` maps ``[B, C_i, 2, h_i, w_i]`` (first and last frame), in the order of
    :meth:`Encoder.forward`'s hidden states; without it the refinement is skipped (plain temporal
    decoder); ``num_frames=None`` also skips the temporal layers (spatial-only decoder).
    """

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int] = (), dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int = 3, resolution: int, z_channels: int, give_pre_end: bool = False,
                 tanh_out: bool = False, attn_level: Sequence[int] = (2, 3),
                 video_kernel_size: Sequence[int] = (3, 1, 1), alpha: float = 0.0, merge_strategy: str = "learned",
                 time_mode: str = "conv-only", **ignored: Any):
        super().__init__()
        if time_mode != "conv-only":
            raise LayerkitError(f"VideoDecoder time_mode '{time_mode}' is not supported, expected 'conv-only' (ToonCrafter's).")
        if merge_strategy != "learned":
            raise LayerkitError(f"VideoDecoder merge_strategy '{merge_strategy}' is not supported, expected 'learned'.")
        self.num_resolutions = len(ch_mult)
        self.give_pre_end, self.tanh_out = give_pre_end, tanh_out
        self.attn_level = tuple(attn_level)
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)

        def resblock(cin: int, cout: int) -> VideoResnetBlock:
            return VideoResnetBlock(cin, cout, dropout, video_kernel_size, alpha)

        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = resblock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = resblock(block_in, block_in)
        self.up = nn.ModuleList()
        refinement: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(resblock(block_in, block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            self.up.insert(0, up)
            refinement.insert(0, ReferenceCrossAttention(block_in) if i_level in self.attn_level
                              else ReferenceCombiner(block_in))
        self.norm_out = _group_norm(block_in)
        refinement.append(ReferenceCombiner(block_in))
        self.attn_refinement = nn.ModuleList(refinement)
        self.conv_out = AE3DConv(block_in, out_ch, video_kernel_size)

    def forward(self, z: torch.Tensor, ref_context: Sequence[torch.Tensor] | None = None,
                num_frames: int | None = None) -> torch.Tensor:
        if ref_context is not None and num_frames is None:
            raise LayerkitError("VideoDecoder: ref_context needs num_frames (the frames per video).")
        t = num_frames
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, t)), t)
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block, block in enumerate(up.block):
                h = block(h, t)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if ref_context is not None:
                h = self.attn_refinement[i_level](h, ref_context[i_level], t)
            if i_level != 0:
                h = up.upsample(h)
        if self.give_pre_end:
            return h
        h = F.silu(self.norm_out(h))
        if ref_context is not None:
            h = self.attn_refinement[-1](h, ref_context[-1], t)
        h = self.conv_out(h, t)
        return torch.tanh(h) if self.tanh_out else h


# ----------------------------------------------------------------------------------------------
# The dual-reference VAE
# ----------------------------------------------------------------------------------------------


class DualRefAutoencoderKL(ModelMixin, ConfigMixin):
    """ToonCrafter's ``AutoencoderKL_Dualref`` with the authors' key names (396 keys in full size).

    Config fields are the authors' (``ddconfig``, ``embed_dim``, ``image_key``, ``input_dim``,
    ``use_checkpoint``; ToonCrafter's yaml also has ``lossconfig`` and ``monitor``, accepted and
    unused) plus ``scaling_factor``, so LayerAnimate's ``vae_dualref/config.json`` and weights load
    with ``from_pretrained``. Latents are unscaled here (multiply by ``scaling_factor`` for the UNet).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, ddconfig: dict | None = None, embed_dim: int = 4, image_key: str = "image",
                 input_dim: int = 4, use_checkpoint: bool = False, lossconfig: dict | None = None,
                 monitor: str | None = None, scaling_factor: float = SCALING_FACTOR):
        super().__init__()
        dd = {**DDCONFIG, **(ddconfig or {})}
        _check_ddconfig(dd, "DualRefAutoencoderKL")
        self.encoder = Encoder(**dd)
        self.decoder = VideoDecoder(**dd)
        self.quant_conv = nn.Conv2d(2 * dd["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, dd["z_channels"], 1)
        self.num_levels = len(dd["ch_mult"])

    # -- encoding ------------------------------------------------------------------------------

    def _encode_rows(self, x: torch.Tensor, chunk_size: int | None, hidden_rows: Sequence[int] | None):
        """Moments of every row of ``x`` [N, 3, H, W] and the hidden states of ``hidden_rows`` only."""
        n = x.shape[0]
        step = chunk_size or n
        wanted = list(hidden_rows) if hidden_rows is not None else None
        moments, kept = [], {}
        for start in range(0, n, step):
            chunk = x[start:start + step]
            if wanted is None:
                moments.append(self.quant_conv(self.encoder(chunk)))
                continue
            h, hidden = self.encoder(chunk, return_hidden_states=True)
            moments.append(self.quant_conv(h))
            for row in wanted:
                if start <= row < start + chunk.shape[0] and row not in kept:
                    kept[row] = [hs[row - start] for hs in hidden]
            del hidden
        moments_t = moments[0] if len(moments) == 1 else torch.cat(moments)
        if wanted is None:
            return moments_t, None
        return moments_t, [torch.stack([kept[r][level] for r in wanted]) for level in range(self.num_levels + 1)]

    def encode(self, x: torch.Tensor, return_hidden_states: bool = False, chunk_size: int | None = None,
               return_dict: bool = True):
        """Encode frames ``x`` [N, 3, H, W] in [-1, 1] (``chunk_size`` frames per encoder call, ``None``:
        all at once; every frame is independent, so chunking is exact).

        Returns ``AutoencoderKLOutput(latent_dist)`` (or the tuple ``(latent_dist,)``), and with
        ``return_hidden_states`` also the list of encoder hidden states of all N frames (the authors'
        ``encode(x, return_hidden_states=True)``; see :meth:`reference_context`).
        """
        _expect_frames(x, "frames")
        moments, hidden = self._encode_rows(x, chunk_size, range(x.shape[0]) if return_hidden_states else None)
        dist = DiagonalGaussianDistribution(moments)
        out = AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)
        return (out, hidden) if return_hidden_states else out

    @staticmethod
    def reference_context(hidden_states: Sequence[torch.Tensor], num_frames: int) -> list[torch.Tensor]:
        """First/last-frame maps ``[B, C, 2, h, w]`` from hidden states of ``B * num_frames`` rows."""
        out = []
        for hs in hidden_states:
            n, c, h, w = hs.shape
            if n % num_frames:
                raise ShapeError(f"hidden states have {n} rows, expected a multiple of num_frames={num_frames}.")
            v = hs.view(n // num_frames, num_frames, c, h, w)
            out.append(torch.stack([v[:, 0], v[:, -1]], dim=2))
        return out

    def encode_with_references(self, video: torch.Tensor, chunk_size: int | None = None):
        """Encode a video ``[B, 3, F, H, W]`` in [-1, 1]: returns ``(latent_dist, ref_context)`` with
        latent moments ``[B, 8, F, h, w]`` (``latent_dist.mode()`` is ``[B, 4, F, h, w]``) and the
        decoder's reference maps ``[B, C, 2, h_i, w_i]`` of frames 0 and F-1. ``F`` may be 2 (the
        key frames only, as LayerAnimate does). Only the two reference frames' hidden states are kept."""
        if video.ndim != 5:
            raise ShapeError(f"video has shape {tuple(video.shape)}, expected [B, 3, F, H, W].")
        b, c, f, hh, ww = video.shape
        frames = video.transpose(1, 2).reshape(b * f, c, hh, ww)
        rows = [r for i in range(b) for r in (i * f, i * f + f - 1)]
        moments, hidden = self._encode_rows(frames, chunk_size, rows)
        refs = [hs.view(b, 2, *hs.shape[1:]).transpose(1, 2) for hs in hidden]
        moments = _frames_first(moments, f)
        return DiagonalGaussianDistribution(moments), refs

    # -- decoding ------------------------------------------------------------------------------

    def decode(self, z: torch.Tensor, ref_context: Sequence[torch.Tensor] | None = None, timesteps: int | None = None,
               apply_post_quant_conv: bool = False, videos_per_call: int | None = None, return_dict: bool = True):
        """Decode unscaled latents with the video decoder.

        ``z``: ``[B, 4, F, h, w]`` or frame rows ``[B*F, 4, h, w]``; ``ref_context``: the reference
        maps from :meth:`encode_with_references` / :meth:`reference_context` (``None``: the plain
        temporal decoder); ``timesteps``: frames per video (the authors' name; default F of a 5-D
        ``z``, else N / B of ``ref_context``, else all rows are one video). ``post_quant_conv`` is
        skipped as in the authors' code unless ``apply_post_quant_conv``. ``videos_per_call`` decodes
        that many videos per decoder call (the decoder needs all frames of a video at once). The
        output keeps ``z``'s layout (``[B, 3, F, H, W]`` or ``[B*F, 3, H, W]``) in the decoder's dtype.
        """
        five_d = z.ndim == 5
        if five_d:
            b, _, f, h, w = z.shape
            if timesteps is not None and timesteps != f:
                raise ShapeError(f"z has {f} frames (shape {tuple(z.shape)}) but timesteps={timesteps}.")
            timesteps = f
            z = _frames_back(z)
        elif z.ndim == 4:
            if timesteps is None:
                timesteps = z.shape[0] // ref_context[0].shape[0] if ref_context else z.shape[0]
        else:
            raise ShapeError(f"z has shape {tuple(z.shape)}, expected [B, 4, F, h, w] or [B*F, 4, h, w].")
        n = z.shape[0]
        if timesteps < 1 or n % timesteps:
            raise ShapeError(f"z has {n} frame rows, expected a multiple of timesteps={timesteps}.")
        b = n // timesteps
        dtype = self.decoder.conv_in.weight.dtype
        refs = self._check_refs(ref_context, b, z) if ref_context is not None else None
        if apply_post_quant_conv:
            z = self.post_quant_conv(z)
        step = videos_per_call or b
        outs = []
        for s in range(0, b, step):
            zs = z[s * timesteps:(s + step) * timesteps].to(dtype)
            rs = [r[s:s + step].to(dtype) for r in refs] if refs is not None else None
            outs.append(self.decoder(zs, rs, timesteps))
        dec = outs[0] if len(outs) == 1 else torch.cat(outs)
        if five_d:
            dec = _frames_first(dec, timesteps).contiguous()
        return DecoderOutput(sample=dec) if return_dict else (dec,)

    def _check_refs(self, ref_context: Sequence[torch.Tensor], b: int, z: torch.Tensor) -> list[torch.Tensor]:
        expected = self.num_levels + 1
        if len(ref_context) != expected:
            raise ShapeError(f"ref_context has {len(ref_context)} maps, expected {expected} (one per decoder level + the final one).")
        dd = {**DDCONFIG, **(self.config.ddconfig or {})}
        chans = [dd["ch"] * m for m in dd["ch_mult"]] + [dd["ch"]]
        sizes = [2 ** (self.num_levels - 1 - i) for i in range(self.num_levels)] + [2 ** (self.num_levels - 1)]
        out = []
        for i, (r, c, s) in enumerate(zip(ref_context, chans, sizes, strict=True)):
            want = (c, 2, z.shape[-2] * s, z.shape[-1] * s)
            if r.ndim != 5 or tuple(r.shape[1:]) != want or r.shape[0] not in (1, b):
                raise ShapeError(f"ref_context[{i}] has shape {tuple(r.shape)}, expected [{b}, {', '.join(map(str, want))}].")
            out.append(r.expand(b, *want) if r.shape[0] != b else r)
        return out

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None,
                return_dict: bool = True):
        """Reconstruct a video ``[B, 3, F, H, W]`` with its first/last frames as references."""
        dist, refs = self.encode_with_references(sample)
        z = dist.sample(generator=generator) if sample_posterior else dist.mode()
        return self.decode(z, refs, return_dict=return_dict)

    # -- loading -------------------------------------------------------------------------------

    def load_ldm_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "the state dict",
                            assign: bool = False) -> None:
        """Load the authors' layout strictly (an optional ``first_stage_model.`` prefix is stripped);
        a mismatch raises one LayerkitError naming keys and the expected layout."""
        state = _strip_prefix(state)
        _strict_load(self, state, source, f"the dual-reference VAE's {len(self.state_dict())} keys "
                     "(ToonCrafter first_stage_model.* / LayerAnimate vae_dualref/)", assign=assign)


# ----------------------------------------------------------------------------------------------
# SD VAE: diffusers AutoencoderKL <-> LDM names
# ----------------------------------------------------------------------------------------------


def sd_vae_config(ddconfig: Mapping[str, Any] | None = None, embed_dim: int | None = None,
                  scaling_factor: float = SCALING_FACTOR) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` kwargs for an LDM ``ddconfig`` (default: the released one)."""
    dd = {**DDCONFIG, **(ddconfig or {})}
    _check_ddconfig(dd, "SD VAE")
    if dd.get("attn_resolutions"):
        raise LayerkitError(f"SD VAE ddconfig attn_resolutions={list(dd['attn_resolutions'])} has no diffusers "
                            "AutoencoderKL equivalent, expected [] (mid-block attention only).")
    if not dd.get("resamp_with_conv", True):
        raise LayerkitError("SD VAE ddconfig resamp_with_conv=false has no diffusers AutoencoderKL equivalent, expected true.")
    if embed_dim is not None and embed_dim != dd["z_channels"]:
        raise LayerkitError(f"SD VAE embed_dim={embed_dim} differs from z_channels={dd['z_channels']}; "
                            "diffusers AutoencoderKL expects them equal.")
    levels = len(dd["ch_mult"])
    return {"in_channels": dd["in_channels"], "out_channels": dd["out_ch"],
            "down_block_types": ("DownEncoderBlock2D",) * levels, "up_block_types": ("UpDecoderBlock2D",) * levels,
            "block_out_channels": tuple(dd["ch"] * m for m in dd["ch_mult"]),
            "layers_per_block": dd["num_res_blocks"], "latent_channels": dd["z_channels"], "norm_num_groups": 32,
            "sample_size": dd["resolution"], "scaling_factor": scaling_factor}


def build_sd_vae(ddconfig: Mapping[str, Any] | None = None, scaling_factor: float = SCALING_FACTOR):
    """A randomly initialised diffusers ``AutoencoderKL`` for ``ddconfig``."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**sd_vae_config(ddconfig, scaling_factor=scaling_factor))


def ldm_to_diffusers_vae_state(state: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None,
                               source: str = "the state dict") -> dict[str, torch.Tensor]:
    """LDM-named SD VAE weights (optionally prefixed ``first_stage_model.``/``vae.``) -> diffusers
    ``AutoencoderKL`` names, through diffusers' ``convert_ldm_vae_checkpoint`` (1x1-conv attention
    projections become linear weights). Every key must be used: a stray key is an error naming it."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = _strip_prefix(state)
    stray = [k for k in state if not k.startswith(_LDM_TOP)]
    if stray:
        raise LayerkitError(f"{source} has key '{stray[0]}' that is not part of an LDM VAE "
                            f"(expected only {', '.join(p + '*' for p in _LDM_TOP)}).")
    levels = 1 + max((int(k.split(".")[2]) for k in state if k.startswith("encoder.down.")), default=-1)
    config = dict(config) if config is not None else {"down_block_types": ("DownEncoderBlock2D",) * levels,
                                                      "up_block_types": ("UpDecoderBlock2D",) * levels}
    out = convert_ldm_vae_checkpoint(dict(state), config)
    unused = sorted(set(state) - set(diffusers_to_ldm_vae_state(out)))
    if unused:
        raise LayerkitError(f"{source} has key '{unused[0]}' ({len(unused)} in all) that does not belong to an SD VAE "
                            "(a dual-reference VAE's temporal decoder? use sd_vae_state_from_dual_ref).")
    return out


def diffusers_to_ldm_vae_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` weights -> the LDM names of LayerAnimate's ``vae/`` folder (the
    mid attention's linear projections become 1x1 convolutions)."""
    ups = [int(k.split(".")[2]) for k in state if k.startswith("decoder.up_blocks.")]
    levels = max(ups) + 1 if ups else 0
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        new = key
        if parts[1] in ("conv_norm_out",):
            new = ".".join([parts[0], "norm_out", *parts[2:]])
        elif parts[1] == "down_blocks":
            i = parts[2]
            if parts[3] == "resnets":
                new = ".".join([parts[0], "down", i, "block", parts[4], *parts[5:]])
            else:  # downsamplers.0.conv
                new = ".".join([parts[0], "down", i, "downsample", *parts[5:]])
        elif parts[1] == "up_blocks":
            i = str(levels - 1 - int(parts[2]))
            if parts[3] == "resnets":
                new = ".".join([parts[0], "up", i, "block", parts[4], *parts[5:]])
            else:  # upsamplers.0.conv
                new = ".".join([parts[0], "up", i, "upsample", *parts[5:]])
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                new = ".".join([parts[0], "mid", f"block_{int(parts[3]) + 1}", *parts[4:]])
            else:  # attentions.0.<proj>.<param>
                rest = ".".join(parts[4:-1])
                new = ".".join([parts[0], "mid", "attn_1", attn[rest], parts[-1]])
                if parts[-1] == "weight" and rest != "group_norm" and value.ndim == 2:
                    value = value[:, :, None, None]
        new = new.replace("conv_shortcut", "nin_shortcut")
        out[new] = value
    return out


def sd_vae_state_from_dual_ref(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An SD-VAE (LDM names) state from dual-reference VAE weights (ToonCrafter ``first_stage_model.*``).

    The encoder, ``quant_conv`` and ``post_quant_conv`` are the SD VAE's own; the decoder is the
    *spatial part* of the video decoder (``time_stack``, ``mix_factor``, ``time_mix_conv`` and
    ``attn_refinement`` dropped). ToonCrafter itself always decodes with the video decoder (and without
    ``post_quant_conv``), so this per-frame decoder is an approximation of it, not a released model.
    """
    drop = (".time_stack.", ".mix_factor", ".time_mix_conv.", "decoder.attn_refinement.")
    return {k: v for k, v in _strip_prefix(state).items() if not any(d in k for d in drop)}


def load_sd_vae(source: str | Path | Mapping[str, torch.Tensor], *, allow_pickle: bool = False,
                dtype: torch.dtype | None = None, scaling_factor: float = SCALING_FACTOR):
    """A diffusers ``AutoencoderKL`` from: a LayerAnimate ``vae/`` folder (``config.json`` with
    ``ddconfig``, LDM-named weights), a diffusers ``AutoencoderKL`` folder, an LDM weights file
    (``.safetensors``; a pickle only with ``allow_pickle``) or a state dict (LDM or diffusers names;
    dual-reference weights give :func:`sd_vae_state_from_dual_ref`'s approximation)."""
    from diffusers import AutoencoderKL

    ddconfig: Mapping[str, Any] | None = None
    if isinstance(source, Mapping):
        state, name = dict(source), "the state dict"
    else:
        path = Path(source)
        name = f"'{path}'"
        if path.is_dir():
            cfg = _read_config(path)
            if "ddconfig" not in cfg:
                vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True)
                return vae.to(dtype) if dtype is not None else vae
            ddconfig = cfg["ddconfig"]
            state = _read_weights_dir(path, allow_pickle)
        else:
            from layerkit.io.weights import load_weights

            state = load_weights(path, allow_pickle=allow_pickle)
    state = _strip_prefix(state)
    if any(k.startswith("model.diffusion_model.") for k in state):
        raise LayerkitError(f"{name} is a full diffusion checkpoint; read it with "
                            "layerkit_plugins.tooncrafter.checkpoint.read_tooncrafter_checkpoint and pass its 'vae' part.")
    if any(".time_stack." in k or k.startswith("decoder.attn_refinement.") for k in state):
        state = sd_vae_state_from_dual_ref(state)
    if ddconfig is None:
        ddconfig = _infer_ddconfig(state, name)
    config = sd_vae_config(ddconfig, scaling_factor=scaling_factor)
    if not any(k.startswith("encoder.down_blocks.") for k in state):
        state = ldm_to_diffusers_vae_state(state, config, source=name)
    vae = _build_and_load(lambda: AutoencoderKL(**config), state, name, f"an SD VAE with {ddconfig.get('ch')} base channels")
    return vae.to(dtype) if dtype is not None else vae


def load_dual_ref_vae(source: str | Path | Mapping[str, torch.Tensor], *, allow_pickle: bool = False,
                      dtype: torch.dtype | None = None) -> DualRefAutoencoderKL:
    """A :class:`DualRefAutoencoderKL` from a LayerAnimate ``vae_dualref/`` folder (or one written
    by ``save_pretrained``), a weights file or a state dict with the authors' names (optionally
    prefixed ``first_stage_model.``); strict: any missing/unexpected key is an error."""
    ddconfig: Mapping[str, Any] | None = None
    kwargs: dict[str, Any] = {}
    if isinstance(source, Mapping):
        state, name = dict(source), "the state dict"
    else:
        path = Path(source)
        name = f"'{path}'"
        if path.is_dir():
            cfg = _read_config(path)
            ddconfig = cfg.get("ddconfig")
            kwargs = {k: cfg[k] for k in ("embed_dim", "scaling_factor") if k in cfg}
            state = _read_weights_dir(path, allow_pickle)
        else:
            from layerkit.io.weights import load_weights

            state = load_weights(path, allow_pickle=allow_pickle)
    state = _strip_prefix(state)
    if any(k.startswith("model.diffusion_model.") for k in state):
        raise LayerkitError(f"{name} is a full diffusion checkpoint; read it with "
                            "layerkit_plugins.tooncrafter.checkpoint.read_tooncrafter_checkpoint and pass its 'vae' part.")
    if ddconfig is None:
        ddconfig = _infer_ddconfig(state, name)
    vae = _build_and_load(lambda: DualRefAutoencoderKL(ddconfig=dict(ddconfig), **kwargs), state, name,
                          "the dual-reference VAE (ToonCrafter first_stage_model.* / LayerAnimate vae_dualref/)")
    return vae.to(dtype) if dtype is not None else vae


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _expect_frames(x: torch.Tensor, name: str) -> None:
    if x.ndim != 4:
        raise ShapeError(f"{name} has shape {tuple(x.shape)}, expected [N, 3, H, W].")


def _strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _VAE_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise LayerkitError(f"VAE folder '{path}' has no config.json.")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise LayerkitError(f"'{cfg_path}' is not valid JSON ({exc.msg} at line {exc.lineno}).") from None


def _read_weights_dir(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    from layerkit.io.weights import load_weights

    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            # the .bin of the authors' from_pretrained is a torch pickle: read with weights_only=True
            return load_weights(path / name, allow_pickle=allow_pickle or name.endswith(".bin"))
    raise LayerkitError(f"VAE folder '{path}' has no weights file, expected one of {', '.join(_WEIGHT_FILES)}.")


def _infer_ddconfig(state: Mapping[str, torch.Tensor], source: str) -> dict[str, Any]:
    """``ddconfig`` from LDM-named encoder weights (channels, levels, blocks per level)."""
    try:
        ch = state["encoder.conv_in.weight"].shape[0]
        in_channels = state["encoder.conv_in.weight"].shape[1]
        z2 = state["encoder.conv_out.weight"].shape[0]
    except KeyError:
        raise LayerkitError(f"{source} has no encoder.conv_in/conv_out weights, expected an LDM-named VAE "
                            "(encoder.*, decoder.*, quant_conv.*, post_quant_conv.*).") from None
    levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.down."))
    blocks = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block."))
    mult = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)]
    out_ch = state["decoder.conv_out.weight"].shape[0] if "decoder.conv_out.weight" in state else in_channels
    return {**DDCONFIG, "ch": ch, "in_channels": in_channels, "out_ch": out_ch, "z_channels": z2 // 2,
            "ch_mult": mult, "num_res_blocks": blocks}


def _strict_load(module: nn.Module, state: Mapping[str, torch.Tensor], source: str, expected: str,
                 assign: bool = False) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. '{missing[0]}')")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. '{unexpected[0]}')")
        raise LayerkitError(f"{source} does not match {expected}: {' and '.join(parts)} keys.")
    for k, v in own.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise LayerkitError(f"{source} has '{k}' of shape {tuple(state[k].shape)}, expected {tuple(v.shape)} for {expected}.")
    module.load_state_dict(state, strict=True, assign=assign)


def _build_and_load(factory, state: Mapping[str, torch.Tensor], source: str, expected: str):
    """Build on the meta device and take the tensors of ``state`` (no random init, no copy)."""
    with torch.device("meta"):
        module = factory()
    _strict_load(module, state, source, expected, assign=True)
    leftovers = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftovers and not any(v.is_meta for v in state.values()):  # a non-persistent buffer: build for real
        module = factory()
        _strict_load(module, state, source, expected)
    return module.eval()
