"""The toy's text encoder, pretrained contrastively on shapes-world clips and their prompts.

SD 1.5's text encoder is CLIP's (Radford et al. 2021), trained contrastively on image-text pairs
and frozen under the UNet; it reaches the UNet already able to tell "red" from "green". No CLIP
weights exist offline, so the toy pretrains its
own: ``transformers.CLIPModel`` with the toy's text tower and a vision tower that reads a whole
clip (its frames stacked as channels, so motion is visible to it), trained with CLIP's symmetric
contrastive loss on (clip, prompt) pairs from the training split. Only the text tower is kept;
it is frozen from then on, as in SD.

Prompts repeat within a batch (6 colours x 4 shapes x 5 motions), so every item with the same
prompt is a positive (the target row is spread over them) instead of a false negative.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from layerkit.training.contrastive import contrastive_loss

#: the vision tower: 8 RGBA frames stacked as 32 channels, 8x8 patches of a 32x32 clip
VISION_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     patch_size=8)


def clip_pixels(rgba: torch.Tensor) -> torch.Tensor:
    """Straight RGBA clips [N, F, 4, H, W] in [0, 1] -> [N, F*4, H, W] in [-1, 1]: the colour
    premultiplied over mid-grey (what the VAE sees) and the alpha."""
    rgba = rgba.float()
    alpha = rgba[:, :, 3:]
    grey = (rgba[:, :, :3] * 2 - 1) * alpha
    return torch.cat([grey, alpha * 2 - 1], 2).flatten(1, 2)


def build_clip(text_encoder, frames: int, size: int, seed: int):
    """A ``CLIPModel`` whose text tower is ``text_encoder``'s (weights shared, not copied)."""
    from transformers import CLIPConfig, CLIPModel

    text_config = text_encoder.config.to_dict()
    vision_config = dict(VISION_CONFIG, image_size=size, num_channels=4 * frames,
                         projection_dim=text_config.get("projection_dim", 32))
    config = CLIPConfig(text_config=text_config, vision_config=vision_config,
                        projection_dim=text_config.get("projection_dim", 32))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.text_model = text_encoder
    return model


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def pretrain_text_encoder(text_encoder, tokenizer, rgba: torch.Tensor, prompts: list[str], *, steps: int,
                          batch: int, lr: float, seed: int, log_every: int = 100) -> dict[str, Any]:
    """Train ``text_encoder`` (in place) with a clip tower on ``rgba`` [N, F, 4, H, W] and
    ``prompts``; it is left frozen in eval mode. Returns the per-step ``losses``, the ``clip``
    model and its distinct ``prompts``."""
    from layerkit_plugins.transparent.toy.train import lr_at

    n, frames, _, size, _ = rgba.shape
    model = build_clip(text_encoder, frames, size, seed)
    model.train()
    distinct = sorted(set(prompts))
    prompt_ids = torch.tensor([distinct.index(p) for p in prompts])
    ids = tokenize(tokenizer, distinct)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        pick = torch.randint(0, n, (batch,), generator=gen)
        pixels = clip_pixels(rgba[pick])
        which = prompt_ids[pick]
        text = model.get_text_features(input_ids=ids[which])
        image = model.get_image_features(pixel_values=pixels)
        loss = contrastive_loss(_features(text), _features(image), model.logit_scale.exp().clamp(max=100), which)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"[toy] text encoder step {step + 1}/{steps}: contrastive loss "
                  f"{sum(losses[-log_every:]) / log_every:.4f} (uniform logits {math.log(batch):.2f})", flush=True)
    text_encoder.requires_grad_(False)
    text_encoder.eval()
    return {"losses": losses, "clip": model, "prompts": distinct}


def _features(out: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor, or an output object in newer transformers."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output if getattr(out, "pooler_output", None) is not None else out[0]


@torch.no_grad()
def retrieval(model, tokenizer, rgba: torch.Tensor, metas: list[dict[str, Any]], prompts: list[str]) -> dict[str, float]:
    """Zero-shot: each clip's best prompt among ``prompts``; the share whose colour, shape and
    motion words match the clip's."""
    model.eval()
    text = F.normalize(_features(model.get_text_features(input_ids=tokenize(tokenizer, prompts))), dim=-1)
    image = F.normalize(_features(model.get_image_features(pixel_values=clip_pixels(rgba))), dim=-1)
    best = (image @ text.T).argmax(1)
    hits = {"colour": 0, "shape": 0, "direction": 0}
    for i, meta in enumerate(metas):
        words = prompts[int(best[i])].split()
        hits["colour"] += meta["colour"] in words
        hits["shape"] += meta["shape"] in words
        hits["direction"] += (meta["direction"] in words) or (meta["direction"] == "still" and "still" in words)
    return {k: v / len(metas) for k, v in hits.items()}
