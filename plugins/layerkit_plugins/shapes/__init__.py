"""The shapes world as a dataset plugin: deterministic layered samples from a seed."""

from __future__ import annotations

from layerkit import hookimpl


@hookimpl
def register_datasets(register):
    register("shapes", "layerkit_plugins.shapes:build",
             description="procedural layered videos: sprites with alpha over moving backgrounds, with prompts, masks, "
                         "motion scores, trajectories and sketches")


def build(split: str = "train", size: int = 256, seed: int = 0, **config):
    from layerkit.data.shapes import ShapesConfig, ShapesDataset

    return ShapesDataset(size=size, seed=seed, config=ShapesConfig(**config), split=split)
