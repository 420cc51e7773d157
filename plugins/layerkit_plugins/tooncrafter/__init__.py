"""ToonCrafter's video UNet (Xing et al. 2024) as the ``tooncrafter`` backbone, LayerAnimate's
backbone, with its keyframe tasks (image-to-video, interpolation) and loaders for the authors'
``model.ckpt`` and LayerAnimate's diffusers-style folders."""

from __future__ import annotations

from layerkit import hookimpl

#: what ``inputs.*`` the tasks take (their ``input_keys`` and ``file_keys``), declared here so a
#: wrong key or a missing file is refused before torch is imported
INPUT_KEYS = ("num_samples", "seed", "prompt", "first_frame", "last_frame", "fps")
FILE_KEYS = ("first_frame", "last_frame")


@hookimpl
def register_backbones(register):
    register("tooncrafter", "layerkit_plugins.tooncrafter.backbone:ToonCrafter",
             description="ToonCrafter video UNet + SD VAE / dual-reference decoder + OpenCLIP ViT-H-14 text and image "
                         "encoders: a LayerAnimate-style folder (path=), model.ckpt (checkpoint=) or tiny=true")


@hookimpl
def register_tasks(register):
    register("tooncrafter.i2v", "layerkit_plugins.tooncrafter.task:i2v_task", inputs=INPUT_KEYS, files=FILE_KEYS,
             description="image-to-video: the first frame given as the concatenated image latent and image tokens")
    register("tooncrafter.interpolate", "layerkit_plugins.tooncrafter.task:interpolate_task", inputs=INPUT_KEYS, files=FILE_KEYS,
             description="interpolation: the first and last frames given")


@hookimpl
def register_config_dirs(register):
    register("pkg://layerkit_plugins.tooncrafter.conf")
