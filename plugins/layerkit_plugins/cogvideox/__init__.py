"""CogVideoX (diffusers) as a layerkit backbone: ``cogvideox`` (a local diffusers directory or a tiny model)."""

from __future__ import annotations

from layerkit import hookimpl


@hookimpl
def register_backbones(register):
    register("cogvideox", "layerkit_plugins.cogvideox.backbone:CogVideoX",
             description="CogVideoX-2B/5B text-to-video (diffusers): transformer, 3D causal VAE, T5; tiny=true builds a tiny one")


@hookimpl
def register_config_dirs(register):
    register("pkg://layerkit_plugins.cogvideox.conf")
