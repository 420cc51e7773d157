"""LayerDiffuse latent transparency (Zhang & Agrawala 2024), as used by Layer-Animate stage 1/2.

Two small networks sit beside the frozen SD 1.5 VAE:

* :class:`LatentTransparencyOffsetEncoder` takes ``[alpha, padded RGB]`` ([N, 4, H, W] in
  [0, 1]) and returns a latent offset [N, 4, H/f, W/f] (f the VAE's
  downsampling, 8 for SD 1.5); the transparent latent is
  ``(mean + std * offset) * 0.18215`` of the VAE posterior of the RGB composited on grey.
* :class:`TransparentDecoder` (LayerDiffuse's "UNet1024") takes the VAE-decoded RGB
  ([N, 3, H, W] in [0, 1]) plus the unscaled latent [N, 4, H/f, W/f] and returns
  ``[alpha, foreground RGB]`` [N, 4, H, W] (straight colour, clipped to [0, 1]).

Module names match the published ``layer_sd15_vae_transparent_encoder.safetensors`` and
``layer_sd15_vae_transparent_decoder.safetensors`` so those files load unchanged with
``load_state_dict(strict=True)``. The defaults are the published sizes; smaller sizes build
tiny stand-ins for tests (the decoder needs H and W divisible by 2 ** (levels - 1)).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from layerkit.errors import LayerkitError

#: the published decoder's levels: 32 px channels at full size down to 512 at 1/64
DECODER_CHANNELS = (32, 32, 64, 128, 256, 512, 512)
DECODER_DOWN = ("DownBlock2D",) * 4 + ("AttnDownBlock2D",) * 3
DECODER_UP = ("AttnUpBlock2D",) * 3 + ("UpBlock2D",) * 4


def _zeroed(module: nn.Module) -> nn.Module:
    for param in module.parameters():
        nn.init.zeros_(param)
    return module


class LatentTransparencyOffsetEncoder(nn.Module):
    """[N, 4, H, W] ``[alpha, padded RGB]`` in [0, 1] -> latent offset [N, 4, H/f, W/f].

    A plain conv stack: two 3x3 convs per level, a stride-2 conv entering each lower level,
    SiLU between, and a zero-initialised 3x3 head (so an untrained encoder leaves the VAE latent
    unchanged). LayerDiffuse's published encoder has four levels (8x downsampling, SD 1.5's VAE;
    keys ``blocks.{0,2,...,16}.{weight,bias}``); ``channels`` of another length gives
    ``2 ** (len(channels) - 1)`` for a VAE that downsamples that much (the toy's 4x VAE: three).
    """

    def __init__(self, channels: Sequence[int] = (32, 64, 128, 256), latent_channels: int = 4) -> None:
        super().__init__()
        if len(channels) < 1:
            raise LayerkitError("the offset encoder needs at least one channel count (one per level).")
        self.downsampling = 2 ** (len(channels) - 1)
        layers: list[nn.Module] = [nn.Conv2d(4, channels[0], 3, padding=1), nn.SiLU(),
                                   nn.Conv2d(channels[0], channels[0], 3, padding=1), nn.SiLU()]
        for prev, width in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(prev, width, 3, padding=1, stride=2), nn.SiLU(),
                       nn.Conv2d(width, width, 3, padding=1), nn.SiLU()]
        layers.append(_zeroed(nn.Conv2d(channels[-1], latent_channels, 3, padding=1)))
        self.blocks = nn.Sequential(*layers)

    def forward(self, alpha_and_rgb: torch.Tensor) -> torch.Tensor:
        return self.blocks(alpha_and_rgb)


class TransparentDecoder(nn.Module):
    """Decoded RGB [N, 3, H, W] in [0, 1] + unscaled latent [N, 4, H/f, W/f] -> [alpha, RGB].

    A diffusers-block UNet without time embedding. The latent enters through a
    zero-initialised 1x1 conv and is added to the features entering down block
    ``latent_block`` (the first block at 1/f resolution, f = 2 ** latent_block: 8 for SD 1.5's VAE). Up blocks take
    ``layers_per_block + 1`` resnets, each consuming one skip connection.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 4,
        block_out_channels: Sequence[int] = DECODER_CHANNELS,
        down_block_types: Sequence[str] = DECODER_DOWN,
        up_block_types: Sequence[str] = DECODER_UP,
        layers_per_block: int = 2,
        attention_head_dim: int = 8,
        norm_num_groups: int = 4,
        norm_eps: float = 1e-5,
        latent_channels: int = 4,
        latent_block: int = 3,
    ) -> None:
        super().__init__()
        from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block, get_up_block

        widths = list(block_out_channels)
        levels = len(widths)
        if not (len(down_block_types) == len(up_block_types) == levels):
            raise LayerkitError("the transparent decoder needs one down and one up block type per level.")
        if not 1 <= latent_block < levels:
            raise LayerkitError(f"latent_block must lie in [1, {levels - 1}]; got {latent_block}.")
        self.latent_block = latent_block
        self.levels = levels
        self.conv_in = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1)
        self.latent_conv_in = _zeroed(nn.Conv2d(latent_channels, widths[latent_block - 1], kernel_size=1))

        common = dict(temb_channels=None, resnet_eps=norm_eps, resnet_act_fn="silu", resnet_groups=norm_num_groups,
                      attention_head_dim=attention_head_dim, resnet_time_scale_shift="default", dropout=0.0)
        self.down_blocks = nn.ModuleList()
        width = widths[0]
        for index, kind in enumerate(down_block_types):
            prev, width = width, widths[index]
            self.down_blocks.append(get_down_block(
                kind, num_layers=layers_per_block, in_channels=prev, out_channels=width,
                add_downsample=index < levels - 1, downsample_padding=1, downsample_type="conv", **common))

        self.mid_block = UNetMidBlock2D(
            in_channels=widths[-1], temb_channels=None, dropout=0.0, resnet_eps=norm_eps, resnet_act_fn="silu",
            output_scale_factor=1, resnet_time_scale_shift="default", attention_head_dim=attention_head_dim,
            resnet_groups=norm_num_groups, attn_groups=None, add_attention=True)

        rev = widths[::-1]
        self.up_blocks = nn.ModuleList()
        width = rev[0]
        for index, kind in enumerate(up_block_types):
            prev, width = width, rev[index]
            skip = rev[min(index + 1, levels - 1)]
            self.up_blocks.append(get_up_block(
                kind, num_layers=layers_per_block + 1, in_channels=skip, out_channels=width,
                prev_output_channel=prev, add_upsample=index < levels - 1, upsample_type="conv", **common))

        self.conv_norm_out = nn.GroupNorm(num_groups=norm_num_groups, num_channels=widths[0], eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(widths[0], out_channels, kernel_size=3, padding=1)

    @property
    def size_multiple(self) -> int:
        return 2 ** (self.levels - 1)

    def forward(self, pixel: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """pixel [N, 3, H, W] in [0, 1], latent [N, 4, H/f, W/f] (unscaled) -> [N, 4, H, W]."""
        h = self.conv_in(pixel)
        skips = [h]
        for index, block in enumerate(self.down_blocks):
            if index == self.latent_block:
                h = h + self.latent_conv_in(latent)
            h, res = block(hidden_states=h, temb=None)
            skips.extend(res)
        h = self.mid_block(h, None)
        for block in self.up_blocks:
            n = len(block.resnets)
            res, skips = tuple(skips[-n:]), skips[:-n]
            h = block(h, res, None)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))

    def decode(self, pixel: torch.Tensor, latent: torch.Tensor, tta: bool = False) -> torch.Tensor:
        """[alpha, RGB] in [0, 1]; ``tta`` takes the median over the 8 flips/rotations
        (LayerDiffuse's test-time augmentation: better edges, 8x the cost)."""
        m = self.size_multiple
        if pixel.shape[-1] % m or pixel.shape[-2] % m:
            raise LayerkitError(
                f"the transparent decoder needs frames whose height and width are multiples of {m}; "
                f"got {tuple(pixel.shape[-2:])}."
            )
        if not tta:
            return self(pixel, latent).clamp(0, 1)
        outs = []
        for flip in (False, True):
            for turns in range(4):
                p, z = (pixel.flip(-1), latent.flip(-1)) if flip else (pixel, latent)
                p, z = torch.rot90(p, turns, (-2, -1)), torch.rot90(z, turns, (-2, -1))
                y = torch.rot90(self(p, z).clamp(0, 1), -turns, (-2, -1))
                outs.append(y.flip(-1) if flip else y)
        return torch.stack(outs).median(dim=0).values


