"""ToonCrafter VAEs (SD KL-f8 as diffusers AutoencoderKL, dual-reference video VAE) and model.ckpt splitting.

Full-size layouts are checked on the meta device (key counts and parameter counts always; names and
shapes against the reference listings when ../shared is present); numerics on tiny configs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from layerkit_plugins.tooncrafter import checkpoint as ckpt
from layerkit_plugins.tooncrafter import encoders
from layerkit_plugins.tooncrafter.vae import (
    DUAL_REF_VAE_NUM_KEYS,
    DUAL_REF_VAE_NUM_PARAMS,
    SD_VAE_NUM_KEYS,
    SD_VAE_NUM_PARAMS,
    TINY_DDCONFIG,
    DualRefAutoencoderKL,
    build_sd_vae,
    diffusers_to_ldm_vae_state,
    ldm_to_diffusers_vae_state,
    load_dual_ref_vae,
    load_sd_vae,
    sd_vae_config,
    sd_vae_state_from_dual_ref,
)

from layerkit.errors import LayerkitError, ShapeError

KEYS = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "layeranimate" / "keys"


def _listing(name: str) -> dict[str, tuple[int, ...]]:
    path = KEYS / name
    if not path.is_file():
        pytest.skip(f"reference listing {name} not available (../shared absent)")
    out = {}
    for line in path.read_text().splitlines():
        key, shape = line.split("\t")
        out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


def _shapes(state) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _meta_state(shapes: dict[str, tuple[int, ...]], prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _tiny_dual_ref(seed: int = 0, refinement: bool = True) -> DualRefAutoencoderKL:
    """Tiny dual-ref VAE with every weight random (``refinement=False`` keeps attn_refinement at its
    zero initialisation)."""
    torch.manual_seed(seed)
    vae = DualRefAutoencoderKL(ddconfig=TINY_DDCONFIG).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if not refinement and name.startswith("decoder.attn_refinement."):
                continue
            p.copy_(torch.randn(p.shape, generator=generator) * (0.05 if p.ndim > 1 else 0.02)
                    + (1.0 if ("norm" in name and name.endswith("weight")) else 0.0))
    return vae


def _video(b=2, f=4, size=32, seed=1) -> torch.Tensor:
    return torch.rand(b, 3, f, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------------------------
# full-size layouts (meta)
# ----------------------------------------------------------------------------------------------


def test_dual_ref_vae_full_size_layout():
    with torch.device("meta"):
        vae = DualRefAutoencoderKL()
    state = vae.state_dict()
    assert len(state) == DUAL_REF_VAE_NUM_KEYS == 396
    assert sum(v.numel() for v in state.values()) == DUAL_REF_VAE_NUM_PARAMS == 99_941_907
    decoder = {k: v for k, v in state.items() if k.startswith("decoder.")}
    assert (len(decoder), sum(v.numel() for v in decoder.values())) == (286, 65_778_223)

    listing = _listing("keys_layeranimate_vae_dualref.txt")
    assert _shapes(state) == listing
    tooncrafter = _listing("keys_tooncrafter_first_stage_model.txt")
    assert {k.removeprefix("first_stage_model."): s for k, s in tooncrafter.items()} == listing
    # both layouts load strictly (the ToonCrafter one with its prefix)
    vae.load_ldm_state_dict(_meta_state(listing), assign=True)
    vae.load_ldm_state_dict(_meta_state(tooncrafter), assign=True)


def test_sd_vae_full_size_layout():
    from diffusers import AutoencoderKL

    config = sd_vae_config()
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    assert vae.config.scaling_factor == 0.18215
    ldm = diffusers_to_ldm_vae_state(vae.state_dict())
    assert len(ldm) == SD_VAE_NUM_KEYS == 248
    assert sum(v.numel() for v in ldm.values()) == SD_VAE_NUM_PARAMS == 83_653_863
    assert ldm["decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    back = ldm_to_diffusers_vae_state(ldm, config)
    assert _shapes(back) == _shapes(vae.state_dict())
    vae.load_state_dict(back, strict=True, assign=True)

    listing = _listing("keys_layeranimate_vae.txt")
    assert _shapes(ldm) == listing
    vae.load_state_dict(ldm_to_diffusers_vae_state(_meta_state(listing), config), strict=True, assign=True)
    # the encoder/quant convs + the spatial decoder of the dual-ref VAE form exactly the SD layout
    dual = _listing("keys_tooncrafter_first_stage_model.txt")
    assert _shapes(sd_vae_state_from_dual_ref(_meta_state(dual))) == listing


# ----------------------------------------------------------------------------------------------
# dual-reference VAE numerics (tiny)
# ----------------------------------------------------------------------------------------------


def test_zero_refinement_equals_plain_temporal_decoder():
    vae = _tiny_dual_ref(refinement=False)
    with torch.no_grad():
        dist, refs = vae.encode_with_references(_video())
        z = dist.mode()
        with_refs = vae.decode(z, refs).sample
        plain = vae.decode(z, None, timesteps=z.shape[2]).sample
        assert torch.equal(with_refs, plain)
        trained = _tiny_dual_ref(refinement=True)
        trained.load_state_dict({**trained.state_dict(), **{k: v for k, v in vae.state_dict().items()
                                                            if not k.startswith("decoder.attn_refinement.")}})
        assert (trained.decode(z, refs).sample - plain).abs().max() > 1e-3  # the references do act


def test_combiners_touch_first_and_last_frame_and_cross_attention_every_frame():
    """At the input of conv_out: the final Combiner changes frames 0 and F-1 only; the level-2
    cross-attention (followed by temporal layers) reaches every frame."""
    vae = _tiny_dual_ref(refinement=False)
    seen = []
    vae.decoder.conv_out.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    with torch.no_grad():
        dist, refs = vae.encode_with_references(_video(b=1, f=5))
        z = dist.mode()
        vae.decode(z, None, timesteps=5)
        vae.decoder.attn_refinement[-1].conv.weight.normal_()
        vae.decode(z, refs)
        vae.decoder.attn_refinement[-1].conv.weight.zero_()
        vae.decoder.attn_refinement[2].to_out[0].weight.normal_()
        vae.decode(z, refs)
    plain, combined, attended = seen
    per_frame = (combined - plain).flatten(1).abs().amax(dim=1)
    assert per_frame[0] > 0 and per_frame[-1] > 0 and torch.all(per_frame[1:-1] == 0)
    assert torch.all((attended - plain).flatten(1).abs().amax(dim=1) > 0)


def test_chunked_and_per_frame_encode_equal_batched():
    vae = _tiny_dual_ref()
    frames = _video().transpose(1, 2).reshape(8, 3, 32, 32)
    with torch.no_grad():
        full, hidden = vae.encode(frames, return_hidden_states=True)
        for chunk in (1, 3):
            part, hidden_c = vae.encode(frames, return_hidden_states=True, chunk_size=chunk)
            torch.testing.assert_close(part.latent_dist.parameters, full.latent_dist.parameters, atol=1e-5, rtol=1e-5)
            for a, b in zip(hidden, hidden_c, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        dist, refs = vae.encode_with_references(_video())
        dist1, refs1 = vae.encode_with_references(_video(), chunk_size=1)
        torch.testing.assert_close(dist1.parameters, dist.parameters, atol=1e-5, rtol=1e-5)
        for a, b, c in zip(refs, refs1, vae.reference_context(hidden, 4), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
        # the latents of encode_with_references are the per-frame ones, arranged [B, 8, F, h, w]
        torch.testing.assert_close(dist.parameters.transpose(1, 2).reshape(8, 8, 4, 4),
                                   full.latent_dist.parameters, atol=1e-5, rtol=1e-5)


def test_dual_ref_decode_shapes_and_layouts():
    vae = _tiny_dual_ref()
    with torch.no_grad():
        dist, refs = vae.encode_with_references(_video(b=2, f=2))  # key frames only, as LayerAnimate
        assert [tuple(r.shape) for r in refs] == [(2, 32, 2, 32, 32), (2, 32, 2, 16, 16), (2, 64, 2, 8, 8),
                                                  (2, 64, 2, 4, 4), (2, 32, 2, 32, 32)]
        z = torch.randn(2, 4, 6, 4, 4, generator=torch.Generator().manual_seed(0))
        video = vae.decode(z, refs).sample
        assert video.shape == (2, 3, 6, 32, 32)
        rows = vae.decode(z.transpose(1, 2).reshape(12, 4, 4, 4), refs, timesteps=6).sample
        assert rows.shape == (12, 3, 32, 32)
        torch.testing.assert_close(rows.view(2, 6, 3, 32, 32).transpose(1, 2), video)
        # timesteps inferred from the references' batch; one video per decoder call gives the same
        torch.testing.assert_close(vae.decode(z.transpose(1, 2).reshape(12, 4, 4, 4), refs).sample, rows)
        torch.testing.assert_close(vae.decode(z, refs, videos_per_call=1).sample, video, atol=1e-6, rtol=1e-5)
        # a single video's references broadcast over a batch
        one = [r[:1] for r in refs]
        assert vae.decode(z, one).sample.shape == (2, 3, 6, 32, 32)
        # post_quant_conv is skipped unless asked for (the authors' dual-ref path)
        assert not torch.equal(vae.decode(z, refs, apply_post_quant_conv=True).sample, video)
        with pytest.raises(ShapeError, match=r"ref_context\[2\]"):
            vae.decode(z, [refs[0], refs[1], refs[3], refs[3], refs[4]])
        with pytest.raises(ShapeError, match="timesteps"):
            vae.decode(z.transpose(1, 2).reshape(12, 4, 4, 4), None, timesteps=5)
        out = vae(_video(b=1, f=3)).sample
        assert out.shape == (1, 3, 3, 32, 32)


def test_dual_ref_decoder_runs_in_bf16():
    vae = _tiny_dual_ref()
    with torch.no_grad():
        dist, refs = vae.encode_with_references(_video(b=1, f=4))
        z = dist.mode()
        ref32 = vae.decode(z, refs).sample
        vae.decoder.to(torch.bfloat16)
        out = vae.decode(z, refs).sample
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref32).abs().max() < 0.05 * ref32.abs().max() + 0.05


def test_dual_ref_from_pretrained_layeranimate_folder(tmp_path):
    from layerkit.io.weights import save_weights

    vae = _tiny_dual_ref()
    folder = tmp_path / "vae_dualref"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "AutoencoderKL_Dualref", "_diffusers_version": "0.25.1", "ddconfig": TINY_DDCONFIG,
        "embed_dim": 4, "image_key": "image", "input_dim": 4, "use_checkpoint": False}))
    save_weights(folder / "diffusion_pytorch_model.safetensors", vae.state_dict())
    video = _video(b=1, f=3)
    with torch.no_grad():
        expected = vae(video).sample
        for loaded in (DualRefAutoencoderKL.from_pretrained(str(folder)), load_dual_ref_vae(folder)):
            torch.testing.assert_close(loaded.eval()(video).sample, expected)
        vae.save_pretrained(str(tmp_path / "saved"))
        torch.testing.assert_close(DualRefAutoencoderKL.from_pretrained(str(tmp_path / "saved")).eval()(video).sample,
                                   expected)
    state = {"first_stage_model." + k: v for k, v in vae.state_dict().items()}
    assert load_dual_ref_vae(state).decoder.conv_in.weight.data_ptr() == state["first_stage_model.decoder.conv_in.weight"].data_ptr()
    broken = dict(vae.state_dict())
    del broken["decoder.attn_refinement.2.to_q.weight"]
    with pytest.raises(LayerkitError, match=r"1 missing \(e\.g\. 'decoder\.attn_refinement\.2\.to_q\.weight'\)"):
        load_dual_ref_vae(broken)


# ----------------------------------------------------------------------------------------------
# SD VAE
# ----------------------------------------------------------------------------------------------


def test_sd_vae_ldm_diffusers_round_trip(tmp_path):
    from layerkit.io.weights import save_weights

    torch.manual_seed(0)
    vae = build_sd_vae(TINY_DDCONFIG).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ldm = diffusers_to_ldm_vae_state(vae.state_dict())
    assert "encoder.down.0.block.0.conv1.weight" in ldm and ldm["encoder.mid.attn_1.k.weight"].ndim == 4
    back = ldm_to_diffusers_vae_state(ldm)
    assert back.keys() == vae.state_dict().keys()
    for k, v in vae.state_dict().items():
        assert torch.equal(back[k], v), k

    image = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = vae(image).sample
        folder = tmp_path / "vae"  # LayerAnimate's vae/: the authors' class, LDM names
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "ddconfig": TINY_DDCONFIG,
                                                        "embed_dim": 4, "image_key": "image", "input_dim": 4}))
        save_weights(folder / "diffusion_pytorch_model.safetensors", ldm)
        vae.save_pretrained(str(tmp_path / "diffusers_vae"))
        save_weights(tmp_path / "ldm.safetensors", {"first_stage_model." + k: v for k, v in ldm.items()})
        for source in (folder, tmp_path / "diffusers_vae", tmp_path / "ldm.safetensors", ldm):
            loaded = load_sd_vae(source)
            torch.testing.assert_close(loaded(image).sample, expected)
            assert loaded.config.scaling_factor == 0.18215

        # the LDM encoder of the dual-ref VAE computes what diffusers' encoder computes
        dual = _tiny_dual_ref()
        dual.load_state_dict({**dual.state_dict(), **{k: v for k, v in ldm.items() if not k.startswith("decoder.")}})
        torch.testing.assert_close(dual.encode(image).latent_dist.parameters, vae.encode(image).latent_dist.parameters,
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(LayerkitError, match="'encoder.extra.weight'"):
        ldm_to_diffusers_vae_state({**ldm, "encoder.extra.weight": torch.zeros(1)})
    with pytest.raises(LayerkitError, match="attn_resolutions"):
        sd_vae_config({**TINY_DDCONFIG, "attn_resolutions": [8]})


def test_sd_vae_from_dual_ref_weights():
    dual = _tiny_dual_ref()
    sd = load_sd_vae(dual.state_dict())
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(sd.encode(image).latent_dist.parameters, dual.encode(image).latent_dist.parameters,
                                   atol=1e-5, rtol=1e-5)
        # decoder = the video decoder's spatial part: equal to it with the temporal layers skipped
        z = torch.randn(1, 4, 4, 4)
        dec = dual.decoder
        h = dec.conv_in(dual.post_quant_conv(z))
        h = dec.mid.block_2(dec.mid.attn_1(dec.mid.block_1(h)))
        for i in reversed(range(dec.num_resolutions)):
            for block in dec.up[i].block:
                h = block(h)
            if i:
                h = dec.up[i].upsample(h)
        h = dec.conv_out(torch.nn.functional.silu(dec.norm_out(h)))
        torch.testing.assert_close(sd.decode(z).sample, h, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# model.ckpt
# ----------------------------------------------------------------------------------------------


def _synthetic_checkpoint():
    """A ToonCrafter-shaped flat state dict: tiny dual-ref VAE, tiny OpenCLIP towers, a few UNet and
    Resampler tensors, the 13 DDPM buffers."""
    vae = _tiny_dual_ref()
    tok = encoders.tiny_tokenizer()
    text = {**encoders.TINY_TEXT, "vocab_size": len(tok)}
    openclip = encoders.random_openclip_state(text, encoders.TINY_VISION, encoders.TINY_EMBED_DIM)
    state = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(32, 8, 3, 3),
             "model.diffusion_model.input_blocks.1.0.temopral_conv.conv1.0.weight": torch.randn(32),
             "model.diffusion_model.time_embed.0.weight": torch.randn(128, 32),
             "image_proj_model.latents": torch.randn(1, 8, 32)}
    state.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    state.update({"cond_stage_model.model." + k: v for k, v in openclip.items() if not k.startswith("visual.")})
    state.update({"embedder.model." + k: v.clone() for k, v in openclip.items() if not k.startswith("transformer.")})
    state.update({name: torch.linspace(0, 1, 1000) for name in ckpt.DDPM_BUFFERS})
    return state, vae, openclip


def test_split_model_ckpt_through_load_weights(tmp_path):
    state, vae, openclip = _synthetic_checkpoint()
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 1000}, path)
    parts = ckpt.read_tooncrafter_checkpoint(path)
    assert set(parts) == {"unet", "vae", "text_encoder", "image_encoder", "image_projector"}
    assert len(parts["vae"]) == len(vae.state_dict())
    assert "input_blocks.0.0.weight" in parts["unet"] and "latents" in parts["image_projector"]
    assert sum(len(p) for p in parts.values()) == len(state) - 13
    assert "visual.conv1.weight" in parts["image_encoder"] and "token_embedding.weight" in parts["image_encoder"]

    built = ckpt.build_components(parts)
    video = _video(b=1, f=3)
    with torch.no_grad():
        torch.testing.assert_close(built["vae"](video).sample, vae(video).sample)
        assert built["text_encoder"].config.num_hidden_layers == encoders.TINY_TEXT["layers"] - 1
        assert built["image_encoder"].config.num_hidden_layers == encoders.TINY_VISION["layers"]
        image = torch.rand(1, 3, 32, 32) * 2 - 1
        torch.testing.assert_close(built["sd_vae"].encode(image).latent_dist.parameters,
                                   vae.encode(image).latent_dist.parameters, atol=1e-5, rtol=1e-5)

    # DeepSpeed-prefixed keys (e.g. a safetensors conversion of {"module": ...}) split the same way
    from layerkit.io.weights import save_weights

    save_weights(tmp_path / "ds.safetensors", {"_forward_module." + k: v for k, v in state.items()})
    parts_ds = ckpt.read_tooncrafter_checkpoint(tmp_path / "ds.safetensors")
    assert {k: len(v) for k, v in parts_ds.items()} == {k: len(v) for k, v in parts.items()}


def test_unet_and_projector_names_through_convert():
    pytest.importorskip("layerkit_plugins.tooncrafter.convert")
    state, _, _ = _synthetic_checkpoint()
    out = ckpt.unet_and_projector_states(ckpt.split_tooncrafter_checkpoint(state))
    assert "time_embed.linear_1.weight" in out["unet"] and "latents" in out["image_projector"]


def test_not_a_tooncrafter_checkpoint_is_one_sentence(tmp_path):
    state, _, _ = _synthetic_checkpoint()
    layerflow = {"transformer.transformer_blocks.0.attn1.to_q.weight": torch.zeros(2, 2)}
    sd15 = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
            "first_stage_model.encoder.conv_in.weight": torch.zeros(1),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(1)}
    torch.save(layerflow, tmp_path / "layerflow.ckpt")
    torch.save({"state_dict": sd15}, tmp_path / "sd15.ckpt")
    cases = {tmp_path / "layerflow.ckpt": "it has no model.diffusion_model.* keys",
             tmp_path / "sd15.ckpt": "has no temporal layers"}
    for path, reason in cases.items():
        with pytest.raises(LayerkitError) as info:
            ckpt.read_tooncrafter_checkpoint(path)
        message = str(info.value)
        assert f"'{path}' is not a ToonCrafter checkpoint: " in message and reason in message
        assert message.count(". ") == 0 and message.endswith(".") and "\n" not in message
    assert not ckpt.is_tooncrafter_checkpoint(sd15) and ckpt.is_tooncrafter_checkpoint(state)

    with pytest.raises(LayerkitError, match=r"unexpected key 'model_ema\.decay'"):
        ckpt.split_tooncrafter_checkpoint({**state, "model_ema.decay": torch.tensor(0.99)})

    good = tmp_path / "model.ckpt"
    torch.save({"state_dict": state}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(LayerkitError) as info:
        ckpt.read_tooncrafter_checkpoint(truncated)
    assert str(truncated) in str(info.value) and "\n" not in str(info.value)


def test_full_size_model_ckpt_layout_splits_and_builds_on_meta():
    """A meta-device model.ckpt with the released layout: every component has its published key
    count and the VAE/encoder parts build with no missing or unexpected key."""
    listings = {"model.diffusion_model.": _listing("keys_tooncrafter_unet.txt"),
                "first_stage_model.": {k.removeprefix("first_stage_model."): s
                                       for k, s in _listing("keys_tooncrafter_first_stage_model.txt").items()},
                "image_proj_model.": _listing("keys_tooncrafter_image_proj_model.txt")}
    full = encoders.openclip_state_shapes()
    listings["cond_stage_model.model."] = {k: s for k, s in full.items() if not k.startswith("visual.")}
    listings["embedder.model."] = {k: s for k, s in full.items() if not k.startswith("transformer.")}
    state = {p + k: torch.empty(s, device="meta") for p, shapes in listings.items() for k, s in shapes.items()}
    state.update({name: torch.empty(1000, device="meta") for name in ckpt.DDPM_BUFFERS})
    parts = ckpt.split_tooncrafter_checkpoint(state)
    assert {k: len(v) for k, v in parts.items()} == {"unet": 1516, "vae": 396, "text_encoder": 294,
                                                     "image_encoder": 398, "image_projector": 51}
    built = ckpt.build_components(parts)
    assert sum(p.numel() for p in built["vae"].parameters()) == DUAL_REF_VAE_NUM_PARAMS
    assert sum(p.numel() for p in built["sd_vae"].parameters()) == SD_VAE_NUM_PARAMS
    assert built["text_encoder"].config.num_hidden_layers == 23
    assert built["image_encoder"].config.num_hidden_layers == 32
