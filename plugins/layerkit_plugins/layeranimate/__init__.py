"""LayerAnimate (Yang et al. 2025): layer-level control of animation on the tooncrafter backbone:
the Layer ControlNet with its layer encoder and motion-score, trajectory and sketch encoders (a
control), masked layer fusion in the UNet decoder (an adapter), the i2v and interpolation tasks with
layers, shapes-world training data and the authors' demo folders."""

from __future__ import annotations

from layerkit import hookimpl

#: what ``inputs.*`` the tasks take (their ``input_keys`` and ``file_keys``), declared here so a
#: wrong key or a missing file is refused before torch is imported
INPUT_KEYS = ("num_samples", "seed", "prompt", "demo", "demo_root", "fps", "controls")
FILE_KEYS = ("demo",)


@hookimpl
def register_controls(register):
    register("layeranimate.layer_controlnet", "layerkit_plugins.layeranimate.control:LayerControl",
             description="LayerAnimate's Layer ControlNet: layer regions by motion-based assignment, masks, motion "
                         "scores, trajectories and sketches per layer -> features for the decoder's fusion")


@hookimpl
def register_adapters(register):
    register("layeranimate.fusion", "layerkit_plugins.layeranimate.adapter:LayerFusion",
             description="LayerAnimate's masked layer fusion: cross-attention over the layer features at each pixel, "
                         "padded layers masked out, zero-initialised, added to the decoder's skips")


@hookimpl
def register_tasks(register):
    register("layeranimate.i2v", "layerkit_plugins.layeranimate.task:i2v_task", inputs=INPUT_KEYS, files=FILE_KEYS,
             description="layer-controlled image-to-video (first frame given)")
    register("layeranimate.interpolate", "layerkit_plugins.layeranimate.task:interpolate_task", inputs=INPUT_KEYS, files=FILE_KEYS,
             description="layer-controlled interpolation (first and last frames given)")


@hookimpl
def register_datasets(register):
    register("layeranimate.shapes", "layerkit_plugins.layeranimate.data:ShapesLayers",
             description="shapes-world clips with layer masks, motion scores, trajectories and sketches; the paper's "
                         "training-time choices (mask dropout, one control per layer, i2v/interpolation, flip)")
    register("layeranimate.toy_clips", "layerkit_plugins.layeranimate.toy.data:ShapesClips",
             description="shapes-world clips (video, prompt, fps, i2v or interpolation per item) for the toy's base "
                         "ToonCrafter stage; cacheable")
    register("layeranimate.folder", "layerkit_plugins.layeranimate.data:CuratedClips",
             description="clips written by layerkit curate (masklets, motion scores, tracks, sketches), with the "
                         "paper's training-time choices")


@hookimpl
def register_commands(register):
    register("toy-layeranimate-vae", "layerkit_plugins.layeranimate.toy.train_vae:main",
             description="train the toy LayerAnimate's VAE on shapes-world frames and write its base folder")
    register("toy-layeranimate-eval", "layerkit_plugins.layeranimate.toy.evaluate:main",
             description="score the toy LayerAnimate on held-out shapes clips; the motion-based assignment ablation")


@hookimpl
def register_config_dirs(register):
    register("pkg://layerkit_plugins.layeranimate.conf")
