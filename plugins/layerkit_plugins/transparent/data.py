"""``shapes_rgba``: shapes-world sprites on a transparent background, for transparent video."""

from __future__ import annotations

from typing import Any

import torch

from layerkit.errors import LayerkitError


class RGBASpriteClips(torch.utils.data.Dataset):
    """Item i: ``make_rgba_sprite_clip(seed_for(split, seed, i), config)`` -> ``rgba`` [F, 4, H, W]
    in [0, 1] (straight alpha), ``prompt`` ("a red circle moving right"), ``meta``, ``seed``."""

    def __init__(self, size: int = 256, seed: int = 0, split: str = "train", **config: Any) -> None:
        from layerkit.data.shapes import ShapesConfig, seed_for

        if size < 1:
            raise LayerkitError(f"shapes_rgba needs a positive size; got {size}.")
        seed_for(split, seed, 0)  # validates split and seed
        config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
        config.pop("num_sprites", None)  # always one sprite
        self.config = ShapesConfig(**config)
        self.config.validate()
        self.size, self.seed, self.split = size, seed, split

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        from layerkit.data.shapes import make_rgba_sprite_clip, seed_for

        if not 0 <= index < self.size:
            raise IndexError(f"shapes_rgba index {index} out of range for size {self.size}.")
        return make_rgba_sprite_clip(seed_for(self.split, self.seed, index), self.config)

    @staticmethod
    def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {"rgba": torch.stack([s["rgba"] for s in samples]), "prompt": [s["prompt"] for s in samples],
                "meta": [s["meta"] for s in samples], "seed": torch.tensor([s["seed"] for s in samples])}
