"""LayerAnimate's Layer ControlNet and masked layer fusion.

Layout checks on the ``meta`` device (counts always, key names with the ``../shared`` listings),
golden fixtures from the authors' modules when present, and the properties the paper relies on:
zero-initialised fusion leaves the UNet unchanged, padded layers get no weight, layers are
independent in the ControlNet (chunking).
"""

from __future__ import annotations

import pytest
import torch
from layerkit_plugins.layeranimate.controlnet import LayerControlNet
from layerkit_plugins.layeranimate.fusion import MaskedLayerFusion, split_fusion_keys
from layerkit_plugins.tooncrafter.convert import load_state_dict_strict
from layerkit_plugins.tooncrafter.unet import ToonCrafterUNet
from test_tooncrafter_unet import (
    GOLDEN,
    TINY_UNET,
    first_difference,
    golden,
    needs_golden,
    needs_keys,
    param_count,
    randomize,
    read_listing,
    shapes,
    tiny_inputs,
)

from layerkit.errors import LayerkitError

TINY_CONTROLNET = {**TINY_UNET, "in_channels": 5}


def layer_inputs(seed: int = 0, layers: int = 3) -> dict[str, torch.Tensor]:
    """B = 2, N layers, F = 4, latent 8x8, trajectory 64x64; layer 2 of sample 1 padded."""
    generator = torch.Generator().manual_seed(seed)
    x = tiny_inputs(seed)
    return {
        "timestep": x["timestep"], "context_text": x["context_text"], "context_img": x["context_img"],
        "fps": x["fps"],
        "layer_latents": torch.randn(2, layers, 4, 4, 8, 8, generator=generator),
        "layer_latent_mask": (torch.rand(2, layers, 4, 1, 8, 8, generator=generator) > 0.5).float(),
        "motion_scores": torch.rand(2, layers, generator=generator),
        "sketch": torch.randn(2, layers, 4, 4, 8, 8, generator=generator),
        "trajectory": torch.randn(2, layers, 4, 3, 64, 64, generator=generator),
    }


# ----------------------------------------------------------------------------------------------
# Layout of the released models (meta device)
# ----------------------------------------------------------------------------------------------


def test_full_controlnet_counts_and_landmarks():
    with torch.device("meta"):
        net = LayerControlNet()
    got = shapes(net)
    assert len(got) == 598
    assert param_count(net) == 457_609_616
    assert got["input_blocks.0.0.weight"] == (320, 5, 3, 3)
    assert got["motion_embedding.weight"] == (320, 2, 3, 3)
    assert got["sketch_embedding.weight"] == (320, 4, 3, 3)
    assert got["trajectory_embedding.blocks.5.weight"] == (256, 96, 3, 3)
    assert got["trajectory_embedding.conv_out.weight"] == (320, 256, 3, 3)
    assert not any(k.startswith(("middle_block", "output_blocks", "out.")) for k in got)


def test_full_fusion_counts_and_blocks():
    with torch.device("meta"):
        fusion = MaskedLayerFusion.from_unet_config(ToonCrafterUNet().config)
    assert fusion.block_indices == [3, 4, 6, 7, 9, 10]
    assert len(fusion.state_dict()) == 54
    assert param_count(fusion) == 61_563_200
    authors = {k: tuple(v.shape) for k, v in fusion.to_authors_keys(fusion.state_dict()).items()}
    assert authors["masked_layer_fusion_attn_list.2.to_q.weight"] == (640, 1280)
    assert authors["masked_layer_fusion_attn_list.2.to_k.weight"] == (640, 640)
    assert authors["masked_layer_fusion_out_list.4.weight"] == (320, 640, 3, 3)


@needs_keys
def test_full_controlnet_keys_match_listing():
    expected = read_listing("keys_layeranimate_layer_controlnet.txt")
    with torch.device("meta"):
        net = LayerControlNet()
    assert first_difference(shapes(net), expected) is None, first_difference(shapes(net), expected)
    load_state_dict_strict(net, {k: torch.empty(s, device="meta") for k, s in expected.items()}, assign=True)


@needs_keys
def test_full_fusion_keys_match_listing():
    listing = read_listing("keys_layeranimate_unet.txt")
    with torch.device("meta"):
        fusion = MaskedLayerFusion.from_unet_config(ToonCrafterUNet().config)
    state = {k: torch.empty(s, device="meta") for k, s in listing.items()}
    backbone, authors = split_fusion_keys(state)
    assert len(backbone) == 1516 and len(authors) == 54
    mapped = fusion.from_authors_keys(authors)
    assert first_difference({k: tuple(v.shape) for k, v in mapped.items()}, shapes(fusion)) is None
    load_state_dict_strict(fusion, mapped, assign=True)
    assert list(fusion.to_authors_keys(mapped)) == list(authors)


