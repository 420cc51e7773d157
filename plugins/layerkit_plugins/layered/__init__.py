"""The ``layered`` task: layers as sub-clips concatenated in time (LayerFlow's layout, not tied to
one backbone), and its shapes-world evaluator."""

from __future__ import annotations

from layerkit import hookimpl

#: what ``inputs.*`` the task takes (``LayeredTask.input_keys``, ``file_keys``), declared here so a
#: wrong key or a missing file is refused before torch is imported
PROMPT_KEYS = ("foreground_prompt", "background_prompt", "prompt")
FILE_KEYS = ("foreground", "alpha", "background", "blended")
INPUT_KEYS = ("num_samples", "seed", "split", *PROMPT_KEYS, *FILE_KEYS, "fit")


@hookimpl
def register_tasks(register):
    register("layered", "layerkit_plugins.layered.task:LayeredTask", inputs=INPUT_KEYS, files=FILE_KEYS,
             description="layers as sub-clips in time: generate, decompose (blended given), fg2bg, bg2fg; "
                         "mode auto picks it from the input files")


@hookimpl
def register_config_dirs(register):
    register("pkg://layerkit_plugins.layered.conf")
