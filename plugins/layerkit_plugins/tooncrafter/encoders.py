"""ToonCrafter's text and image conditioning encoders as transformers CLIP models.

Both are OpenCLIP ViT-H-14 (``laion2b_s32b_b79k``) towers (ToonCrafter
``lvdm/modules/encoders/condition.py``):

* **text** (``FrozenOpenCLIPEmbedder(layer="penultimate")``, ``cond_stage_model.model.*``): token +
  position embedding, all residual blocks but the last, then ``ln_final`` -> ``[B, 77, 1024]``. That is
  exactly the SD 2.x text encoder: a ``CLIPTextModel`` with 23 layers of width 1024 (GELU, causal mask)
  whose ``last_hidden_state`` (after ``final_layer_norm``) is the output. Tokens: the CLIP BPE, 77
  positions, start/end tokens, **zero padding** (``open_clip.tokenize``); :func:`tokenize` pads with 0
  whatever pad token the tokenizer declares.
* **image** (``FrozenOpenCLIPImageEmbedderV2``, ``embedder.model.visual.*``): the 257 tokens of the
  vision transformer before ``ln_post``/``proj`` -> ``[B, 257, 1280]`` = ``CLIPVisionModel``'s
  ``last_hidden_state``. Pre-processing (:func:`preprocess_images`): the [-1, 1] frame is resized
  directly to 224 x 224 as ``kornia.geometry.resize(..., interpolation="bicubic", align_corners=True,
  antialias=True)`` does it (a Gaussian pre-blur with sigma ``(scale - 1) / 2`` when shrinking, then
  bicubic with ``align_corners=True``; no crop, aspect not kept), then ``(x + 1) / 2`` and the OpenAI
  CLIP mean/std.

Converters take OpenCLIP key names (a full ``open_clip`` state dict, ToonCrafter's
``cond_stage_model.model.*`` / ``embedder.model.*`` with the prefix stripped): the text side through
diffusers' ``convert_open_clip_checkpoint``, the vision side here. The text tower's last block,
``text_projection``, ``logit_scale`` and the vision ``proj`` are unused by ToonCrafter and dropped;
any other unknown key is an error.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from layerkit.errors import LayerkitError, ShapeError

#: OpenAI CLIP normalisation used by OpenCLIP ViT-H-14
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: text positions of every OpenCLIP model (and of the ToonCrafter UNet's context)
TEXT_TOKENS = 77

#: OpenCLIP ViT-H-14 (``open_clip.get_model_config("ViT-H-14")``): towers in OpenCLIP terms
VIT_H_14_TEXT: dict[str, Any] = {"width": 1024, "layers": 24, "heads": 16, "vocab_size": 49408,
                                 "context_length": TEXT_TOKENS, "mlp_ratio": 4.0}
VIT_H_14_VISION: dict[str, Any] = {"width": 1280, "layers": 32, "heads": 16, "patch_size": 14, "image_size": 224,
                                   "mlp_ratio": 4.0}
VIT_H_14_EMBED_DIM = 1024

#: tiny towers for tests (OpenCLIP terms); the tiny vocabulary is the tiny tokenizer's
TINY_TEXT: dict[str, Any] = {"width": 32, "layers": 3, "heads": 2, "vocab_size": None,
                             "context_length": TEXT_TOKENS, "mlp_ratio": 4.0}
TINY_VISION: dict[str, Any] = {"width": 64, "layers": 2, "heads": 4, "patch_size": 14, "image_size": 56, "mlp_ratio": 4.0}
TINY_EMBED_DIM = 16

#: keys of an OpenCLIP text tower / CLIP head that ToonCrafter does not use
_TEXT_UNUSED = ("text_projection", "logit_scale", "attn_mask")
_TEXT_TOP = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias")
_VISION_UNUSED = ("visual.proj",)
_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_RESBLOCK_PARAMS = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}


# ----------------------------------------------------------------------------------------------
# configs and the OpenCLIP key layout
# ----------------------------------------------------------------------------------------------


def text_config(width: int = 1024, layers: int = 24, heads: int = 16, vocab_size: int = 49408,
                context_length: int = TEXT_TOKENS, mlp_ratio: float = 4.0, used_layers: int | None = None,
                bos_token_id: int | None = None, eos_token_id: int | None = None):
    """``CLIPTextConfig`` of an OpenCLIP text tower run up to ``used_layers`` (default: penultimate,
    ``layers - 1``; the SD 2.x text encoder for ViT-H-14)."""
    from transformers import CLIPTextConfig

    used = layers - 1 if used_layers is None else used_layers
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=int(width * mlp_ratio), num_hidden_layers=used,
        num_attention_heads=heads, max_position_embeddings=context_length, hidden_act="gelu", layer_norm_eps=1e-5,
        projection_dim=width, pad_token_id=0,
        bos_token_id=vocab_size - 2 if bos_token_id is None else bos_token_id,
        eos_token_id=vocab_size - 1 if eos_token_id is None else eos_token_id,
    )


def vision_config(width: int = 1280, layers: int = 32, heads: int = 16, patch_size: int = 14, image_size: int = 224,
                  mlp_ratio: float = 4.0, projection_dim: int = VIT_H_14_EMBED_DIM):
    """``CLIPVisionConfig`` of an OpenCLIP vision tower (default ViT-H/14)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=width, intermediate_size=int(width * mlp_ratio), num_hidden_layers=layers,
        num_attention_heads=heads, image_size=image_size, patch_size=patch_size, num_channels=3, hidden_act="gelu",
        layer_norm_eps=1e-5, projection_dim=projection_dim,
    )


