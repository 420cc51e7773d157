"""The toy transparent model's components: a small SD 1.5-shaped set of diffusers modules for
8-frame 32x32 RGBA clips, saved exactly the way users hold the real model.

No pretrained SD 1.5, AnimateDiff or LayerDiffuse weights exist offline, so the toy trains its
own base (see ``train.py``): the same classes as the real model (``UNet2DConditionModel`` +
``MotionAdapter`` -> ``UNetMotionModel``, ``AutoencoderKL``, a CLIP text
encoder, LayerDiffuse's offset encoder and transparent decoder), scaled down:

- VAE: 3 levels (4x downsampling; SD 1.5 has 8x), 4 latent channels: a 32x32 frame -> 8x8 latent.
  At 8x (4x4 latents) a sprite of 10-14 pixels covers about one latent pixel and every stage-2
  model stayed below simply repeating the reference frame (alpha IoU 0.39-0.57 against 0.72 on 64
  test clips; the model card at commit effb7c7), so the toy keeps SD's object-to-latent-pixel scale rather than
  its factor;
- UNet: 2 levels (32, 64), cross-attention width 32 at both levels (SD 1.5 reads the text at
  three of its four levels; the first level alone was enough for the pilot that followed the
  direction word, see the model card); motion module as the tiny AnimateDiff;
- text: a byte-level CLIP tokenizer whose merges make each shapes-world word one token (16
  tokens per prompt), a 2-layer CLIP text model of width 32, pretrained contrastively on
  shapes-world clips and their prompts (``clip.py``, stage T of ``train.py``: CLIP's role) and
  frozen;
- schedule: AnimateDiff's linear betas rescaled to zero terminal SNR, v-prediction, trailing
  timesteps (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps Are Flawed",
  sec. 3; AnimateDiff's linear betas keep SNR 0.0016 at the last step). With the contrastive
  text encoder this made an image-to-video pilot follow the prompt's direction word, where
  each alone did not (the model card's pilots);
- LayerDiffuse offset encoder (three levels, channels 8, 16, 16: 4x, as the VAE) and transparent
  decoder (levels 8, 8, 16, 16, the latent entering at 1/4 resolution, ``latent_block`` 2).

On disk (``save_base``): ``sd15/`` (unet, vae, text_encoder, tokenizer, scheduler),
``motion_adapter/``, ``transparent_encoder.safetensors`` and ``transparent_decoder.safetensors``,
which ``backbone=animatediff`` loads through the same code path as the published files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FRAMES = 8
SIZE = 32
TEXT_TOKENS = 16
#: every word of a shapes-world sprite prompt ("a red circle moving right", "a cyan cross standing still")
WORDS = ("a", "red", "green", "blue", "yellow", "magenta", "cyan", "circle", "square", "triangle", "cross",
         "moving", "standing", "still", "left", "right", "up", "down")

UNET_CONFIG = dict(
    block_out_channels=(32, 64), layers_per_block=1, sample_size=SIZE // 4, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)
VAE_CONFIG = dict(
    block_out_channels=(16, 32, 32), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
    sample_size=SIZE, scaling_factor=0.18215,
)
TEXT_CONFIG = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=TEXT_TOKENS, projection_dim=32)
# written out rather than imported from animatediff.tiny: the committed weights have these sizes
MOTION_CONFIG = dict(block_out_channels=(32, 64), motion_layers_per_block=1, motion_norm_num_groups=8,
                     motion_num_attention_heads=2, motion_max_seq_length=32, use_motion_mid_block=True)
ENCODER_CONFIG = dict(channels=[8, 16, 16])  # three levels: 4x, as the VAE
DECODER_CONFIG = dict(block_out_channels=[8, 8, 16, 16], down_block_types=["DownBlock2D"] * 3 + ["AttnDownBlock2D"],
                      up_block_types=["AttnUpBlock2D"] + ["UpBlock2D"] * 3, layers_per_block=1, attention_head_dim=8,
                      norm_num_groups=4, latent_block=2)  # the latent enters at 1/4 resolution
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing",
                        prediction_type="v_prediction", rescale_betas_zero_snr=True)


def build_components(seed: int = 0) -> dict[str, Any]:
    """Seeded, untrained components (the keyword arguments of ``AnimateDiff``)."""
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from layerkit_plugins.animatediff.layerdiffuse import LatentTransparencyOffsetEncoder, TransparentDecoder
    from layerkit_plugins.animatediff.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer(TEXT_TOKENS, words=WORDS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts: dict[str, Any] = {
            "unet": UNet2DConditionModel(**UNET_CONFIG),
            "motion_adapter": MotionAdapter(**MOTION_CONFIG),
            "vae": AutoencoderKL(**VAE_CONFIG),
            "text_encoder": CLIPTextModel(CLIPTextConfig(
                vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, **TEXT_CONFIG)),
            "offset_encoder": LatentTransparencyOffsetEncoder(**ENCODER_CONFIG),
            "transparent_decoder": TransparentDecoder(**DECODER_CONFIG),
        }
    parts["tokenizer"] = tokenizer
    parts["scheduler_config"] = dict(SCHEDULER_CONFIG)
    return parts


def build_backbone(seed: int = 0):
    """An ``AnimateDiff`` backbone of untrained toy components."""
    from layerkit_plugins.animatediff.backbone import AnimateDiff

    return AnimateDiff(**build_components(seed))


def split_unet(denoiser) -> tuple[Any, Any]:
    """A ``UNetMotionModel`` -> (``UNet2DConditionModel``, ``MotionAdapter``) holding its weights."""
    from diffusers import MotionAdapter, UNet2DConditionModel

    state = denoiser.state_dict()
    unet = UNet2DConditionModel(**UNET_CONFIG)
    own = unet.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise RuntimeError(f"the motion UNet lacks 2D UNet weights {missing[:3]}")
    unet.load_state_dict({k: state[k] for k in own})
    adapter = MotionAdapter(**MOTION_CONFIG)
    adapter_state = adapter.state_dict()
    missing = [k for k in adapter_state if k not in state]  # the motion modules keep their names
    if missing:
        raise RuntimeError(f"the motion UNet lacks motion-module weights {missing[:3]}")
    adapter.load_state_dict({k: state[k] for k in adapter_state})
    return unet, adapter


def save_base(directory: str | Path, backbone) -> dict[str, Path]:
    """Write a trained toy ``AnimateDiff`` as users hold the real model: an SD 1.5 diffusers folder,
    a MotionAdapter folder and the two LayerDiffuse safetensors. Returns their paths."""
    from diffusers import DDIMScheduler
    from safetensors.torch import save_file

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    unet, adapter = split_unet(backbone.denoiser)
    sd = root / "sd15"
    unet.save_pretrained(str(sd / "unet"))
    backbone.vae.save_pretrained(str(sd / "vae"))
    backbone.text_encoder.save_pretrained(str(sd / "text_encoder"))
    backbone.tokenizer.save_pretrained(str(sd / "tokenizer"))
    DDIMScheduler(**backbone.scheduler_config).save_pretrained(str(sd / "scheduler"))
    adapter.save_pretrained(str(root / "motion_adapter"))
    enc, dec = root / "transparent_encoder.safetensors", root / "transparent_decoder.safetensors"
    save_file({k: v.detach().contiguous() for k, v in backbone.offset_encoder.state_dict().items()}, str(enc))
    save_file({k: v.detach().contiguous() for k, v in backbone.transparent_decoder.state_dict().items()}, str(dec))
    return {"path": sd, "motion_adapter": root / "motion_adapter", "transparent_encoder": enc,
            "transparent_decoder": dec}


def load_base(directory: str | Path):
    """The ``AnimateDiff`` backbone of a folder written by ``save_base`` (the experiments' loader)."""
    from layerkit_plugins.animatediff.backbone import from_pretrained

    root = Path(directory)
    return from_pretrained(path=str(root / "sd15"), motion_adapter=str(root / "motion_adapter"),
                           transparent_encoder=str(root / "transparent_encoder.safetensors"),
                           transparent_decoder=str(root / "transparent_decoder.safetensors"),
                           encoder_config=ENCODER_CONFIG, decoder_config=DECODER_CONFIG,
                           scheduler={k: v for k, v in SCHEDULER_CONFIG.items() if k != "num_train_timesteps"})


def package_weights() -> Path:
    """The committed weights folder inside the installed package (``toy/weights``)."""
    import importlib.resources

    return Path(str(importlib.resources.files("layerkit_plugins.transparent.toy") / "weights"))
