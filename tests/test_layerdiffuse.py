"""LayerDiffuse latent transparency: published key names, strict loading, TTA, padding."""

from __future__ import annotations

import pytest
import torch
from layerkit_plugins.animatediff.layerdiffuse import (
    LatentTransparencyOffsetEncoder,
    TransparentDecoder,
    load_module_weights,
    pad_rgb,
)
from layerkit_plugins.animatediff.tiny import TINY_DECODER
from safetensors.torch import save_file

from layerkit.errors import LayerkitError

# Keys and shapes of the published layer_sd15_vae_transparent_encoder.safetensors (all of them).
PUBLISHED_ENCODER = {
    "blocks.0.weight": (32, 4, 3, 3), "blocks.0.bias": (32,),
    "blocks.2.weight": (32, 32, 3, 3), "blocks.2.bias": (32,),
    "blocks.4.weight": (64, 32, 3, 3), "blocks.4.bias": (64,),
    "blocks.6.weight": (64, 64, 3, 3), "blocks.6.bias": (64,),
    "blocks.8.weight": (128, 64, 3, 3), "blocks.8.bias": (128,),
    "blocks.10.weight": (128, 128, 3, 3), "blocks.10.bias": (128,),
    "blocks.12.weight": (256, 128, 3, 3), "blocks.12.bias": (256,),
    "blocks.14.weight": (256, 256, 3, 3), "blocks.14.bias": (256,),
    "blocks.16.weight": (4, 256, 3, 3), "blocks.16.bias": (4,),
}

# A sample of the published layer_sd15_vae_transparent_decoder.safetensors ("UNet1024").
PUBLISHED_DECODER_SAMPLE = {
    "conv_in.weight": (32, 3, 3, 3),
    "latent_conv_in.weight": (64, 4, 1, 1),
    "latent_conv_in.bias": (64,),
    "down_blocks.0.resnets.0.norm1.weight": (32,),
    "down_blocks.0.downsamplers.0.conv.weight": (32, 32, 3, 3),
    "down_blocks.3.resnets.0.conv1.weight": (128, 64, 3, 3),
    "down_blocks.4.attentions.1.to_q.weight": (256, 256),
    "down_blocks.4.attentions.0.group_norm.weight": (256,),
    "down_blocks.6.attentions.0.to_out.0.weight": (512, 512),
    "mid_block.resnets.1.conv2.weight": (512, 512, 3, 3),
    "mid_block.attentions.0.to_k.bias": (512,),
    "up_blocks.0.resnets.0.conv1.weight": (512, 1024, 3, 3),
    "up_blocks.0.attentions.2.to_v.weight": (512, 512),
    "up_blocks.0.upsamplers.0.conv.weight": (512, 512, 3, 3),
    "up_blocks.6.resnets.2.conv_shortcut.weight": (32, 64, 1, 1),
    "conv_norm_out.weight": (32,),
    "conv_out.weight": (4, 32, 3, 3),
    "conv_out.bias": (4,),
}


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_offset_encoder_has_exactly_the_published_keys_and_loads_a_file(tmp_path):
    encoder = LatentTransparencyOffsetEncoder()
    assert _shapes(encoder) == PUBLISHED_ENCODER
    torch.manual_seed(0)
    state = {k: torch.randn(shape, dtype=torch.float16) for k, shape in PUBLISHED_ENCODER.items()}
    save_file(state, str(tmp_path / "layer_sd15_vae_transparent_encoder.safetensors"))
    loaded = load_module_weights(LatentTransparencyOffsetEncoder(),
                                 tmp_path / "layer_sd15_vae_transparent_encoder.safetensors", "encoder")
    assert torch.equal(loaded.blocks[16].weight, state["blocks.16.weight"].float())
    out = loaded(torch.rand(1, 4, 32, 32))
    assert out.shape == (1, 4, 4, 4)


