"""Generic peft LoRA adapter with a per-sample scale."""

from __future__ import annotations

from layerkit import hookimpl


@hookimpl
def register_adapters(register):
    register("lora", "layerkit_plugins.lora.adapter:LoRAAdapter",
             description="peft LoRA on chosen linear layers of the denoiser; scale global or per sample")


@hookimpl
def register_config_dirs(register):
    register("pkg://layerkit_plugins.lora.conf")
