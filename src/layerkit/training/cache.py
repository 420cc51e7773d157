"""Caches for frozen encoders: a training step then spends its time in the denoiser.

- :class:`LatentCache` keeps the VAE latents of each dataset item (keyed by the item's index,
  which :class:`layerkit.training.data.PreparedDataset` adds as ``_index``), in memory on the
  CPU. It needs a dataset whose item i is the same every epoch (``cacheable = True``: the
  shapes world; not a dataset with random augmentation). A cached latent is the VAE posterior's
  mode (the backbone encodes with its training flag off), so a miss draws no random number: the
  run's noise and timesteps do not depend on what the cache holds, and a resumed run, whose
  cache starts empty, draws what the uninterrupted run drew (its latents equal up to the float
  rounding of the batch each was encoded in). It keeps each VAE pass of :func:`layerkit.pipeline.encode_packed`
  apart, keyed by what that pass reads: the packed clip's segments (names and frame counts: one
  item packs differently per task mode, LayerFlow's fg2bg and bg2fg put a copy of frame 0 in
  front) and, for the pass over the given frames alone, which frames are given. The modes that
  pack an item alike share its whole-clip pass (LayerFlow's generation and decomposition: one
  VAE pass fewer per item than a cache of each mode's latents).
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
        self.hits = 0    # VAE passes of one sample served from the cache
        self.misses = 0  # VAE passes of one sample encoded

    def encode(self, backbone: Any, packed: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        from layerkit.pipeline import encode_packed

        index = batch.get("_index")
        if index is None:
            raise LayerkitError("train.cache_latents needs a dataset that marks its items as cacheable "
                                "(the same item every epoch); this dataset does not.")
        packing = tuple((seg.name, seg.num_frames) for seg in packed.segments)
        given = packed.given.cpu()  # the pass over the given frames is encoded as at sampling
        patterns = [bytes(given[j].numpy().tobytes()) for j in range(len(index))]

        def encode_video(video: torch.Tensor, part: tuple) -> torch.Tensor:
            keys = [(int(i), packing, part, patterns[j] if part == ("given",) else None)
                    for j, i in enumerate(index)]
            missing = [j for j, key in enumerate(keys) if key not in self.latents]
            if missing:  # encode only the samples this pass has not seen yet
                rows = video if len(missing) == len(keys) else video[missing]
                training, backbone.training = backbone.training, False  # the mode: no draw (the flag alone,
                try:                                                      # not the submodules' modes)
                    with torch.no_grad():
                        fresh = backbone.encode_video(rows)
                finally:
                    backbone.training = training
                for j, z in zip(missing, fresh, strict=True):
                    self.latents[keys[j]] = z.detach().cpu()
            self.hits += len(keys) - len(missing)
            self.misses += len(missing)
            return torch.stack([self.latents[k] for k in keys]).to(video.device)

        with torch.no_grad():
            return encode_packed(backbone, packed, training=True, given_latents=self.given_latents,
                                 encode_video=encode_video)


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
