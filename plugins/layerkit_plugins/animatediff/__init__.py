"""AnimateDiff (SD 1.5 + motion module, diffusers UNetMotionModel) with LayerDiffuse latent
transparency: the backbone of Layer-Animate's transparent video."""

from __future__ import annotations

from layerkit import hookimpl


@hookimpl
def register_backbones(register):
    register("animatediff", "layerkit_plugins.animatediff.backbone:from_pretrained",
             description="SD 1.5 + AnimateDiff motion module (diffusers folder or original .safetensors/.ckpt) "
                         "with optional LayerDiffuse transparent encoder/decoder and SD 1.5 transparent attention "
                         "(stage-1 images)")
    register("animatediff.tiny", "layerkit_plugins.animatediff.backbone:tiny",
             description="tiny AnimateDiff + LayerDiffuse built from configs on the spot (seeded), for tests")


@hookimpl
def register_config_dirs(register):
    register("pkg://layerkit_plugins.animatediff.conf")
