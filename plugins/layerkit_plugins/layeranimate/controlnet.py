"""LayerAnimate's Layer ControlNet: a copy of the UNet encoder that encodes each layer on its own.

Paper: LayerAnimate (Yang et al. 2025) section 4.2-4.3; code: IamCreateAI/LayerAnimate
``lvdm/models/layer_controlnet.py`` (folder ``layer_controlnet/``, 598 keys, 457,609,616 parameters
at the released size). This module keeps the authors' key names and config fields and reuses the
blocks of ``tooncrafter.unet``.

Letters: B batch, N layers (layer capacity, 4), F frames, h x w latent size, H x W pixel size.
Every layer is an independent sample: the network runs on a batch of B*N clips, rows
``(b, n, f)`` in that order, so no layer ever sees another. Per layer (forward, L256-345):

1. the time (+ fps) embedding and the text and image tokens of its sample (repeated over layers);
2. the layer encoder ``input_blocks.0``: a 3x3 conv on ``cat(layer latent [4], mask [1])``
   (the noisy latent is not used, ``ignore_noisy_latents``);
3. the control encoders, each ending in a zero-initialised conv, added to that output
   (``control_injection_mode="add"``): motion score (the scalar broadcast over the latent, with the
   mask: 2 channels, a 3x3 conv), sketch (its VAE latent, a 3x3 conv) and trajectory (a 3-channel
   pixel map through ``TrajectoryEncoder``, 8x down-sampling);
4. ``init_attn`` and ``input_blocks.1..`` of the UNet encoder (no middle block, no decoder).

Output: the hidden state after every input block holding a spatial transformer (blocks 1, 2, 4, 5,
7, 8 at the released size), each ``[B, N, F, C, h_l, w_l]``, in encoder order. The UNet's masked
layer fusion consumes them from the end (decoder block 3 gets the feature of input block 8, ...).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from layerkit.errors import LayerkitError, ShapeError
from layerkit_plugins.tooncrafter.unet import (
    GradientCheckpointingMixin,
    ImageAttentionMixin,
    embed_time,
    frame_image_tokens,
    spec_from_config,
    zero_init,
)

DEFAULT_CONDITION_CHANNELS = {"motion_score": 2, "sketch": 4, "trajectory": 3}


class TrajectoryEncoder(nn.Module):
    """Trajectory map ``[n, 3, H, W]`` -> ``[n, C, H/8, W/8]`` (the authors'
    ``ControlNetConditioningEmbedding``, after ControlNet's condition encoder).

    ``conv_in`` 3x3 -> SiLU, then per step a 3x3 conv and a stride-2 3x3 conv, each followed by SiLU
    (16 -> 16 -> 32 -> 32 -> 96 -> 96 -> 256), then the zero-initialised ``conv_out`` to C.
    """

    def __init__(self, out_channels: int, in_channels: int = 3,
                 block_out_channels: Sequence[int] = (16, 32, 96, 256)) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(block_out_channels[:-1], block_out_channels[1:]):
            self.blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.conv_out = zero_init(nn.Conv2d(block_out_channels[-1], out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(x))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[B, N, F, C, h, w]`` -> ``[(B N F), C, h, w]``."""
    return x.reshape(-1, *x.shape[3:])


class LayerControlNet(ImageAttentionMixin, GradientCheckpointingMixin, ModelMixin, ConfigMixin):
    """LayerAnimate's Layer ControlNet with the authors' ``layer_controlnet/`` key names and config.

    The architecture fields are the UNet's (``ToonCrafterUNet``); defaults are the released model
    with ``in_channels`` 5 (layer latent + mask) and ``condition_channels``
    ``{"motion_score": 2, "sketch": 4, "trajectory": 3}``. Supported: ``ignore_noisy_latents=True``
    and ``control_injection_mode="add"`` (the released model); ``use_vae_for_trajectory`` makes the
    trajectory encoder a single zero-initialised 3x3 conv on a latent-size map. ``out_channels`` is
    accepted and unused, as in the authors' class. ``trajectory_block_out_channels`` (not in the
    authors' config; default theirs, 16/32/96/256: three stride-2 steps, 8x) sets the trajectory
    encoder's widths and so its down-sampling, ``2 ** (len - 1)``, which must be the VAE's (a toy
    VAE with 4x compression takes three widths).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 5,
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
        default_fps: int = 24,
        fps_condition: bool = True,
        ignore_noisy_latents: bool = True,
        condition_channels: dict[str, int] | None = None,
        control_injection_mode: str = "add",
        use_vae_for_trajectory: bool = False,
        trajectory_block_out_channels: Sequence[int] = (16, 32, 96, 256),
    ) -> None:
        super().__init__()
        if not ignore_noisy_latents:
            raise LayerkitError("ignore_noisy_latents=False is not supported: the released Layer ControlNet "
                                "never reads the noisy latent.")
        if control_injection_mode != "add":
            raise LayerkitError(f"control_injection_mode={control_injection_mode!r} is not supported, only "
                                "'add' (the released model).")
        conditions = dict(DEFAULT_CONDITION_CHANNELS if condition_channels is None else condition_channels)
        unknown = sorted(set(conditions) - set(DEFAULT_CONDITION_CHANNELS))
        if unknown:
            raise LayerkitError(f"Unknown condition type {unknown[0]!r} in condition_channels (known: "
                                "motion_score, sketch, trajectory).")
        self.conditions = conditions
        spec = spec_from_config(dict(self.config))

        self.time_proj = Timesteps(model_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(model_channels, spec.time_embed_dim)
        if fps_condition:
            self.fps_embedding = TimestepEmbedding(model_channels, spec.time_embed_dim)
            zero_init(self.fps_embedding.linear_2)

        if "motion_score" in conditions:
            self.motion_embedding = zero_init(nn.Conv2d(conditions["motion_score"], model_channels, 3, padding=1))
        if "sketch" in conditions:
            self.sketch_embedding = zero_init(nn.Conv2d(conditions["sketch"], model_channels, 3, padding=1))
        if "trajectory" in conditions:
            if use_vae_for_trajectory:
                self.trajectory_embedding = zero_init(
                    nn.Conv2d(conditions["trajectory"], model_channels, 3, padding=1))
            else:
                self.trajectory_embedding = TrajectoryEncoder(model_channels, conditions["trajectory"],
                                                              tuple(trajectory_block_out_channels))

        self.input_blocks, _ = spec.input_blocks(in_channels)
        if addition_attention:
            self.init_attn = spec.init_attention()

    @classmethod
    def from_unet(cls, unet: nn.Module, **overrides: Any) -> LayerControlNet:
        """A Layer ControlNet with ``unet``'s architecture and encoder weights (the paper's initialisation).

        Copies ``time_embed``, ``fps_embedding``, ``init_attn`` and ``input_blocks.*``; the input conv
        weight is kept freshly initialised when its channel count differs (8 -> 5; its bias is
        copied), as the authors' ``from_pretrained`` does; the control encoders keep their zero
        initialisation. ``overrides`` replace config fields (``in_channels`` defaults to 5).
        """
        fields = set(inspect.signature(cls.__init__).parameters)
        config = {k: v for k, v in unet.config.items() if k in fields and k != "in_channels"}
        config.update({"in_channels": 5, **overrides})
        net = cls(**config).to(device=unet.device, dtype=unet.dtype)
        source = unet.state_dict()
        target = net.state_dict()
        copied = {k: v for k, v in source.items() if k in target and target[k].shape == v.shape}
        net.load_state_dict(copied, strict=False)
        return net

    def forward(
        self,
        timestep: torch.Tensor | float | int,
        context_text: torch.Tensor,
        context_img: torch.Tensor | None,
        fps: torch.Tensor | float | int | None,
        layer_latents: torch.Tensor,
        layer_latent_mask: torch.Tensor,
        motion_scores: torch.Tensor | None = None,
        sketch: torch.Tensor | None = None,
        trajectory: torch.Tensor | None = None,
        layer_chunk: int | None = None,
    ) -> list[torch.Tensor]:
        """Encode every layer; returns one ``[B, N, F, C, h_l, w_l]`` tensor per attention block.

        timestep ``[B]`` or scalar; context_text ``[B, 77, D]``; context_img ``[B, F*L, D]`` or None;
        fps ``[B]``, scalar or None (``default_fps``); layer_latents ``[B, N, F, 4, h, w]``;
        layer_latent_mask ``[B, N, F, 1, h, w]``; motion_scores ``[B, N]`` (normalised, -1 = no score);
        sketch ``[B, N, F, 4, h, w]`` (VAE latents); trajectory ``[B, N, F, 3, H, W]`` (pixel maps).
        A control given as None is left out (its embedding is not added); this is *not* the authors'
        "no control" input, which is motion score -1, the latent of an all-white sketch and a
        trajectory map with heatmap -1 and zero offsets: pass those to reproduce them.

        ``layer_chunk`` runs the layers ``layer_chunk`` at a time: less activation memory (LayerAnimate
        notes 6.3 item 4) and mathematically the same result, since layers never interact here. It is
        bit-identical only where the kernels do not depend on the batch size; on CPU a 1x1 conv
        differs in the last bit (~2e-7 seen).
        """
        if layer_latents.ndim != 6 or layer_latent_mask.ndim != 6:
            raise ShapeError(f"layer_latents/layer_latent_mask have shapes {tuple(layer_latents.shape)} and "
                             f"{tuple(layer_latent_mask.shape)}, expected [B, N, F, C, h, w].")
        if layer_latents.shape[3] + layer_latent_mask.shape[3] != self.config.in_channels:
            raise ShapeError(f"layer_latents and layer_latent_mask have {layer_latents.shape[3]} + "
                             f"{layer_latent_mask.shape[3]} channels, expected {self.config.in_channels} in all.")
        b, n, num_frames = layer_latents.shape[:3]
        dtype = self.dtype
        emb = embed_time(self, timestep, fps, b, layer_latents.device, dtype)
        image = None
        if context_img is not None and self.config.image_cross_attention:
            image = frame_image_tokens(context_img.to(dtype), num_frames, self.config.temporal_length)
            image = image.reshape(b, num_frames, *image.shape[1:])
        context_text = context_text.to(dtype)

        chunk = n if not layer_chunk or layer_chunk >= n else layer_chunk
        per_chunk = []
        for start in range(0, n, chunk):
            layers = slice(start, start + chunk)
            per_chunk.append(self._encode(
                emb, context_text, image, layer_latents[:, layers], layer_latent_mask[:, layers],
                None if motion_scores is None else motion_scores[:, layers],
                None if sketch is None else sketch[:, layers],
                None if trajectory is None else trajectory[:, layers]))
        if len(per_chunk) == 1:
            return per_chunk[0]
        return [torch.cat(parts, dim=1) for parts in zip(*per_chunk)]

    def _encode(self, emb: torch.Tensor, context_text: torch.Tensor, image: torch.Tensor | None,
                layer_latents: torch.Tensor, layer_latent_mask: torch.Tensor, motion_scores: torch.Tensor | None,
                sketch: torch.Tensor | None, trajectory: torch.Tensor | None) -> list[torch.Tensor]:
        """The network on the layers given (``[B, n, ...]``, n a subset of the N layers)."""
        dtype = self.dtype
        b, n, num_frames, _, height, width = layer_latents.shape
        rows = b * n * num_frames

        def per_row(x: torch.Tensor) -> torch.Tensor:
            """``[B, ...]`` -> ``[(B n F), ...]``: each layer and frame gets its sample's value."""
            return x[:, None, None].expand(b, n, num_frames, *x.shape[1:]).reshape(rows, *x.shape[1:])

        row_emb = per_row(emb)
        context = per_row(context_text)
        image_context = None
        if image is not None:  # [B, F, L, D]: frame f of every layer gets frame f's tokens
            image_context = image[:, None].expand(b, n, *image.shape[1:]).reshape(rows, *image.shape[2:])
        args = (row_emb, context, image_context, num_frames)

        mask = layer_latent_mask.to(dtype)
        h = self.run_block(self.input_blocks[0], _rows(torch.cat([layer_latents.to(dtype), mask], dim=3)), *args)
        if motion_scores is not None and "motion_score" in self.conditions:
            score = motion_scores.to(dtype)[:, :, None, None, None, None].expand(b, n, num_frames, 1, height, width)
            h = h + self.motion_embedding(_rows(torch.cat([score, mask], dim=3)))
        if sketch is not None and "sketch" in self.conditions:
            h = h + self.sketch_embedding(_rows(sketch.to(dtype)))
        if trajectory is not None and "trajectory" in self.conditions:
            h = h + self.trajectory_embedding(_rows(trajectory.to(dtype)))
        if self.config.addition_attention:
            h = self.run_block(self.init_attn, h, *args)

        features = []
        for block in self.input_blocks[1:]:
            h = self.run_block(block, h, *args)
            if block.has_spatial_attention():
                features.append(h.reshape(b, n, num_frames, *h.shape[1:]))
        return features