#: the grey transparent pixels are composited over before the VAE: uint8 127, as in the published
#: code (sd-forge-layerdiffuse ``images.flatten(input_png_raw, (127, 127, 127))``; the diffusers
#: port's ``convert_rgba2rgb``, ``Image.new("RGB", size, (127, 127, 127))`` + ``paste(mask=alpha)``)
GREY = 127 / 255


def composite_on_grey(rgb: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Straight ``rgb`` [N, 3, H, W] over LayerDiffuse's grey (127/255) by ``alpha`` [N, 1, H, W],
    all in [0, 1]: the image whose VAE posterior the offset is added to (without the published
    code's rounding to uint8)."""
    return rgb * alpha + GREY * (1 - alpha)


def pad_rgb(rgb: torch.Tensor, alpha: torch.Tensor, ratio: float = 1.2) -> torch.Tensor:
    """Fill transparent pixels with colour bled outwards from the foreground, as the published
    ``pad_rgb`` / ``build_alpha_pyramid`` (lib_layerdiffusion/models.py) do.

    rgb [N, 3, H, W], alpha [N, 1, H, W], both in [0, 1] (straight alpha). A pyramid of
    premultiplied colour and alpha is built with OpenCV's ``INTER_AREA`` resize to
    ``(int(W / ratio), int(H / ratio))`` until a side is 1 pixel; from the coarsest level (the mean
    foreground colour) each finer level keeps its own premultiplied colour and takes the
    ``INTER_LINEAR``-upsampled fill where it is transparent. Computed per image in float32 with
    OpenCV, as published (torch's ``area`` mode averages other pixels at non-integer ratios); the
    result is a new tensor on ``rgb``'s device and dtype, outside autograd. This is the "padded RGB"
    the offset encoder was trained on.
    """
    try:
        import cv2
    except ImportError:  # pragma: no cover - a declared dependency
        raise LayerkitError("pad_rgb needs OpenCV: pip install opencv-python-headless.") from None
    import numpy as np

    colours = rgb.detach().float().permute(0, 2, 3, 1).cpu().numpy()
    alphas = alpha.detach().float().permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for colour, cover in zip(colours, alphas, strict=True):
        colour, cover = np.ascontiguousarray(colour), np.ascontiguousarray(cover)
        levels = [(colour * cover, cover)]
        while min(levels[-1][1].shape[:2]) > 1:
            c, a = levels[-1]
            size = (int(a.shape[1] / ratio), int(a.shape[0] / ratio))  # OpenCV sizes are (width, height)
            levels.append((cv2.resize(c, size, interpolation=cv2.INTER_AREA),
                           cv2.resize(a, size, interpolation=cv2.INTER_AREA)[:, :, None]))
        c, a = levels[-1]
        fill = c.sum(axis=(0, 1), keepdims=True) / a.sum(axis=(0, 1), keepdims=True).clip(1e-8, 1e32)
        for c, a in reversed(levels):
            fill = cv2.resize(fill, (c.shape[1], c.shape[0]), interpolation=cv2.INTER_LINEAR)
            fill = c + fill * (1.0 - a)
        out.append(fill)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(rgb.device, rgb.dtype)


def load_module_weights(module: nn.Module, path: str | Path, what: str, *, allow_pickle: bool = False) -> nn.Module:
    """Load a published LayerDiffuse file strictly (every key, every shape)."""
    from layerkit.io.weights import load_weights

    state = load_weights(path, allow_pickle=allow_pickle)
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise LayerkitError(
            f"'{path}' is not a {what} file: {len(missing)} missing keys (first {missing[:3]}), "
            f"{len(unexpected)} unexpected (first {unexpected[:3]}), {len(wrong)} with another shape "
            f"(first {wrong[:3]})."
        )
    module.load_state_dict(state, strict=True)
    return module
