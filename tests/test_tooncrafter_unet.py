"""ToonCrafter's video UNet, its image projector and their key converters.

Layout checks run on the ``meta`` device (no memory): the key and parameter counts of the released
configs always, the exact key names and shapes when the reference listings of ``../shared`` are
present. Numbers: golden fixtures computed with the authors' modules (skipped when absent) and, always,
diffusers' ``UNet3DConditionModel`` as an oracle for the shared architecture.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from layerkit_plugins.tooncrafter.convert import (
    load_state_dict_strict,
    tooncrafter_config,
    tooncrafter_to_resampler,
    tooncrafter_to_unet,
    unet3d_config,
    unet3d_to_unet,
    unet_config_from_unet3d,
    unet_to_tooncrafter,
    unet_to_unet3d,
)
from layerkit_plugins.tooncrafter.resampler import Resampler
from layerkit_plugins.tooncrafter.unet import DecoupledImageAttnProcessor, ToonCrafterUNet

from layerkit.errors import LayerkitError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference" / "layeranimate"
KEYS = REFERENCE / "keys"
GOLDEN = REFERENCE / "golden"
needs_keys = pytest.mark.skipif(not KEYS.is_dir(), reason="reference key listings (../shared) not present")
needs_golden = pytest.mark.skipif(not GOLDEN.is_dir(), reason="golden fixtures (../shared) not present")

# The tiny configuration of the golden fixtures: every code path at 4.0 M parameters.
TINY_UNET = dict(in_channels=8, out_channels=4, model_channels=32, attention_resolutions=[1, 2], num_res_blocks=2,
                 channel_mult=[1, 2, 2], dropout=0.0, num_head_channels=16, context_dim=32, temporal_length=4,
                 default_fps=24)
TINY_RESAMPLER = dict(dim=32, depth=1, dim_head=16, heads=2, num_queries=2, embedding_dim=48, output_dim=32,
                      ff_mult=2, video_length=4)


def read_listing(name: str) -> dict[str, tuple[int, ...]]:
    """A key listing: ``name<TAB>(shape)`` per line."""
    out = {}
    for line in (KEYS / name).read_text().splitlines():
        key, shape = line.split("\t")
        out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


def first_difference(actual: dict[str, tuple], expected: dict[str, tuple]) -> str | None:
    """The first key missing, unexpected or with another shape, described; None when equal."""
    for key, shape in expected.items():
        if key not in actual:
            return f"missing {key}"
        if actual[key] != shape:
            return f"{key}: shape {actual[key]}, expected {shape}"
    for key in actual:
        if key not in expected:
            return f"unexpected {key}"
    return None


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def param_count(model: torch.nn.Module) -> int:
    return sum(v.numel() for v in model.state_dict().values())


def randomize(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Every parameter N(0, std^2), zero-initialised layers included (as the golden fixtures)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model.eval()


def tiny_inputs(seed: int = 0, frames: int = 4) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(2, 8, frames, 8, 8, generator=generator),
        "timestep": torch.tensor([999, 20]),
        "context_text": torch.randn(2, 77, 32, generator=generator),
        "context_img": torch.randn(2, frames * 2, 32, generator=generator),
        "fps": torch.tensor([24, 10]),
    }


# ----------------------------------------------------------------------------------------------
# Layout of the released models (meta device)
# ----------------------------------------------------------------------------------------------


def test_full_unet_counts_and_landmarks():
    with torch.device("meta"):
        unet = ToonCrafterUNet()
    got = shapes(unet)
    assert len(got) == 1516
    assert param_count(unet) == 1_438_854_980
    assert got["input_blocks.0.0.weight"] == (320, 8, 3, 3)
    assert got["time_embed.linear_1.weight"] == (1280, 320)
    assert got["fps_embedding.linear_2.weight"] == (1280, 1280)
    assert got["init_attn.0.proj_in.weight"] == (512, 320, 1)
    assert got["input_blocks.1.0.temopral_conv.conv2.3.weight"] == (320, 320, 3, 1, 1)
    assert got["input_blocks.7.1.transformer_blocks.0.attn2.to_k_ip.weight"] == (1280, 1024)
    assert got["input_blocks.7.2.transformer_blocks.0.attn2.to_k.weight"] == (1280, 1280)
    assert got["output_blocks.5.3.conv.weight"] == (1280, 1280, 3, 3)
    assert got["out.2.weight"] == (4, 320, 3, 3)
    assert sum(".to_k_ip." in k or ".to_v_ip." in k for k in got) == 32


def test_full_resampler_counts():
    with torch.device("meta"):
        resampler = Resampler()
    assert len(resampler.state_dict()) == 51
    assert param_count(resampler) == 48_787_456
    assert shapes(resampler)["latents"] == (1, 256, 1024)


@needs_keys
def test_full_unet_keys_match_layeranimate_listing():
    expected = {k: v for k, v in read_listing("keys_layeranimate_unet.txt").items()
                if not k.startswith("masked_layer_fusion_")}
    with torch.device("meta"):
        unet = ToonCrafterUNet()
    assert first_difference(shapes(unet), expected) is None, first_difference(shapes(unet), expected)
    # A state dict built from the listing loads strictly.
    state = {k: torch.empty(shape, device="meta") for k, shape in expected.items()}
    load_state_dict_strict(unet, state, assign=True)


@needs_keys
def test_full_unet_keys_match_tooncrafter_listing_after_conversion():
    listing = read_listing("keys_tooncrafter_unet.txt")
    assert all(k.startswith("model.diffusion_model.") for k in listing)
    checkpoint = {"state_dict": {k: torch.empty(s, device="meta") for k, s in listing.items()}}
    with torch.device("meta"):
        unet = ToonCrafterUNet()
    converted = {k: tuple(v.shape) for k, v in tooncrafter_to_unet(checkpoint).items()}
    assert first_difference(converted, shapes(unet)) is None, first_difference(converted, shapes(unet))


@needs_keys
def test_full_resampler_keys_match_listing():
    with torch.device("meta"):
        resampler = Resampler()
    expected = read_listing("keys_layeranimate_image_projector.txt")
    assert first_difference(shapes(resampler), expected) is None, first_difference(shapes(resampler), expected)
    # ToonCrafter's model.ckpt names, through the converter.
    checkpoint = {k: torch.empty(s, device="meta") for k, s in read_listing("keys_tooncrafter_image_proj_model.txt").items()}
    converted = {k: tuple(v.shape) for k, v in tooncrafter_to_resampler(checkpoint).items()}
    assert first_difference(converted, expected) is None, first_difference(converted, expected)


def test_strict_load_names_the_first_bad_key():
    with torch.device("meta"):
        unet = ToonCrafterUNet()
    state = {k: torch.empty(v.shape, device="meta") for k, v in unet.state_dict().items()}
    state["input_blocks.1.1.proj_in.weight"] = torch.empty(3, 3, device="meta")
    with pytest.raises(LayerkitError, match=r"input_blocks\.1\.1\.proj_in\.weight"):
        load_state_dict_strict(unet, state, assign=True)
    state["input_blocks.1.1.proj_in.weight"] = torch.empty(320, 320, device="meta")
    state["input_blocks.1.0.temporal_conv.conv1.0.weight"] = state.pop("input_blocks.1.0.temopral_conv.conv1.0.weight")
    with pytest.raises(LayerkitError, match=r"input_blocks\.1\.0\.temporal_conv\.conv1\.0\.weight"):
        load_state_dict_strict(unet, state, assign=True)


def test_unsupported_options_are_refused():
    with pytest.raises(LayerkitError, match="use_relative_position"):
        ToonCrafterUNet(**TINY_UNET, use_relative_position=True)
    with pytest.raises(LayerkitError, match="resblock_updown"):
        ToonCrafterUNet(**TINY_UNET, resblock_updown=True)


# ----------------------------------------------------------------------------------------------
# Golden fixtures (authors' modules)
# ----------------------------------------------------------------------------------------------


def golden():
    from safetensors.torch import load_file

    configs = json.loads((GOLDEN / "configs.json").read_text())
    return configs, load_file(GOLDEN / "inputs.safetensors"), load_file(GOLDEN / "outputs.safetensors")


@needs_golden
def test_golden_unet_without_controls():
    from safetensors.torch import load_file

    configs, inputs, outputs = golden()
    unet = ToonCrafterUNet(**configs["unet"]).eval()
    state = {k: v for k, v in load_file(GOLDEN / "unet_tiny.safetensors").items()
             if not k.startswith("masked_layer_fusion_")}
    load_state_dict_strict(unet, state)
    with torch.no_grad():
        out = unet(inputs["x"], inputs["ts"], inputs["txt"], outputs["image_tokens"], inputs["fps"]).sample
    diff = (out - outputs["unet_out_no_controls"]).abs().max().item()
    print(f"ToonCrafterUNet vs authors' UNetModel (no controls): max |diff| = {diff:.2e}")
    assert diff < 1e-5


@needs_golden
def test_golden_resampler():
    from safetensors.torch import load_file

    configs, inputs, outputs = golden()
    resampler = Resampler(**configs["image_projector"]).eval()
    load_state_dict_strict(resampler, load_file(GOLDEN / "image_projector_tiny.safetensors"))
    with torch.no_grad():
        tokens = resampler(inputs["clip_tokens"])
    diff = (tokens - outputs["image_tokens"]).abs().max().item()
    print(f"Resampler vs authors': max |diff| = {diff:.2e}")
    assert tokens.shape == (2, 8, 32) and diff < 1e-5


# ----------------------------------------------------------------------------------------------
# Oracle without fixtures: diffusers' UNet3DConditionModel
# ----------------------------------------------------------------------------------------------


def test_unet3d_conversion_both_ways_matches_diffusers():
    from diffusers import UNet3DConditionModel

    ours = randomize(ToonCrafterUNet(**TINY_UNET, image_cross_attention=False, fps_condition=False))
    theirs = UNet3DConditionModel(**unet3d_config(ours.config)).eval()
    load_state_dict_strict(theirs, unet_to_unet3d(ours.state_dict()))

    back = unet3d_to_unet(theirs.state_dict())
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    rebuilt = ToonCrafterUNet(**unet_config_from_unet3d(theirs.config)).eval()
    load_state_dict_strict(rebuilt, back)

    x = tiny_inputs()
    with torch.no_grad():
        expected = theirs(x["sample"], x["timestep"], x["context_text"]).sample
        got = ours(x["sample"], x["timestep"], x["context_text"]).sample
        again = rebuilt(x["sample"], x["timestep"], x["context_text"]).sample
    diff = (got - expected).abs().max().item()
    print(f"ToonCrafterUNet vs UNet3DConditionModel: max |diff| = {diff:.2e}")
    assert diff < 1e-5
    assert torch.equal(got, again)


def test_unet3d_conversion_of_full_layout_and_refusals():
    from diffusers import UNet3DConditionModel

    with torch.device("meta"):
        plain = ToonCrafterUNet(image_cross_attention=False, fps_condition=False)
        theirs = UNet3DConditionModel(**unet3d_config(plain.config))
        full = ToonCrafterUNet()
    converted = {k: tuple(v.shape) for k, v in unet_to_unet3d(plain.state_dict()).items()}
    assert len(converted) == 1480
    assert first_difference(converted, shapes(theirs)) is None
    with pytest.raises(LayerkitError, match=r"fps_embedding\.linear_1\.weight"):
        unet_to_unet3d(full.state_dict())
    with pytest.raises(LayerkitError, match="image_cross_attention"):
        unet3d_config(full.config)
    with pytest.raises(LayerkitError, match="'bogus.weight'"):
        unet3d_to_unet({**theirs.state_dict(), "bogus.weight": torch.empty(1, device="meta")})


def test_tooncrafter_checkpoint_conversion():
    unet = randomize(ToonCrafterUNet(**TINY_UNET))
    resampler = randomize(Resampler(**TINY_RESAMPLER), seed=1)
    ldm = unet_to_tooncrafter(unet.state_dict())
    assert "model.diffusion_model.time_embed.0.weight" in ldm and "model.diffusion_model.fps_embedding.2.bias" in ldm
    others = {"first_stage_model.encoder.conv_in.weight": torch.zeros(1), "betas": torch.zeros(3),
              **{"image_proj_model." + k: v for k, v in resampler.state_dict().items()}}
    checkpoint = {"state_dict": {**ldm, **others}, "epoch": 3}

    for loaded in (checkpoint, checkpoint["state_dict"],
                   {"module": {"_forward_module." + k: v for k, v in checkpoint["state_dict"].items()}}):
        converted = tooncrafter_to_unet(loaded)
        assert list(converted) == list(unet.state_dict())
        assert all(torch.equal(converted[k], v) for k, v in unet.state_dict().items())
        load_state_dict_strict(Resampler(**TINY_RESAMPLER), tooncrafter_to_resampler(loaded))

    # DynamiCrafter 256's name of the fps embedding.
    renamed = {k.replace("fps_embedding", "framestride_embed"): v for k, v in ldm.items()}
    assert tooncrafter_to_unet(renamed).keys() == unet.state_dict().keys()

    with pytest.raises(LayerkitError, match=r"time_embed\.1\.weight"):
        tooncrafter_to_unet({**ldm, "model.diffusion_model.time_embed.1.weight": torch.zeros(1)})
    with pytest.raises(LayerkitError, match="model.diffusion_model."):
        tooncrafter_to_unet(others)
    assert tooncrafter_config({"fs_condition": True, "default_fs": 24, "channel_mult": (1, 2)}) == {
        "fps_condition": True, "default_fps": 24, "channel_mult": [1, 2]}


# ----------------------------------------------------------------------------------------------
# Behaviour
# ----------------------------------------------------------------------------------------------


def test_forward_shapes_and_frame_check():
    unet = randomize(ToonCrafterUNet(**TINY_UNET))
    x = tiny_inputs()
    with torch.no_grad():
        out = unet(**x).sample
        scalar = unet(x["sample"], 999, x["context_text"], x["context_img"], None).sample
        (tuple_out,) = unet(**x, return_dict=False)
    assert out.shape == (2, 4, 4, 8, 8)
    assert scalar.shape == out.shape and torch.equal(tuple_out, out)
    y = tiny_inputs(frames=3)
    with pytest.raises(LayerkitError, match="exactly 4 frames"):
        unet(**y)
    with torch.no_grad():  # without image tokens any frame count runs
        assert unet(y["sample"], y["timestep"], y["context_text"]).sample.shape == (2, 4, 3, 8, 8)


def test_image_tokens_are_per_frame():
    """Changing frame 2's image tokens changes frame 2's output first (spatial image attention)."""
    unet = randomize(ToonCrafterUNet(**TINY_UNET, temporal_attention=False, temporal_conv=False,
                                     addition_attention=False))
    x = tiny_inputs()
    changed = x["context_img"].clone()
    changed[:, 4:6] += 1.0  # tokens of frame 2
    with torch.no_grad():
        a = unet(**x).sample
        b = unet(**{**x, "context_img": changed}).sample
    moved = (a - b).abs().amax(dim=(0, 1, 3, 4))
    assert moved[2] > 0 and moved[[0, 1, 3]].max() == 0


def test_save_pretrained_round_trip(tmp_path):
    unet = randomize(ToonCrafterUNet(**TINY_UNET))
    resampler = randomize(Resampler(**TINY_RESAMPLER))
    unet.save_pretrained(tmp_path / "unet")
    resampler.save_pretrained(tmp_path / "image_projector")
    unet2 = ToonCrafterUNet.from_pretrained(tmp_path / "unet").eval()
    resampler2 = Resampler.from_pretrained(tmp_path / "image_projector").eval()
    x = tiny_inputs()
    with torch.no_grad():
        assert torch.equal(unet(**x).sample, unet2(**x).sample)
        tokens = torch.randn(2, 5, 48)
        assert torch.equal(resampler(tokens), resampler2(tokens))


def test_loads_a_layeranimate_unet_folder(tmp_path):
    """The authors' config.json (class name, fusion flag, extra fields) and fusion keys load."""
    from safetensors.torch import save_file

    unet = randomize(ToonCrafterUNet(**TINY_UNET))
    folder = tmp_path / "unet"
    folder.mkdir()
    config = {"_class_name": "UNetModel", "_diffusers_version": "0.30.0", **TINY_UNET, "masked_layer_fusion": True,
              "use_checkpoint": True, "conv_resample": True, "dims": 2, "image_cross_attention": True,
              "fps_condition": True, "use_relative_position": False}
    (folder / "config.json").write_text(json.dumps(config))
    state = {**unet.state_dict(), "masked_layer_fusion_norm_list.0.weight": torch.ones(64)}
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "diffusion_pytorch_model.safetensors")
    loaded = ToonCrafterUNet.from_pretrained(folder).eval()
    x = tiny_inputs()
    with torch.no_grad():
        assert torch.equal(unet(**x).sample, loaded(**x).sample)