# ----------------------------------------------------------------------------------------------
# Golden fixtures (authors' modules)
# ----------------------------------------------------------------------------------------------


@needs_golden
def test_golden_controlnet_features():
    from safetensors.torch import load_file

    configs, inputs, outputs = golden()
    net = LayerControlNet(**configs["layer_controlnet"]).eval()
    load_state_dict_strict(net, load_file(GOLDEN / "layer_controlnet_tiny.safetensors"))
    with torch.no_grad():
        features = net(inputs["ts"], inputs["txt"], outputs["image_tokens"], inputs["fps"], inputs["layer_latents"],
                       inputs["layer_latent_mask"], inputs["motion_scores"], inputs["sketch"], inputs["trajectory"])
    assert len(features) == 4
    for i, feature in enumerate(features):
        diff = (feature - outputs[f"controlnet_feature_{i}"]).abs().max().item()
        print(f"LayerControlNet feature {i} vs authors': max |diff| = {diff:.2e}")
        assert feature.shape == outputs[f"controlnet_feature_{i}"].shape and diff < 1e-5


@needs_golden
def test_golden_unet_with_masked_layer_fusion():
    from safetensors.torch import load_file

    configs, inputs, outputs = golden()
    backbone, authors = split_fusion_keys(load_file(GOLDEN / "unet_tiny.safetensors"))
    unet = ToonCrafterUNet(**configs["unet"]).eval()
    load_state_dict_strict(unet, backbone)
    fusion = MaskedLayerFusion.from_unet_config(unet.config).eval()
    assert fusion.block_indices == [3, 4, 6, 7]
    load_state_dict_strict(fusion, fusion.from_authors_keys(authors))

    controls = [outputs[f"controlnet_feature_{i}"] for i in range(4)]
    args = (inputs["x"], inputs["ts"], inputs["txt"], outputs["image_tokens"], inputs["fps"])
    with torch.no_grad():
        with fusion.attach(unet, controls, inputs["validity"]):
            fused = unet(*args).sample
        plain = unet(*args).sample  # hooks removed
    diff = (fused - outputs["unet_out"]).abs().max().item()
    print(f"ToonCrafterUNet + MaskedLayerFusion vs authors' UNetModel: max |diff| = {diff:.2e} "
          f"(fusion moves the output by {(outputs['unet_out'] - outputs['unet_out_no_controls']).abs().max():.2e})")
    assert diff < 1e-5
    assert (plain - outputs["unet_out_no_controls"]).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------
# Behaviour
# ----------------------------------------------------------------------------------------------


def tiny_models(seed: int = 0):
    unet = randomize(ToonCrafterUNet(**TINY_UNET), seed=seed)
    net = randomize(LayerControlNet(**TINY_CONTROLNET), seed=seed + 1)
    return unet, net


def test_zero_initialised_fusion_leaves_the_unet_output_unchanged():
    unet, net = tiny_models()
    fusion = MaskedLayerFusion.from_unet_config(unet.config)  # out convs zero-initialised
    randomize_except_out = {k: v for k, v in randomize(MaskedLayerFusion.from_unet_config(unet.config)).state_dict().items()
                            if ".out." not in k}
    fusion.load_state_dict(randomize_except_out, strict=False)
    x = tiny_inputs()
    with torch.no_grad():
        features = net(**layer_inputs())
        reference = unet(**x).sample
        with fusion.eval().attach(unet, features, torch.tensor([[1, 1, 0], [1, 0, 0]])):
            fused = unet(**x).sample
    assert torch.equal(fused, reference)


def test_padded_layers_get_no_weight_and_all_padded_is_uniform():
    unet, net = tiny_models()
    fusion = randomize(MaskedLayerFusion.from_unet_config(unet.config), seed=5)
    generator = torch.Generator().manual_seed(3)
    h = torch.randn(8, 64, 4, 4, generator=generator)        # decoder state of output block 3: (B F) = 8
    skip = torch.randn(8, 64, 4, 4, generator=generator)
    features = torch.randn(2, 3, 4, 64, 4, 4, generator=generator)
    validity = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    with torch.no_grad():
        out = fusion.fuse(3, h, skip, features, validity)
        changed = features.clone()
        changed[0, 2] += 5.0
        changed[1, 1:] -= 5.0
        assert torch.equal(fusion.fuse(3, h, skip, changed, validity.bool()), out)
        assert not torch.equal(out, skip)

        # No valid layer in sample 1: the authors' masked_fill(-max) gives a uniform softmax.
        none = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
        got = fusion.fuse(3, h, skip, features, none)
        block = fusion.blocks["3"]
        values = block.attn.to_v(features[1].permute(1, 3, 4, 0, 2).reshape(-1, 3, 64))
        uniform = block.attn.to_out[0](values.mean(dim=1)).reshape(4, 4, 4, 64).permute(0, 3, 1, 2)
        expected = skip[4:] + block.out(uniform)
    assert torch.isfinite(got).all()
    assert torch.allclose(got[4:], expected, atol=1e-5)
    assert torch.allclose(got[:4], fusion.fuse(3, h, skip, features, validity)[:4], atol=1e-6)