def test_transparent_decoder_matches_the_published_layout():
    with torch.device("meta"):  # full size without allocating 104M parameters
        decoder = TransparentDecoder()
    shapes = _shapes(decoder)
    for key, shape in PUBLISHED_DECODER_SAMPLE.items():
        assert shapes.get(key) == shape, key
    # a file with the published names and shapes loads strictly: no missing, no unexpected key
    state = {k: torch.empty(s, device="meta") for k, s in {**shapes, **PUBLISHED_DECODER_SAMPLE}.items()}
    result = decoder.load_state_dict(state, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert sum(v.numel() for v in decoder.state_dict().values()) > 100_000_000


def test_decoder_file_round_trip_and_a_wrong_file_is_named(tmp_path):
    torch.manual_seed(0)
    decoder = TransparentDecoder(**TINY_DECODER)
    for p in decoder.parameters():
        p.data.normal_(0, 0.1)
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, str(tmp_path / "dec.safetensors"))
    loaded = load_module_weights(TransparentDecoder(**TINY_DECODER), tmp_path / "dec.safetensors", "decoder")
    x, z = torch.rand(1, 3, 16, 16), torch.randn(1, 4, 2, 2)
    assert torch.equal(loaded.decode(x, z), decoder.decode(x, z))
    save_file({"blocks.0.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LayerkitError, match="missing keys"):
        load_module_weights(TransparentDecoder(**TINY_DECODER), tmp_path / "bad.safetensors", "decoder")


def test_decoder_tta_is_equivariant_to_flips_and_rotations():
    torch.manual_seed(0)
    decoder = TransparentDecoder(**TINY_DECODER)
    for p in decoder.parameters():
        p.data.normal_(0, 0.2)
    x, z = torch.rand(1, 3, 16, 16), torch.randn(1, 4, 2, 2)
    with torch.no_grad():
        y = decoder.decode(x, z, tta=True)
        assert y.shape == (1, 4, 16, 16) and y.min() >= 0 and y.max() <= 1
        flipped = decoder.decode(x.flip(-1), z.flip(-1), tta=True)
        turned = decoder.decode(torch.rot90(x, 1, (-2, -1)), torch.rot90(z, 1, (-2, -1)), tta=True)
        single = decoder.decode(x, z)
    assert torch.allclose(flipped, y.flip(-1), atol=1e-5)
    assert torch.allclose(turned, torch.rot90(y, 1, (-2, -1)), atol=1e-5)
    assert not torch.allclose(single, y, atol=1e-4)  # TTA does change the estimate


def test_decoder_rejects_sizes_it_cannot_downsample():
    decoder = TransparentDecoder(**TINY_DECODER)
    with pytest.raises(LayerkitError, match="multiples of 8"):
        decoder.decode(torch.rand(1, 3, 12, 12), torch.randn(1, 4, 1, 1))


def test_untrained_parts_start_neutral():
    assert torch.count_nonzero(LatentTransparencyOffsetEncoder(channels=(8, 8, 16, 16))(torch.rand(1, 4, 16, 16))) == 0
    assert torch.count_nonzero(TransparentDecoder(**TINY_DECODER).latent_conv_in.weight) == 0


def test_pad_rgb_bleeds_foreground_colour_into_transparent_pixels():
    rgb = torch.zeros(1, 3, 16, 16)
    rgb[:, 0] = 1.0  # red, but only visible where alpha > 0
    alpha = torch.zeros(1, 1, 16, 16)
    alpha[..., 6:10, 6:10] = 1.0
    padded = pad_rgb(rgb * alpha, alpha)
    assert torch.allclose(padded[:, 0], torch.ones(1, 16, 16), atol=1e-5)
    assert padded[:, 1:].abs().max() < 1e-5
    opaque = torch.rand(1, 3, 16, 16)
    assert torch.allclose(pad_rgb(opaque, torch.ones(1, 1, 16, 16)), opaque, atol=1e-6)


def _published_pad_rgb(rgba_uint8, dk: float = 1.2):
    """The reference: LayerDiffuse's published ``pad_rgb`` steps (lib_layerdiffusion/models.py of
    sd-forge-layerdiffuse, layer_diffuse/models/modules.py of diffuser_layerdiffuse), with cv2."""
    import cv2
    import numpy as np

    rgba = rgba_uint8.astype(np.float32) / 255.0
    colour, alpha = rgba[..., :3] * rgba[..., 3:], rgba[..., 3:]
    pyramid = []
    while True:
        pyramid.append((colour, alpha))
        h, w, _ = alpha.shape
        if min(h, w) == 1:
            break
        colour = cv2.resize(colour, (int(w / dk), int(h / dk)), interpolation=cv2.INTER_AREA)
        alpha = cv2.resize(alpha, (int(w / dk), int(h / dk)), interpolation=cv2.INTER_AREA)[:, :, None]
    top_c, top_a = pyramid[-1]
    fg = top_c.sum(axis=(0, 1), keepdims=True) / top_a.sum(axis=(0, 1), keepdims=True).clip(1e-8, 1e32)
    for layer_c, layer_a in reversed(pyramid):
        fg = cv2.resize(fg, (layer_c.shape[1], layer_c.shape[0]), interpolation=cv2.INTER_LINEAR)
        fg = layer_c + fg * (1.0 - layer_a)
    return fg


def _hand_made_rgba(h: int = 37, w: int = 53):
    """A soft disc and an opaque bar over transparent pixels; 37x53 gives non-integer ratios at
    every pyramid level (53 -> 44 -> 36 -> 30 -> ...)."""
    import numpy as np

    y, x = np.mgrid[0:h, 0:w]
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[..., 0] = x * 255 // (w - 1)
    rgba[..., 1] = y * 255 // (h - 1)
    rgba[..., 2] = ((x + y) * 7) % 256
    rgba[..., 3] = np.clip((12 - np.hypot(x - 20.3, y - 15.7)) * 60, 0, 255).astype(np.uint8)
    rgba[28:33, 40:50, 3] = 255
    return rgba


def test_pad_rgb_matches_the_published_opencv_pyramid_at_non_integer_ratios():
    rgba = _hand_made_rgba()
    reference = torch.from_numpy(_published_pad_rgb(rgba)).permute(2, 0, 1)
    x = torch.from_numpy(rgba).float().permute(2, 0, 1)[None] / 255
    padded = pad_rgb(x[:, :3], x[:, 3:])[0]
    transparent = torch.from_numpy(rgba[..., 3] == 0)
    diff = (padded - reference).abs()
    print(f"pad_rgb vs published: max diff {float(diff.max()):.3g} (transparent pixels {float(diff[:, transparent].max()):.3g})")
    assert padded.shape == reference.shape and padded.dtype == torch.float32
    assert float(diff.max()) < 1e-6  # torch's area mode (the old pad_rgb) is off by up to 0.2 here


def test_grey_composite_is_the_published_127():
    import numpy as np
    from layerkit_plugins.animatediff.layerdiffuse import GREY, composite_on_grey
    from PIL import Image

    rgba = _hand_made_rgba()
    image = Image.fromarray(rgba, "RGBA")
    published = Image.new("RGB", image.size, (127, 127, 127))  # diffuser_layerdiffuse convert_rgba2rgb
    published.paste(image, mask=image.split()[3])
    x = torch.from_numpy(rgba).float().permute(2, 0, 1)[None] / 255
    ours = composite_on_grey(x[:, :3], x[:, 3:])[0].permute(1, 2, 0).numpy()
    assert GREY == 127 / 255
    assert np.array_equal(ours[rgba[..., 3] == 0], np.full((int((rgba[..., 3] == 0).sum()), 3), 127 / 255, np.float32))
    assert np.abs(ours * 255 - np.asarray(published, np.float32)).max() <= 0.5 + 1e-4  # PIL rounds to uint8


def test_offset_encoder_levels_set_its_downsampling_and_must_match_the_vae():
    """Four levels (the published encoder) downsample 8x; three, 4x (the toy transparent model's
    VAE). An encoder or decoder that does not match the VAE is refused in one sentence."""
    from layerkit_plugins.animatediff.backbone import AnimateDiff
    from layerkit_plugins.animatediff.tiny import tiny_components

    assert LatentTransparencyOffsetEncoder((8, 8, 16, 16)).downsampling == 8
    three = LatentTransparencyOffsetEncoder((8, 16, 16))
    assert three.downsampling == 4 and three(torch.rand(1, 4, 32, 32)).shape == (1, 4, 8, 8)

    parts = tiny_components(seed=0)  # an 8x VAE
    AnimateDiff(**parts)
    from diffusers import AutoencoderKL  # a 4x VAE takes the three-level encoder and latent_block 2
    vae4 = AutoencoderKL(block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, layers_per_block=1,
                         norm_num_groups=4)
    four = AnimateDiff(**{**parts, "vae": vae4, "offset_encoder": three,
                          "transparent_decoder": TransparentDecoder(**{**TINY_DECODER, "latent_block": 2})})
    assert four.vae_scale_factor == 4
    with pytest.raises(LayerkitError, match="downsamples 4x but the VAE 8x; give encoder_config.channels 4"):
        AnimateDiff(**{**parts, "offset_encoder": three})
    decoder = TransparentDecoder(**{**TINY_DECODER, "latent_block": 2})
    with pytest.raises(LayerkitError, match=r"latent at 1/4 resolution .* set decoder_config.latent_block 3"):
        AnimateDiff(**{**parts, "transparent_decoder": decoder})
    vae1 = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4, layers_per_block=1, norm_num_groups=4)
    with pytest.raises(LayerkitError, match=r"the VAE does not downsample \(one level\).* at least two levels"):
        AnimateDiff(**{**parts, "vae": vae1, "offset_encoder": None})
