"""LayerAnimate training data: ``layeranimate.shapes`` (shapes-world clips with every control, the
paper's training-time choices applied: 10% layer-mask dropout, one control per kept layer drawn
20/40/40 motion score / trajectory / sketch, i2v vs interpolation 50/50, horizontal flip 0.5).

Item i is the same every epoch (its choices come from a generator seeded by the item), so a run
resumes exactly and latents may be cached.
"""

from __future__ import annotations

from typing import Any

import torch

from layerkit.errors import LayerkitError


class ShapesLayers(torch.utils.data.Dataset):
    cacheable = False  # the control encodes regions and sketches itself; nothing for the latent cache

    def __init__(self, size: int = 1024, seed: int = 0, split: str = "train", capacity: int = 4, fps: int = 8,
                 num_frames: int = 16, height: int = 64, width: int = 64, num_sprites: int = 2,
                 choices: bool = True, **config: Any) -> None:
        from layerkit.data.shapes import ShapesConfig, seed_for

        if size < 1:
            raise LayerkitError(f"layeranimate.shapes needs a positive size; got {size}.")
        seed_for(split, seed, 0)
        if num_sprites + 1 > capacity:
            raise LayerkitError(f"num_sprites={num_sprites} plus the background is more layers than the capacity "
                                f"{capacity}.")
        self.config = ShapesConfig(num_frames=num_frames, height=height, width=width, num_sprites=num_sprites,
                                   **{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
        self.config.validate()
        self.size, self.seed, self.split = size, seed, split
        self.capacity, self.fps, self.choices = capacity, fps, bool(choices)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        from layerkit.data.shapes import seed_for
        from layerkit_plugins.layeranimate.shapes import shapes_layeranimate_sample, shapes_training_sample

        if not 0 <= index < self.size:
            raise IndexError(f"layeranimate.shapes index {index} out of range for size {self.size}.")
        world = seed_for(self.split, self.seed, index)
        generator = torch.Generator().manual_seed(world % (2**63))
        if self.choices:
            sample = shapes_training_sample(world, generator, capacity=self.capacity, config=self.config, fps=self.fps)
        else:
            sample = shapes_layeranimate_sample(world, mode="i2v", generator=generator, capacity=self.capacity,
                                                config=self.config, fps=self.fps)
        sample.pop("ground_truth", None)
        return sample
