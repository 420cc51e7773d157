"""The toy LayerFlow model: a tiny CogVideoX-shaped set of diffusers components for 32x32 clips.

Same classes as CogVideoX-2B (``CogVideoXTransformer3DModel``, ``AutoencoderKLCogVideoX``, a T5
encoder, ``CogVideoXDDIMScheduler``), scaled down so that the whole pipeline trains on two CPU
cores:

- VAE: three CogVideoX down/up blocks (8, 16, 32 channels), 8 latent channels, 4x spatial and
  4x temporal compression: a 9-frame 32x32 clip -> 3 x 8 x 8 latents ((F - 1) // 4 + 1 frames)
  (a VAE grown to CogVideoX's 16 channels, ``train_vae --latent-channels 16``, was tried and not
  kept: the model card);
- transformer: 6 blocks, 4 heads of 32 (width 128), its input and output channels the VAE's
  latent channels (``build_components``), patch 2 (16 tokens per latent frame; patch 1
  and width 64 were tried, see the model card), sincos positions (CogVideoX-2B style) with a
  spatial interpolation scale of 0.3 instead of 2B's 1.875 (2B's scale spreads a 30x45 token grid;
  on this 4x4 grid it leaves neighbouring tokens' position embeddings at cosine 0.996, so no layer's
  token can find the blended token at its place: ``toy-layerflow-diagnose positions``), 16 text
  tokens per prompt block;
- text encoder: a 2-layer T5 (width 64) over the offline shapes-world tokenizer of the cogvideox
  backbone (random and frozen: the shapes vocabulary is small and the denoiser learns to read it);
- scheduler: CogVideoX-2B's (v-prediction, zero terminal SNR, SNR shift 3).

The committed ``toy/weights/transformer/`` is this seeded transformer after its text-to-video
pretraining (``+experiment=toy_layerflow_base``, then ``toy.export pretrained``).
"""

from __future__ import annotations

from typing import Any

import torch

FRAMES = 8            # per layer: the packed 32-frame clip goes through the VAE in one pass, in chunks of
                      # 8 frames (4x time compression): 2 latent frames per layer, 8 in all (9 with the
                      # frame-0 copy fg2bg and bg2fg put in front: 33 frames)
SIZE = 32             # height = width
TEXT_TOKENS = 16      # per prompt block ("0, ...", "1, ...", "2, ...")
TOKEN_PIXELS = 8      # each video token covers 8x8 pixels: patch 2 on a 4x VAE's latents, patch 4 on a 2x one's
SPRITE_SIZE = (0.55, 0.8)  # the toy's world: sprites of 0.55-0.8 of the frame (the shapes world's own: 0.3-0.45),
                           # as toy_layerflow_common.yaml's task.shapes_world and the stages' data.sprite_size

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 3,
    up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(8, 16, 32), latent_channels=8,
    layers_per_block=1, norm_num_groups=4, temporal_compression_ratio=4, sample_height=SIZE, sample_width=SIZE,
)
TRANSFORMER_CONFIG = dict(
    num_attention_heads=4, attention_head_dim=32, in_channels=8, out_channels=8, time_embed_dim=32,  # channels: the VAE's
    text_embed_dim=64, num_layers=6, sample_width=SIZE // 4, sample_height=SIZE // 4, sample_frames=FRAMES,
    patch_size=2, temporal_compression_ratio=4, max_text_seq_length=TEXT_TOKENS,
    use_rotary_positional_embeddings=False, spatial_interpolation_scale=0.3,
)
T5_CONFIG = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                 dropout_rate=0.0, is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
                 decoder_start_token_id=0)


def compression_changes(spatial: int) -> dict[str, Any]:
    """``VAE_CONFIG`` changes for a VAE of ``spatial`` x spatial compression (2 or 4, the committed).

    diffusers' ``AutoencoderKLCogVideoX`` compresses time in the same down blocks as space (each
    block but the last halves both, at most ``log2(temporal_compression_ratio)`` of them in time),
    so 2x spatial is also 2x temporal: 32 packed frames of 32x32 -> 16 latent frames of 16x16."""
    if spatial not in (2, 4):
        raise ValueError(f"spatial compression must be 2 or 4 (the committed VAE's); got {spatial}.")
    blocks = {2: 2, 4: 3}[spatial]
    return {"down_block_types": ("CogVideoXDownBlock3D",) * blocks, "up_block_types": ("CogVideoXUpBlock3D",) * blocks,
            "block_out_channels": VAE_CONFIG["block_out_channels"][:blocks], "temporal_compression_ratio": spatial}


def vae_compression(vae: Any) -> tuple[int, int]:
    """(spatial, temporal) compression of a CogVideoX VAE, from its config."""
    return 2 ** (len(vae.config.block_out_channels) - 1), int(vae.config.temporal_compression_ratio)


def build_vae(seed: int = 0, **changes: Any):
    from diffusers import AutoencoderKLCogVideoX

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLCogVideoX(**{**VAE_CONFIG, **changes})


def build_components(seed: int = 0, vae: Any = None, **transformer_changes: Any) -> dict[str, Any]:
    """Seeded toy components (the VAE given, e.g. trained by ``toy.train_vae``, or a fresh one; the
    transformer reads and predicts that VAE's latent channels, is sized for its latent grid and
    patches it into tokens of ``TOKEN_PIXELS`` pixels; ``transformer_changes`` override all that and
    ``TRANSFORMER_CONFIG``, for measurements)."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    from layerkit_plugins.cogvideox.backbone import SCHEDULER_CONFIG, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    vae = vae if vae is not None else build_vae(seed)
    channels = int(vae.config.latent_channels)  # the transformer reads and predicts the VAE's latents
    spatial, temporal = vae_compression(vae)     # and is sized for its latent grid
    transformer_changes = {"in_channels": channels, "out_channels": channels, "sample_width": SIZE // spatial,
                           "sample_height": SIZE // spatial, "temporal_compression_ratio": temporal,
                           "patch_size": TOKEN_PIXELS // spatial, **transformer_changes}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        transformer = CogVideoXTransformer3DModel(**{**TRANSFORMER_CONFIG, **transformer_changes})
        text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), **T5_CONFIG))
    return {"transformer": transformer.eval(), "vae": vae.eval(),
            "text_encoder": text_encoder.eval(), "tokenizer": tokenizer,
            "scheduler": CogVideoXDDIMScheduler(**SCHEDULER_CONFIG)}


def toy_world(**fields: Any) -> Any:
    """The ShapesConfig of the toy's clips (``FRAMES`` frames of ``SIZE`` x ``SIZE``, sprites of
    ``SPRITE_SIZE``), with ``fields`` changed: what the stages train on and sampling scores."""
    from layerkit.data.shapes import ShapesConfig

    return ShapesConfig(**{"num_frames": FRAMES, "height": SIZE, "width": SIZE, "sprite_size": SPRITE_SIZE, **fields})