def _resblock_shapes(prefix: str, width: int, mlp: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}ln_1.weight": (width,), f"{prefix}ln_1.bias": (width,),
            f"{prefix}attn.in_proj_weight": (3 * width, width), f"{prefix}attn.in_proj_bias": (3 * width,),
            f"{prefix}attn.out_proj.weight": (width, width), f"{prefix}attn.out_proj.bias": (width,),
            f"{prefix}ln_2.weight": (width,), f"{prefix}ln_2.bias": (width,),
            f"{prefix}mlp.c_fc.weight": (mlp, width), f"{prefix}mlp.c_fc.bias": (mlp,),
            f"{prefix}mlp.c_proj.weight": (width, mlp), f"{prefix}mlp.c_proj.bias": (width,)}


def openclip_state_shapes(text: Mapping[str, Any] | None = VIT_H_14_TEXT,
                          vision: Mapping[str, Any] | None = VIT_H_14_VISION,
                          embed_dim: int = VIT_H_14_EMBED_DIM) -> dict[str, tuple[int, ...]]:
    """Names and shapes of an OpenCLIP ``CLIP`` state dict (text tower at the top level, vision under
    ``visual.``), derived from the architecture; ``None`` leaves a tower out (ToonCrafter's
    ``cond_stage_model.model`` has no ``visual``; ``embedder.model`` has no text ``transformer`` but
    keeps the other text-side keys)."""
    out: dict[str, tuple[int, ...]] = {}
    if text is not None:
        w, ctx = text["width"], text["context_length"]
        out.update({"positional_embedding": (ctx, w), "text_projection": (w, embed_dim), "logit_scale": ()})
        for i in range(text["layers"]):
            out.update(_resblock_shapes(f"transformer.resblocks.{i}.", w, int(w * text["mlp_ratio"])))
        out.update({"token_embedding.weight": (text["vocab_size"], w), "ln_final.weight": (w,), "ln_final.bias": (w,)})
    if vision is not None:
        w, p = vision["width"], vision["patch_size"]
        grid = vision["image_size"] // p
        out.update({"visual.class_embedding": (w,), "visual.positional_embedding": (grid * grid + 1, w),
                    "visual.proj": (w, embed_dim), "visual.conv1.weight": (w, 3, p, p),
                    "visual.ln_pre.weight": (w,), "visual.ln_pre.bias": (w,)})
        for i in range(vision["layers"]):
            out.update(_resblock_shapes(f"visual.transformer.resblocks.{i}.", w, int(w * vision["mlp_ratio"])))
        out.update({"visual.ln_post.weight": (w,), "visual.ln_post.bias": (w,)})
    return out


# ----------------------------------------------------------------------------------------------
# converters
# ----------------------------------------------------------------------------------------------


def _count_blocks(state: Mapping[str, torch.Tensor], visual: bool) -> int:
    blocks = [int(m.group(2)) for k in state if (m := _RESBLOCK.match(k)) and bool(m.group(1)) == visual]
    return max(blocks) + 1 if blocks else 0


