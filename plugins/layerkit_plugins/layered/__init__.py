"""Sequence-packing tasks for layered video (LayerFlow's layout, not tied to one backbone)."""

from __future__ import annotations

from layerkit import hookimpl


@hookimpl
def register_tasks(register):
    for mode in ("generate", "decompose", "fg2bg", "bg2fg"):
        register(f"layered.{mode}", f"layerkit_plugins.layered.task:{mode}_task",
                 description=f"layers as sub-clips concatenated in time ({mode})")
