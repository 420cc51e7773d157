"""LayerFlow (Ji et al. 2025): layered video as sub-clips in time, layer embeddings on the
per-layer prompts, and a three-stage Motion LoRA / Content LoRA training scheme."""

from __future__ import annotations

from layerkit import hookimpl


@hookimpl
def register_commands(register):
    register("layerflow-export", "layerkit_plugins.layerflow.export:main",
             description="write a LoRA of a weights.safetensors in the diffusers and ComfyUI formats")
    register("layerflow-convert", "layerkit_plugins.layerflow.sat:main",
             description="turn the authors' released SAT checkpoint into a diffusers transformer + layerkit weights")
    register("toy-layerflow-vae", "layerkit_plugins.layerflow.toy.train_vae:main",
             description="train the toy LayerFlow's VAE on the shapes world (the diffusion stages: layerkit train)")
    register("toy-layerflow-eval", "layerkit_plugins.layerflow.toy.evaluate:main",
             description="score the toy LayerFlow (stage ablation, four tasks) on held-out shapes prompts")
    register("toy-layerflow-text", "layerkit_plugins.layerflow.toy.text:main",
             description="pretrain the toy LayerFlow's T5 contrastively on shapes-world layers and their prompts")
    register("toy-layerflow-diagnose", "layerkit_plugins.layerflow.toy.diagnose:main",
             description="the toy LayerFlow's diagnostics: VAE colours, use of the given clip, encode share of a step")


@hookimpl
def register_adapters(register):
    register("layerflow.layer_embedding", "layerkit_plugins.layerflow.adapter:LayerEmbedding",
             description="learnable Linear(1 -> D) + LayerNorm of the prompt-block index, added to the projected text tokens")


@hookimpl
def register_datasets(register):
    register("layerflow.mixture", "layerkit_plugins.layerflow.data:LayerFlowMixture",
             description="shapes-world clips for LayerFlow stages 2-3: frozen (is_static) and dynamic, optionally copy-pasted")
    register("layerflow.folder", "layerkit_plugins.layerflow.folder:LayeredFolder",
             description="layered videos on disk: <root>/<sample>/ foreground (RGBA or + alpha), background, blended, prompts.json")
    register("layerflow.images", "layerkit_plugins.layerflow.folder:LayeredImages",
             description="multi-layer RGBA images on disk, each held for every frame (frozen videos, is_static)")
    register("layerflow.copy_paste", "layerkit_plugins.layerflow.folder:CopyPaste",
             description="RGBA foreground clips pasted over background clips from two directories; static or dynamic")
    register("layerflow.mix", "layerkit_plugins.layerflow.folder:Mix",
             description="named datasets mixed by weight with a seed (e.g. images 0.8, copy_paste 0.2)")


@hookimpl
def register_config_dirs(register):
    register("pkg://layerkit_plugins.layerflow.conf")