def _target_prefix(model: Any, tower: str) -> str:
    """``""`` for transformers >= 5 (flat CLIP models), ``"text_model."``/``"vision_model."`` before."""
    if model is None:
        return ""
    return f"{tower}." if any(k.startswith(f"{tower}.") for k in model.state_dict()) else ""


def openclip_to_clip_text_state(state: Mapping[str, torch.Tensor], used_layers: int | None = None,
                                model: Any = None, source: str = "the text encoder state") -> dict[str, torch.Tensor]:
    """OpenCLIP text-tower weights -> ``CLIPTextModel`` names (diffusers' ``convert_open_clip_checkpoint``).

    Blocks from ``used_layers`` on (default: the last one, i.e. the penultimate output), the
    projection, ``logit_scale`` and any ``visual.*`` keys are dropped; other unknown keys are errors."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    total = _count_blocks(state, visual=False)
    used = total - 1 if used_layers is None else used_layers
    if not 0 < used <= total:
        raise LayerkitError(f"{source} has {total} text blocks, cannot use {used} of them.")
    kept: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _RESBLOCK.match(key)
        if key.startswith("visual.") or key in _TEXT_UNUSED:
            continue
        if m and not m.group(1):
            if m.group(3) not in (*_RESBLOCK_PARAMS, "attn.in_proj_weight", "attn.in_proj_bias"):
                raise LayerkitError(f"{source} has unexpected key '{key}' (not an OpenCLIP residual-block parameter).")
            if int(m.group(2)) < used:
                kept[key] = value
            continue
        if key not in _TEXT_TOP:
            raise LayerkitError(f"{source} has unexpected key '{key}', expected OpenCLIP text-tower names "
                                "(token_embedding, positional_embedding, transformer.resblocks.N.*, ln_final).")
        kept[key] = value
    missing = [k for k in _TEXT_TOP if k not in kept]
    if missing:
        raise LayerkitError(f"{source} has no '{missing[0]}', expected an OpenCLIP text tower.")

    class _Shim:  # convert_open_clip_checkpoint reads the width from model.config.hidden_size
        config = type("C", (), {"hidden_size": state["token_embedding.weight"].shape[1]})

    out = convert_open_clip_checkpoint(_Shim(), kept, prefix="")
    prefix = _target_prefix(model, "text_model")
    return {(k if prefix else k.removeprefix("text_model.")): v for k, v in out.items()}


def openclip_to_clip_vision_state(state: Mapping[str, torch.Tensor], model: Any = None,
                                  source: str = "the image encoder state") -> dict[str, torch.Tensor]:
    """OpenCLIP vision-tower weights (``visual.*``) -> ``CLIPVisionModel`` names.

    ``visual.proj`` and text-side keys (ToonCrafter's ``embedder.model`` keeps ``token_embedding``,
    ``positional_embedding``, ``ln_final``, ``text_projection``, ``logit_scale``) are dropped; any
    other key is an error."""
    prefix = _target_prefix(model, "vision_model")
    top = {"visual.conv1.weight": "embeddings.patch_embedding.weight",
           "visual.class_embedding": "embeddings.class_embedding",
           "visual.positional_embedding": "embeddings.position_embedding.weight",
           "visual.ln_pre.weight": "pre_layrnorm.weight", "visual.ln_pre.bias": "pre_layrnorm.bias",
           "visual.ln_post.weight": "post_layernorm.weight", "visual.ln_post.bias": "post_layernorm.bias"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _RESBLOCK.match(key)
        if key in top:
            out[prefix + top[key]] = value
        elif key in _VISION_UNUSED or key in _TEXT_UNUSED or key in _TEXT_TOP:
            continue
        elif m and m.group(1):
            layer = f"{prefix}encoder.layers.{m.group(2)}."
            name = m.group(3)
            if name in _RESBLOCK_PARAMS:
                out[layer + _RESBLOCK_PARAMS[name]] = value
            elif name in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if name.endswith("weight") else "bias"
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                    out[f"{layer}self_attn.{proj}.{kind}"] = part
            else:
                raise LayerkitError(f"{source} has unexpected key '{key}' (not an OpenCLIP residual-block parameter).")
        elif m and not m.group(1):
            continue  # the text tower of a full OpenCLIP state dict
        else:
            raise LayerkitError(f"{source} has unexpected key '{key}', expected OpenCLIP vision-tower names "
                                "(visual.conv1, visual.class_embedding, visual.positional_embedding, visual.ln_pre, "
                                "visual.transformer.resblocks.N.*, visual.ln_post, visual.proj).")
    if prefix + "embeddings.patch_embedding.weight" not in out:
        raise LayerkitError(f"{source} has no 'visual.conv1.weight', expected an OpenCLIP vision tower.")
    return out


# ----------------------------------------------------------------------------------------------
# building the models
# ----------------------------------------------------------------------------------------------


def _default_heads(width: int, head_width: int = 64) -> int:
    # OpenCLIP stores no head count; the large towers all use 16 heads (ViT-H vision: 1280 / 80)
    return {1024: 16, 1280: 16, 1664: 16, 768: 12}.get(width, max(1, width // head_width))


def _materialize(model: Any, state: Mapping[str, torch.Tensor], source: str, what: str) -> Any:
    """Strict load into a meta-built transformers model, then rebuild its non-persistent
    ``position_ids`` buffers (the only buffers CLIP models keep out of the state dict)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        detail = " and ".join(p for p in (
            f"{len(missing)} missing (e.g. '{missing[0]}')" if missing else "",
            f"{len(unexpected)} unexpected (e.g. '{unexpected[0]}')" if unexpected else "") if p)
        raise LayerkitError(f"{source} does not match {what}: {detail} keys.")
    for k, v in own.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise LayerkitError(f"{source} has '{k}' of shape {tuple(state[k].shape)}, expected {tuple(v.shape)} for {what}.")
    model.load_state_dict(dict(state), strict=True, assign=True)
    device = next(iter(state.values())).device
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta and name == "position_ids" and device.type != "meta":
                setattr(module, name, torch.arange(buf.shape[-1], device=device).expand(1, -1))
    if device.type != "meta":
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise LayerkitError(f"{what} kept '{left[0]}' uninitialised after loading {source}.")
    return model.eval()


