"""layerkit-plugin-example: a third-party layerkit plugin.

layerkit imports this module through the ``layerkit`` entry point (see pyproject.toml) and
calls the functions marked ``@hookimpl``. Keep this module light: it runs on every
``layerkit`` command, ``layerkit plugins`` and ``--help`` included. Components are registered
with lazy ``"module:attr"`` targets, so torch and model code are imported only when a run
builds the component.
"""

from __future__ import annotations

from layerkit import hookimpl

__version__ = "0.1.0"


@hookimpl
def register_adapters(register):
    register("example.frame_gain", "layerkit_example.adapter:FrameGainAdapter",
             description="learnable per-channel gain on the denoiser output, zero-initialised (starts as identity)")


@hookimpl
def register_config_dirs(register):
    # conf/adapter/frame_gain.yaml ships in the wheel; Hydra reads it from the package.
    register("pkg://layerkit_example.conf")
