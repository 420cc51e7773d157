"""Tiny AnimateDiff + LayerDiffuse components built from configs on the spot (seeded), for
tests and the shapes world. Same classes as the real model, a few thousand times smaller:
UNet 2 levels (32, 64), VAE 4 levels (8x downsampling like SD 1.5), CLIP 2 layers of 32, a
byte-level CLIP tokenizer written to a temporary folder, LayerDiffuse encoder/decoder slimmed.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from layerkit_plugins.animatediff.layerdiffuse import LatentTransparencyOffsetEncoder, TransparentDecoder

#: the tiny MotionAdapter's config (head count and norm groups are not stored in the weights)
TINY_MOTION = {"block_out_channels": (32, 64), "motion_layers_per_block": 1, "motion_norm_num_groups": 8,
               "motion_num_attention_heads": 2, "motion_max_seq_length": 32, "use_motion_mid_block": True}
#: the tiny transparent decoder: 4 levels, latent injected at 1/8 like the published one
TINY_DECODER = {"block_out_channels": (8, 8, 16, 16), "down_block_types": ("DownBlock2D",) * 3 + ("AttnDownBlock2D",),
                "up_block_types": ("AttnUpBlock2D",) + ("UpBlock2D",) * 3, "layers_per_block": 1,
                "attention_head_dim": 8, "norm_num_groups": 4, "latent_block": 3}
TINY_ENCODER = {"channels": (8, 8, 16, 16)}
DEFAULT_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                     "beta_schedule": "linear", "clip_sample": False, "set_alpha_to_one": False,
                     "steps_offset": 1, "timestep_spacing": "linspace", "prediction_type": "epsilon"}


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tiny_tokenizer(max_length: int = 16, words: tuple[str, ...] = ()):
    """A CLIPTokenizer over single bytes (plus merges for ``words``), written to a temp folder.

    Each of ``words`` becomes one token: BPE runs on it with every merge so far, and while more
    than one piece is left the first two are joined by a merge appended to the list (so "green"
    after "red" joins the "g", "re", "e", "n" that red's merge ``r e`` leaves). An appended merge
    ranks after all earlier ones, so it changes no earlier word's tokens."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab: dict[str, int] = {}
    for c in chars + [c + "</w>" for c in chars]:
        vocab[c] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in words:
        while len(pieces := _bpe(list(word[:-1]) + [word[-1] + "</w>"], {m: r for r, m in enumerate(merges)})) > 1:
            merges.append((pieces[0], pieces[1]))
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory(prefix="layerkit-tok-") as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer(vocab=str(Path(tmp) / "vocab.json"), merges=str(Path(tmp) / "merges.txt"),
                             model_max_length=max_length)


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word's pieces as CLIP does it: join every occurrence of the
    best-ranked adjacent pair until no pair has a rank."""
    while len(pieces) > 1:
        ranked = [ranks[p] for p in zip(pieces, pieces[1:]) if p in ranks]
        if not ranked:
            break
        best = min(ranked)
        joined: list[str] = []
        for piece in pieces:
            if joined and ranks.get((joined[-1], piece)) == best:
                joined[-1] += piece
            else:
                joined.append(piece)
        pieces = joined
    return pieces


def tiny_components(seed: int = 0, text_tokens: int = 16, transparent: bool = True) -> dict[str, Any]:
    """unet (UNet2DConditionModel), motion_adapter, vae, text_encoder, tokenizer, scheduler_config,
    and (with ``transparent``) offset_encoder and transparent_decoder, all seeded."""
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=4, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    motion_adapter = MotionAdapter(**TINY_MOTION)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
        sample_size=32, scaling_factor=0.18215,
    )
    tokenizer = tiny_tokenizer(text_tokens, words=("a", "the", "red", "green", "blue", "circle", "square", "moving"))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=text_tokens, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=32,
    ))
    parts: dict[str, Any] = {"unet": unet, "motion_adapter": motion_adapter, "vae": vae, "text_encoder": text_encoder,
                             "tokenizer": tokenizer, "scheduler_config": dict(DEFAULT_SCHEDULER)}
    if transparent:
        parts["offset_encoder"] = LatentTransparencyOffsetEncoder(**TINY_ENCODER)
        parts["transparent_decoder"] = TransparentDecoder(**TINY_DECODER)
    return parts


def random_transparent_attn_state(unet: torch.nn.Module, seed: int = 0, rank: int = 256,
                                  strength: float = 1.0) -> dict[str, torch.Tensor]:
    """Seeded random weights for LayerDiffuse's transparent attention on ``unet``, under the
    published key names (``hookers.layers.N.…``, see ``transparent_attn.py``) and the
    published rank (256): the stand-in for ``layer_sd15_transparent_attn.safetensors``."""
    from layerkit_plugins.animatediff.transparent_attn import TransparentAttention

    generator = torch.Generator().manual_seed(seed)
    shapes = {k: tuple(v.shape) for k, v in TransparentAttention(unet, rank=rank).state_dict().items()}
    state = {}
    for key, shape in shapes.items():
        if key.endswith("temporal_n.weight"):
            state[key] = torch.ones(shape)
        elif key.endswith("temporal_n.bias"):
            state[key] = torch.zeros(shape)
        else:
            std = 0.05 if ("lora" in key or "temporal_o" in key) else shape[-1] ** -0.5
            state[key] = torch.randn(shape, generator=generator) * std * strength
    return state


def save_tiny(directory: str | Path, seed: int = 0, text_tokens: int = 16) -> dict[str, Path]:
    """Write the tiny model the way users hold the real one: an SD 1.5 diffusers folder, a
    MotionAdapter folder and the three LayerDiffuse safetensors (transparent encoder,
    decoder and attention). Returns their paths."""
    from diffusers import DDIMScheduler
    from safetensors.torch import save_file

    root = Path(directory)
    parts = tiny_components(seed, text_tokens)
    sd = root / "sd15"
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        parts[name].save_pretrained(str(sd / name))
    DDIMScheduler(**parts["scheduler_config"]).save_pretrained(str(sd / "scheduler"))
    parts["motion_adapter"].save_pretrained(str(root / "motion_adapter"))
    enc, dec = root / "transparent_encoder.safetensors", root / "transparent_decoder.safetensors"
    save_file({k: v.contiguous() for k, v in parts["offset_encoder"].state_dict().items()}, str(enc))
    save_file({k: v.contiguous() for k, v in parts["transparent_decoder"].state_dict().items()}, str(dec))
    attn = root / "transparent_attn.safetensors"
    save_file(random_transparent_attn_state(parts["unet"], seed=seed), str(attn))
    return {"path": sd, "motion_adapter": root / "motion_adapter", "transparent_encoder": enc,
            "transparent_decoder": dec, "transparent_attn": attn}