def text_encoder_from_openclip(state: Mapping[str, torch.Tensor], *, used_layers: int | None = None,
                               heads: int | None = None, dtype: torch.dtype | None = None,
                               source: str = "the text encoder state"):
    """A ``CLIPTextModel`` (penultimate-layer OpenCLIP text encoder) from OpenCLIP text weights; the
    config is read off the shapes (``heads`` default: 16 for widths 1024/1280/1664, else width/64)."""
    from transformers import CLIPTextModel

    if "token_embedding.weight" not in state or "positional_embedding" not in state:
        raise LayerkitError(f"{source} has no token_embedding.weight/positional_embedding, expected an OpenCLIP text tower.")
    vocab, width = state["token_embedding.weight"].shape
    total = _count_blocks(state, visual=False)
    mlp = state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] if total else 4 * width
    config = text_config(width=width, layers=total, heads=heads or _default_heads(width), vocab_size=vocab,
                         context_length=state["positional_embedding"].shape[0], mlp_ratio=mlp / width,
                         used_layers=used_layers)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    converted = openclip_to_clip_text_state(state, config.num_hidden_layers, model, source)
    model = _materialize(model, converted, source, f"a CLIP text model of {config.num_hidden_layers} layers")
    return model.to(dtype) if dtype is not None else model


def image_encoder_from_openclip(state: Mapping[str, torch.Tensor], *, heads: int | None = None,
                                dtype: torch.dtype | None = None, source: str = "the image encoder state"):
    """A ``CLIPVisionModel`` from OpenCLIP vision weights (``visual.*``); config read off the shapes."""
    from transformers import CLIPVisionModel

    if "visual.conv1.weight" not in state or "visual.positional_embedding" not in state:
        raise LayerkitError(f"{source} has no visual.conv1.weight/visual.positional_embedding, expected an OpenCLIP vision tower.")
    width, _, patch, _ = state["visual.conv1.weight"].shape
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    layers = _count_blocks(state, visual=True)
    mlp = state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] if layers else 4 * width
    proj = state.get("visual.proj")
    config = vision_config(width=width, layers=layers, heads=heads or _default_heads(width), patch_size=patch,
                           image_size=grid * patch, mlp_ratio=mlp / width,
                           projection_dim=proj.shape[1] if proj is not None else VIT_H_14_EMBED_DIM)
    with torch.device("meta"):
        model = CLIPVisionModel(config)
    converted = openclip_to_clip_vision_state(state, model, source)
    model = _materialize(model, converted, source, f"a CLIP vision model of {layers} layers")
    return model.to(dtype) if dtype is not None else model


