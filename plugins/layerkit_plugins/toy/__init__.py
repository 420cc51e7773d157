"""The toy backbone: a tiny pixel-space diffusion transformer that runs on a laptop CPU."""

from __future__ import annotations

from layerkit import hookimpl


@hookimpl
def register_backbones(register):
    register("toy.dit", "layerkit_plugins.toy.backbone:ToyDiT",
             description="tiny pixel-space DiT (diffusers CogVideoX blocks) with a word-embedding text encoder")


@hookimpl
def register_config_dirs(register):
    register("pkg://layerkit_plugins.toy.conf")