def test_fusion_key_mapping_and_errors():
    with torch.device("meta"):
        fusion = MaskedLayerFusion.from_unet_config(ToonCrafterUNet(**TINY_UNET).config)
    authors = fusion.to_authors_keys(fusion.state_dict())
    assert len(authors) == 36 and "masked_layer_fusion_attn_list.3.to_out.0.bias" in authors
    assert fusion.from_authors_keys(authors).keys() == fusion.state_dict().keys()
    with pytest.raises(LayerkitError, match=r"masked_layer_fusion_norm_list\.4\.weight"):
        fusion.from_authors_keys({**authors, "masked_layer_fusion_norm_list.4.weight": torch.empty(1)})
    with pytest.raises(LayerkitError, match="no masked layer fusion"):
        fusion.fuse(5, *(torch.empty(0),) * 4)


def test_controlnet_chunked_layers_match():
    _, net = tiny_models()
    inputs = layer_inputs()
    with torch.no_grad():
        whole = net(**inputs)
        for chunk in (1, 2):
            chunked = net(**inputs, layer_chunk=chunk)
            assert [f.shape for f in chunked] == [f.shape for f in whole]
            # Equal up to the rounding of batch-size-dependent CPU kernels (a 1x1 conv here).
            assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(chunked, whole))
    assert [tuple(f.shape) for f in whole] == [(2, 3, 4, 32, 8, 8)] * 2 + [(2, 3, 4, 64, 4, 4)] * 2


def test_controlnet_layers_are_independent():
    """Changing layer 1's inputs leaves the features of layers 0 and 2 untouched."""
    _, net = tiny_models()
    inputs = layer_inputs()
    changed = dict(inputs, sketch=inputs["sketch"].clone(), layer_latents=inputs["layer_latents"].clone())
    changed["sketch"][:, 1] += 1.0
    changed["layer_latents"][:, 1] -= 1.0
    with torch.no_grad():
        a, b = net(**inputs), net(**changed)
    for fa, fb in zip(a, b):
        assert torch.equal(fa[:, [0, 2]], fb[:, [0, 2]]) and not torch.equal(fa[:, 1], fb[:, 1])


def test_controlnet_from_unet_and_round_trip(tmp_path):
    unet, _ = tiny_models()
    net = LayerControlNet.from_unet(unet).eval()
    assert net.config.in_channels == 5 and net.config.model_channels == 32
    source, copied = unet.state_dict(), net.state_dict()
    shared = [k for k in copied if k in source and k != "input_blocks.0.0.weight"]
    assert len(shared) == len(copied) - 1 - 2 - 2 - 16  # input conv weight, motion, sketch, trajectory
    assert all(torch.equal(copied[k], source[k]) for k in shared)
    assert copied["input_blocks.0.0.weight"].shape == (32, 5, 3, 3)
    for name in ("motion_embedding", "sketch_embedding", "trajectory_embedding.conv_out"):
        assert not copied[f"{name}.weight"].any() and not copied[f"{name}.bias"].any()

    # With zero control encoders the controls do not matter.
    inputs = layer_inputs()
    with torch.no_grad():
        with_controls = net(**inputs)
        without = net(**{**inputs, "motion_scores": None, "sketch": None, "trajectory": None})
    assert all(torch.equal(a, b) for a, b in zip(with_controls, without))

    net.save_pretrained(tmp_path / "layer_controlnet")
    loaded = LayerControlNet.from_pretrained(tmp_path / "layer_controlnet").eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(loaded(**inputs), with_controls))


def test_controlnet_checks_frames_and_channels():
    _, net = tiny_models()
    inputs = layer_inputs()
    with pytest.raises(LayerkitError, match="exactly 4 frames"):
        net(**{**inputs, "context_img": torch.randn(2, 6, 32),
               **{k: inputs[k][:, :, :3] for k in ("layer_latents", "layer_latent_mask", "sketch", "trajectory")}})
    with pytest.raises(LayerkitError, match="channels"):
        net(**{**inputs, "layer_latent_mask": torch.cat([inputs["layer_latent_mask"]] * 2, dim=3)})
    with pytest.raises(LayerkitError, match="control_injection_mode"):
        LayerControlNet(**TINY_CONTROLNET, control_injection_mode="concat")
