"""LayerFlow's tasks are the generic layered sequence-packing tasks (sec. 3.1) under LayerFlow's
names: RGBA layout [foreground, alpha, background, blended], "index, " prompt prefixes, and
``scale_from`` mapping a sample key to an adapter's per-sample scale (Motion LoRA: ``is_static``)."""

from __future__ import annotations

from typing import Any

from layerkit_plugins.layered.task import LayeredTask


class LayerFlowTask(LayeredTask):
    def __init__(self, mode: str = "generate", **kwargs: Any) -> None:
        super().__init__(mode=mode, **kwargs)
        self.name = f"layerflow.{mode}"


def generate_task(**kwargs: Any) -> LayerFlowTask:
    return LayerFlowTask(mode="generate", **kwargs)


def decompose_task(**kwargs: Any) -> LayerFlowTask:
    return LayerFlowTask(mode="decompose", **kwargs)


def fg2bg_task(**kwargs: Any) -> LayerFlowTask:
    return LayerFlowTask(mode="fg2bg", **kwargs)


def bg2fg_task(**kwargs: Any) -> LayerFlowTask:
    return LayerFlowTask(mode="bg2fg", **kwargs)
