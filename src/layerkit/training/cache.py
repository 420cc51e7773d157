"""Caches for frozen encoders: a training step then spends its time in the denoiser.

- :class:`LatentCache` keeps the VAE latents of each dataset item (keyed by the item's index,
  which :class:`layerkit.training.data.PreparedDataset` adds as ``_index``), in memory on the
  CPU. It needs a dataset whose item i is the same every epoch (``cacheable = True``: the
  shapes world; not a dataset with random augmentation). A cached latent is one draw of the
  VAE posterior, reused. The key also holds the packed clip's segments (names and frame
  counts): one item packs differently per task mode (LayerFlow's fg2bg and bg2fg put a copy of
  frame 0 in front) and marks other frames given, so each packing and given pattern is cached on
  its own.
- :func:`cache_prompt_embeddings` memoises ``backbone.encode_prompts`` per prompt string for a
  frozen text encoder.
"""

from __future__ import annotations

from typing import Any

import torch

from layerkit.errors import LayerkitError


class LatentCache:
    def __init__(self, given_latents: str = "sampled") -> None:
        self.given_latents = given_latents
        self.latents: dict[tuple, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def encode(self, backbone: Any, packed: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        from layerkit.pipeline import encode_packed, latent_layout

        index = batch.get("_index")
        if index is None:
            raise LayerkitError("train.cache_latents needs a dataset that marks its items as cacheable "
                                "(the same item every epoch); this dataset does not.")
        packing = tuple((seg.name, seg.num_frames) for seg in packed.segments)
        given = packed.given.cpu()  # given frames are encoded as at sampling (pipeline.encode_packed)
        keys = [(int(i), packing, bytes(given[j].numpy().tobytes())) for j, i in enumerate(index)]
        missing = [j for j, key in enumerate(keys) if key not in self.latents]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:  # encode only the items not seen in this packing yet
            part = packed if len(missing) == len(keys) else packed.select(missing)
            with torch.no_grad():
                latents, _ = encode_packed(backbone, part, training=True, given_latents=self.given_latents)
            for j, z in zip(missing, latents, strict=True):
                self.latents[keys[j]] = z.detach().cpu()
        device = backbone.execution_device
        return torch.stack([self.latents[k] for k in keys]).to(device), latent_layout(backbone, packed)


def cache_prompt_embeddings(backbone: Any) -> None:
    """Memoise ``backbone.encode_prompts`` per prompt (each prompt is encoded on its own, padded
    to a fixed length, so a batch's embeddings are the stack of its prompts')."""
    encoder = getattr(backbone, "text_encoder", None)
    original = backbone.encode_prompts
    memo: dict[str, dict[str, torch.Tensor]] = {}

    def encode_prompts(prompts: Any) -> dict[str, torch.Tensor]:
        if encoder is not None and any(p.requires_grad for p in encoder.parameters()):
            raise LayerkitError("train.cache_text needs a frozen text encoder; this run trains it.")
        prompts = list(prompts)
        todo = list(dict.fromkeys(p for p in prompts if p not in memo))
        if todo:
            with torch.no_grad():
                fresh = original(todo)
            for i, prompt in enumerate(todo):
                memo[prompt] = {k: v[i : i + 1].detach() for k, v in fresh.items()}
        keys = memo[prompts[0]].keys()
        return {k: torch.cat([memo[p][k] for p in prompts]) for k in keys}

    backbone.encode_prompts = encode_prompts
