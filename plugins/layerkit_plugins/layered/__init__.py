"""The ``layered`` task: layers as sub-clips concatenated in time (LayerFlow's layout, not tied to
one backbone), and its shapes-world evaluator."""

from __future__ import annotations

from layerkit import hookimpl


@hookimpl
def register_tasks(register):
    register("layered", "layerkit_plugins.layered.task:LayeredTask",
             description="layers as sub-clips in time: generate, decompose (blended given), fg2bg, bg2fg; "
                         "mode auto picks it from the input files")


@hookimpl
def register_config_dirs(register):
    register("pkg://layerkit_plugins.layered.conf")