def test_attention_processors_can_be_swapped():
    from diffusers.models.attention_processor import AttnProcessor

    unet = randomize(ToonCrafterUNet(**TINY_UNET))
    x = tiny_inputs()
    with torch.no_grad():
        reference = unet(**x).sample
        unet.set_attn_processor(AttnProcessor())  # the classic processor: image attention kept by wrapping
        image = [p for name, p in unet.attn_processors.items() if ".1.transformer_blocks.0.attn2." in name]
        assert image and all(isinstance(p, DecoupledImageAttnProcessor) for p in image)
        assert (unet(**x).sample - reference).abs().max() < 1e-5
        unet.set_default_attn_processor()
        assert torch.equal(unet(**x).sample, reference)


def test_forward_chunking_and_gradient_checkpointing():
    unet = randomize(ToonCrafterUNet(**TINY_UNET))
    x = tiny_inputs()
    with torch.no_grad():
        reference = unet(**x).sample
        unet.enable_forward_chunking(chunk_size=3, dim=1)
        assert (unet(**x).sample - reference).abs().max() < 1e-6
        unet.disable_forward_chunking()

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        unet.zero_grad(set_to_none=True)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()
        unet(**x).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 100
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)


def test_output_block_pre_hook_sees_the_concatenated_skip():
    unet = randomize(ToonCrafterUNet(**TINY_UNET))
    seen = {}

    def hook(module, args):
        seen["channels"], seen["num_frames"] = args[0].shape[1], args[4]

    handle = unet.output_blocks[3].register_forward_pre_hook(hook)
    with torch.no_grad():
        unet(**tiny_inputs())
    handle.remove()
    # Decoder state (64 channels) and the skip of input block 5 (64 channels).
    assert seen == {"channels": 128, "num_frames": 4}
