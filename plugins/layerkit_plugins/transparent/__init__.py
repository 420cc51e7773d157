"""Layer-Animate's transparent video (seed 003): Inter-Frame Attention, the i2v/t2v tasks with
stage 1 (LayerDiffuse transparent image) for t2v, RGBA sprite clips from the shapes world and
folders of real RGBA videos. Pairs with the ``animatediff`` backbone."""

from __future__ import annotations

from layerkit import hookimpl

#: what ``inputs.*`` the tasks take (their ``input_keys`` and ``file_keys``), declared here so a
#: wrong key or a missing file is refused before torch is imported
INPUT_KEYS = ("num_samples", "seed", "split", "prompt", "image", "fit")
FILE_KEYS = ("image",)


@hookimpl
def register_adapters(register):
    register("transparent.inter_frame_attention", "layerkit_plugins.transparent.inter_frame:InterFrameAttention",
             description="Layer-Animate Inter-Frame Attention: every frame also attends to the middle frame "
                         "through the frozen W_K/W_V; only W_Q' and zero-initialised W_O' train")


@hookimpl
def register_tasks(register):
    register("transparent.i2v", "layerkit_plugins.transparent.task:i2v_task", inputs=INPUT_KEYS, files=FILE_KEYS,
             description="RGBA image as the clean middle frame -> RGBA video")
    register("transparent.t2v", "layerkit_plugins.transparent.task:t2v_task", inputs=INPUT_KEYS, files=FILE_KEYS,
             description="prompt -> transparent image (stage 1, LayerDiffuse) -> RGBA video around it (stage 2)")


@hookimpl
def register_stages(register):
    register("transparent.image", "layerkit_plugins.transparent.stage1:TransparentImageStage",
             description="Layer-Animate stage 1 for t2v: the prompt's transparent middle frame from the backbone's "
                         "SD 1.5 image UNet + LayerDiffuse transparent attention + transparent decoder")


@hookimpl
def register_datasets(register):
    register("shapes_rgba", "layerkit_plugins.transparent.data:RGBASpriteClips",
             description="shapes-world sprites on a transparent background: rgba [F, 4, H, W] + prompt")
    register("transparent.rgba_folder", "layerkit_plugins.transparent.data:RGBAFolder",
             description="a folder of RGBA videos (.mov ProRes 4444, .webm VP9 alpha, PNG folders) with captions")
    register("transparent.sampling_only", "layerkit_plugins.transparent.data:SamplingOnly",
             description="data of sampling-only experiments (the paper's baselines): refuses to train, saying why")


@hookimpl
def register_commands(register):
    register("toy-transparent", "layerkit_plugins.transparent.toy.train:main",
             description="rebuild the toy transparent model (latent transparency, base, stage 2) on the shapes world")
    register("toy-transparent-eval", "layerkit_plugins.transparent.toy.evaluate:main",
             description="score the toy transparent model and its ablations on held-out sprites")


@hookimpl
def register_config_dirs(register):
    register("pkg://layerkit_plugins.transparent.conf")