def load_text_encoder(source: str | Path, *, dtype: torch.dtype | None = None, allow_pickle: bool = False,
                       heads: int | None = None):
    """A ``CLIPTextModel`` from a local transformers folder (e.g. SD 2.x ``text_encoder/``) or an
    OpenCLIP weights file (``open_clip_pytorch_model.bin``/``.safetensors``, the full model or the text
    tower; penultimate layer; ``heads`` as in :func:`text_encoder_from_openclip`)."""
    path = Path(source)
    if path.is_dir():
        from transformers import CLIPTextModel

        return CLIPTextModel.from_pretrained(str(path), local_files_only=True, dtype=dtype).eval()
    from layerkit.io.weights import load_weights

    return text_encoder_from_openclip(load_weights(path, allow_pickle=allow_pickle), dtype=dtype, heads=heads, source=f"'{path}'")


def load_image_encoder(source: str | Path, *, dtype: torch.dtype | None = None, allow_pickle: bool = False,
                       heads: int | None = None):
    """A ``CLIPVisionModel`` from a local transformers folder or an OpenCLIP weights file."""
    path = Path(source)
    if path.is_dir():
        from transformers import CLIPVisionModel

        return CLIPVisionModel.from_pretrained(str(path), local_files_only=True, dtype=dtype).eval()
    from layerkit.io.weights import load_weights

    return image_encoder_from_openclip(load_weights(path, allow_pickle=allow_pickle), dtype=dtype, heads=heads, source=f"'{path}'")


def load_tokenizer(path: str | Path):
    """The CLIP BPE tokenizer from a local folder (``vocab.json`` + ``merges.txt`` as in SD 2.x
    ``tokenizer/``, or a ``tokenizer.json``); :func:`tokenize` pads with 0 as ``open_clip.tokenize`` does."""
    from transformers import CLIPTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not ((path / "vocab.json").is_file() and (path / "merges.txt").is_file()):
        raise LayerkitError(f"tokenizer folder '{path}' has neither vocab.json + merges.txt nor tokenizer.json "
                            "(a CLIP BPE tokenizer is expected).")
    return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)


# ----------------------------------------------------------------------------------------------
# running them
# ----------------------------------------------------------------------------------------------


def tokenize(tokenizer: Any, prompts: Sequence[str], max_length: int = TEXT_TOKENS) -> torch.Tensor:
    """``open_clip.tokenize``: start token, BPE tokens, end token (kept when truncating), zeros after."""
    if isinstance(prompts, str):
        prompts = [prompts]
    enc = tokenizer(list(prompts), truncation=True, max_length=max_length, padding=False, add_special_tokens=True,
                    split_special_tokens=True)
    ids = torch.zeros(len(prompts), max_length, dtype=torch.long)
    for i, seq in enumerate(enc["input_ids"]):
        ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids


def encode_text(text_encoder: Any, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """``[B, 77, D]`` text context (penultimate OpenCLIP layer after ``ln_final``)."""
    ids = tokenize(tokenizer, prompts, text_encoder.config.max_position_embeddings)
    return text_encoder(input_ids=ids.to(text_encoder.device)).last_hidden_state


def _gaussian_kernel1d(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=torch.float32) - size // 2
    g = torch.exp(-(x ** 2) / (2.0 * sigma ** 2))
    return g / g.sum()


def resize_like_kornia(x: torch.Tensor, size: tuple[int, int], antialias: bool = True) -> torch.Tensor:
    """``kornia.geometry.resize(x, size, interpolation="bicubic", align_corners=True, antialias=...)``:
    when shrinking, a separable Gaussian blur (sigma ``max((scale - 1) / 2, 0.001)`` per axis, odd kernel
    ``max(4 sigma, 3)``, reflect padding) before bicubic interpolation with ``align_corners=True``."""
    h, w = x.shape[-2:]
    factors = (h / size[0], w / size[1])
    if antialias and max(factors) > 1:
        sigmas = [max((f - 1.0) / 2.0, 0.001) for f in factors]
        ks = [int(max(2.0 * 2 * s, 3)) for s in sigmas]
        ks = [k if k % 2 else k + 1 for k in ks]
        ks = [1 if n == 1 else k for n, k in zip((h, w), ks, strict=True)]
        orig = x.dtype
        x = x.float()
        c = x.shape[1]
        ky = _gaussian_kernel1d(ks[0], sigmas[0], x.device).view(1, 1, -1, 1).repeat(c, 1, 1, 1)
        kx = _gaussian_kernel1d(ks[1], sigmas[1], x.device).view(1, 1, 1, -1).repeat(c, 1, 1, 1)
        x = F.conv2d(F.pad(x, (ks[1] // 2, ks[1] // 2, 0, 0), mode="reflect"), kx, groups=c)
        x = F.conv2d(F.pad(x, (0, 0, ks[0] // 2, ks[0] // 2), mode="reflect"), ky, groups=c)
        x = x.to(orig)
    return F.interpolate(x, size=size, mode="bicubic", align_corners=True)


def preprocess_images(frames: torch.Tensor, size: int = 224, antialias: bool = True) -> torch.Tensor:
    """[-1, 1] frames ``[B, 3, H, W]`` -> normalised ``[B, 3, size, size]`` CLIP input (ToonCrafter's
    ``FrozenOpenCLIPImageEmbedderV2.preprocess``)."""
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ShapeError(f"frames have shape {tuple(frames.shape)}, expected [B, 3, H, W] in [-1, 1].")
    x = resize_like_kornia(frames, (size, size), antialias)
    x = (x + 1.0) / 2.0
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def encode_images(image_encoder: Any, frames: torch.Tensor, antialias: bool = True) -> torch.Tensor:
    """``[B, 257, 1280]`` image tokens (all vision-transformer tokens before ``ln_post``) of [-1, 1]
    frames; the unconditional tokens are those of ``torch.zeros_like(frames)``."""
    pixels = preprocess_images(frames.float(), image_encoder.config.image_size, antialias)
    param = next(image_encoder.parameters())
    return image_encoder(pixel_values=pixels.to(param.device, param.dtype)).last_hidden_state


# ----------------------------------------------------------------------------------------------
# tiny components for tests
# ----------------------------------------------------------------------------------------------

_TINY_WORDS = ("a", "the", "red", "green", "blue", "circle", "square", "moving", "cat", "dog")


def tiny_tokenizer(words: Sequence[str] = _TINY_WORDS, max_length: int = TEXT_TOKENS):
    """A CLIP BPE tokenizer over single bytes (plus merges for ``words``) built offline; id 0 is "!"
    like the real CLIP vocabulary, so zero padding means the same thing."""
    from transformers import CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_chars, extra = [], 0
    for b in range(256):
        if b in printable:
            byte_chars.append(chr(b))
        else:
            byte_chars.append(chr(256 + extra))
            extra += 1
    chars = [byte_chars[b] for b in printable] + [c for b, c in enumerate(byte_chars) if b not in printable]
    vocab: dict[str, int] = {}
    for c in chars + [c + "</w>" for c in chars]:
        vocab[c] = len(vocab)
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory(prefix="layerkit-tok-") as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
        return CLIPTokenizer(vocab=str(Path(tmp) / "vocab.json"), merges=str(Path(tmp) / "merges.txt"),
                             model_max_length=max_length, pad_token="!")


def random_openclip_state(text: Mapping[str, Any] | None, vision: Mapping[str, Any] | None, embed_dim: int,
                          seed: int = 0, std: float = 0.05) -> dict[str, torch.Tensor]:
    """Seeded random weights in the OpenCLIP layout (layer norms near identity)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in openclip_state_shapes(text, vision, embed_dim).items():
        t = torch.randn(shape, generator=generator) * std
        if re.search(r"(ln_\w+|ln_final|ln_pre|ln_post)\.weight$", key):
            t = t + 1.0
        if key == "logit_scale":
            t = torch.tensor(math.log(1 / 0.07))
        state[key] = t
    return state


def tiny_encoders(seed: int = 0) -> dict[str, Any]:
    """tokenizer, text_encoder (CLIPTextModel, penultimate of 3 layers, width 32), image_encoder
    (CLIPVisionModel, 2 layers of 64, 56 x 56 input -> 17 tokens) and their OpenCLIP state dict."""
    tokenizer = tiny_tokenizer()
    text = {**TINY_TEXT, "vocab_size": len(tokenizer)}
    state = random_openclip_state(text, TINY_VISION, TINY_EMBED_DIM, seed)
    return {"tokenizer": tokenizer, "openclip_state": state,
            "text_encoder": text_encoder_from_openclip(state, heads=TINY_TEXT["heads"]),
            "image_encoder": image_encoder_from_openclip(state, heads=TINY_VISION["heads"])}
