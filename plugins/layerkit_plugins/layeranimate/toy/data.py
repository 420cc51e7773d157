"""``layeranimate.toy_clips``: shapes-world clips for the toy's base ToonCrafter (the stage before
LayerAnimate): the blended video, its prompt, the fps condition and a mode drawn per item,
image-to-video or interpolation (``p_i2v``, 0.5: the loader's ``p_single_frame``). No layers, no
flip (a flip would make the prompt's left/right wrong). Item i is the same every epoch, so its
latents may be cached (``train.cache_latents``)."""

from __future__ import annotations

from typing import Any

import torch

from layerkit.errors import LayerkitError


class ShapesClips(torch.utils.data.Dataset):
    cacheable = True

    def __init__(self, size: int = 4096, seed: int = 0, split: str = "train", fps: int = 8, num_frames: int = 8,
                 height: int = 32, width: int = 32, num_sprites: int = 2, p_i2v: float = 0.5, **config: Any) -> None:
        from layerkit.data.shapes import ShapesConfig, seed_for

        if size < 1:
            raise LayerkitError(f"layeranimate.toy_clips needs a positive size; got {size}.")
        if not 0.0 <= p_i2v <= 1.0:
            raise LayerkitError(f"layeranimate.toy_clips p_i2v is {p_i2v}; expected a probability in [0, 1].")
        seed_for(split, seed, 0)
        self.config = ShapesConfig(num_frames=num_frames, height=height, width=width, num_sprites=num_sprites,
                                   **{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
        self.config.validate()
        self.size, self.seed, self.split, self.fps, self.p_i2v = size, seed, split, int(fps), float(p_i2v)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        from layerkit.data.shapes import make_sample, seed_for

        if not 0 <= index < self.size:
            raise IndexError(f"layeranimate.toy_clips index {index} out of range for size {self.size}.")
        world = seed_for(self.split, self.seed, index)
        clip = make_sample(world, self.config)
        draw = float(torch.rand((), generator=torch.Generator().manual_seed(world % (2**63))))
        return {"video": clip["blended"], "prompt": clip["prompt"], "fps": self.fps,
                "mode": "i2v" if draw < self.p_i2v else "interpolate"}
