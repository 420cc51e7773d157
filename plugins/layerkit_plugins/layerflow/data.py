"""``layerflow.mixture``: the data of LayerFlow's stages 2 and 3 (sec. 3.2), from the shapes world.

- copy-paste: the foreground (RGB + alpha) of one clip pasted over the background of another,
  blended = fg x alpha + bg x (1 - alpha) (the paper's self-made multi-layer videos);
- static: one frame, drawn at random, repeated on every frame of every layer ("images as frozen
  videos"); ``is_static`` is True and the task's ``scale_from: {motion_lora: is_static}`` turns
  the Motion LoRA on (scale 1) for these samples and off (0) for dynamic ones.

Stage 2 (Motion LoRA) uses ``static_fraction: 1``; stage 3 (Content LoRA) mostly static samples
with a small share of dynamic copy-pasted videos. Items are deterministic in (split, seed, index).
"""

from __future__ import annotations

import random
from typing import Any

from torch.utils.data import Dataset

from layerkit.data.shapes import ShapesConfig, make_sample, seed_for
from layerkit.errors import LayerkitError

VIDEO_KEYS = ("foreground_rgb", "foreground_alpha", "background", "blended")


class LayerFlowMixture(Dataset):
    """Samples with ``foreground_rgb`` [F, 3, H, W], ``foreground_alpha`` [F, 1, H, W], ``background``,
    ``blended`` (in [0, 1]), the three prompts, ``is_static`` (bool) and ``seed``."""

    cacheable = True  # item i is the same every epoch: its rng is seeded by (split, seed, index)

    def __init__(self, size: int = 512, seed: int = 0, split: str = "train", static_fraction: float = 0.5,
                 copy_paste: bool = True, **config: Any) -> None:
        if not 0.0 <= static_fraction <= 1.0:
            raise LayerkitError(f"static_fraction must lie in [0, 1]; got {static_fraction}.")
        if size < 1:
            raise LayerkitError(f"dataset size must be at least 1; got {size}.")
        seed_for(split, seed, 0)  # validates split and seed
        self.size, self.seed, self.split = int(size), int(seed), split
        self.static_fraction, self.copy_paste = float(static_fraction), bool(copy_paste)
        self.config = ShapesConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
        self.config.validate()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.size:
            raise IndexError(f"LayerFlowMixture index {index} out of range for size {self.size}.")
        item_seed = seed_for(self.split, self.seed, index)
        rng = random.Random(item_seed ^ 0x1A7E5F10)
        clip = make_sample(item_seed, self.config)
        out = {k: clip[k] for k in (*VIDEO_KEYS, "foreground_prompt", "background_prompt", "prompt")}
        if self.copy_paste and self.size > 1:
            other = (index + 1 + rng.randrange(self.size - 1)) % self.size
            back = make_sample(seed_for(self.split, self.seed, other), self.config)
            alpha = out["foreground_alpha"]
            out["background"] = back["background"]
            out["blended"] = out["foreground_rgb"] * alpha + back["background"] * (1 - alpha)
            out["background_prompt"] = back["background_prompt"]
            out["prompt"] = f"{out['foreground_prompt']} over {back['background_prompt']}"
        is_static = rng.random() < self.static_fraction
        if is_static:
            frame = rng.randrange(self.config.num_frames)
            for key in VIDEO_KEYS:
                out[key] = out[key][frame : frame + 1].expand_as(out[key]).contiguous()
        out["is_static"] = is_static
        out["seed"] = item_seed
        return out
