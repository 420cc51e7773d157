"""The toy LayerAnimate's architecture: a small ToonCrafter for 8 frames of 32 x 32.

- VAE: a diffusers ``AutoencoderKL`` with 4x spatial compression (blocks 16/32/64, one ResNet
  each, 4 latent channels): 32 x 32 frames -> 4 x 8 x 8 latents; trained by ``toy.train_vae``
  (a deterministic encoder: the posterior's log-variance head is zeroed after training).
- UNet: ``ToonCrafterUNet`` at 32 channels, levels 32/32/64 (8 x 8, 4 x 4, 2 x 2 latents), one
  ResBlock per level, spatial+temporal transformers at the first two levels, 8 frames
  (``temporal_length``), context width 32: 1.9 M parameters, trained from scratch on
  image-to-video and interpolation (``+experiment=toy_layeranimate_base``).
- Conditioning encoders: the tiny OpenCLIP towers of ``tooncrafter.encoders`` (text: 3 layers of
  32; vision: 2 layers of 64 on 56 x 56), **random and frozen**, with a tokenizer whose merges
  cover the shapes world's words (each word one token), and a Resampler (2 queries per frame),
  also random and frozen (only the UNet trains; the first frame reaches it through the
  concatenated image latent as well).
- No dual-reference decoder: interpolations decode with the SD-style VAE (``backbone.dual_ref``
  false, ``decoder`` sd).
- Layer ControlNet: the UNet encoder's copy, with a trajectory encoder of 16/32/64 channels and
  two stride-2 steps (4x, the VAE's compression; the released one has three, 8x).
"""

from __future__ import annotations

from typing import Any

import torch

FRAMES, SIZE = 8, 32
SEED = 0

TOY_UNET: dict[str, Any] = dict(in_channels=8, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
                                num_res_blocks=1, channel_mult=[1, 1, 2], dropout=0.0, num_head_channels=16,
                                context_dim=32, temporal_length=FRAMES, default_fps=8)
TOY_RESAMPLER: dict[str, Any] = dict(dim=32, depth=1, dim_head=16, heads=2, num_queries=2, embedding_dim=64,
                                     output_dim=32, ff_mult=2, video_length=FRAMES)
TOY_VAE: dict[str, Any] = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                               up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64),
                               layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=SIZE)
#: the Layer ControlNet's trajectory encoder: 4x down-sampling to the toy's latent size
TOY_TRAJECTORY_CHANNELS = (16, 32, 64)

#: every word of shapes-world prompts (``layerkit.data.shapes``): one BPE token each
WORDS = ("a", "and", "over", "moving", "standing", "still", "drifting", "left", "right", "up", "down",
         "red", "green", "blue", "yellow", "magenta", "cyan", "white", "black",
         "circle", "square", "triangle", "cross", "stripes", "gradient", "checker", "dots")


def build_vae(seed: int = SEED):
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**TOY_VAE)


def build_components(seed: int = SEED, vae: Any = None, unet: Any = None) -> dict[str, Any]:
    """The base components (``tooncrafter.backbone.save_components`` writes them as a folder): the
    seeded untrained UNet unless ``unet`` is given, the VAE (``vae`` or a seeded untrained one), the
    tiny random CLIP towers with the shapes-word tokenizer, the seeded Resampler, DDIM's config."""
    from layerkit_plugins.tooncrafter.backbone import SCHEDULER_CONFIG
    from layerkit_plugins.tooncrafter.encoders import (
        TINY_EMBED_DIM,
        TINY_TEXT,
        TINY_VISION,
        image_encoder_from_openclip,
        random_openclip_state,
        text_encoder_from_openclip,
        tiny_tokenizer,
    )
    from layerkit_plugins.tooncrafter.resampler import Resampler
    from layerkit_plugins.tooncrafter.unet import ToonCrafterUNet

    tokenizer = tiny_tokenizer(WORDS)
    state = random_openclip_state({**TINY_TEXT, "vocab_size": len(tokenizer)}, TINY_VISION, TINY_EMBED_DIM, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = unet if unet is not None else ToonCrafterUNet(**TOY_UNET)
        projector = Resampler(**TOY_RESAMPLER)
    return {"unet": unet.eval(), "image_projector": projector.eval(),
            "vae": (vae if vae is not None else build_vae(seed)).eval(), "vae_dualref": None,
            "text_encoder": text_encoder_from_openclip(state, heads=TINY_TEXT["heads"]).eval(),
            "image_encoder": image_encoder_from_openclip(state, heads=TINY_VISION["heads"]).eval(),
            "tokenizer": tokenizer, "scheduler_config": dict(SCHEDULER_CONFIG)}
