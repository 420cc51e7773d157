"""Layer-Animate's transparent video (seed 003): Inter-Frame Attention, the i2v/t2v tasks,
and RGBA sprite clips from the shapes world. Pairs with the ``animatediff`` backbone."""

from __future__ import annotations

from layerkit import hookimpl


@hookimpl
def register_adapters(register):
    register("transparent.inter_frame_attention", "layerkit_plugins.transparent.inter_frame:InterFrameAttention",
             description="Layer-Animate Inter-Frame Attention: every frame also attends to the middle frame "
                         "through the frozen W_K/W_V; only W_Q' and zero-initialised W_O' train")


@hookimpl
def register_tasks(register):
    register("transparent.i2v", "layerkit_plugins.transparent.task:i2v_task",
             description="RGBA image as the clean middle frame -> RGBA video")
    register("transparent.t2v", "layerkit_plugins.transparent.task:t2v_task",
             description="prompt -> RGBA video (all frames generated)")


@hookimpl
def register_datasets(register):
    register("shapes_rgba", "layerkit_plugins.transparent.data:RGBASpriteClips",
             description="shapes-world sprites on a transparent background: rgba [F, 4, H, W] + prompt")


@hookimpl
def register_config_dirs(register):
    register("pkg://layerkit_plugins.transparent.conf")
