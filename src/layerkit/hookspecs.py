"""The hooks a layerkit plugin may implement. Every hook receives a ``register`` callback.

``register(name, target, description="", *, override=False)`` records one component.
``target`` is either a dotted path ``"package.module:Attribute"`` (imported only when the
component is built, so ``layerkit --help`` stays light) or a callable factory. A task may also
declare ``inputs=`` and ``files=`` (its ``input_keys`` and ``file_keys``): then a misspelt
``inputs.*`` key or a missing input file is refused before torch or the task's module is
imported (about a second instead of several); without them the task is built to ask it.

A name belongs to one plugin. The names layerkit's own plugins register (``toy.dit``, ``lora``,
...) can never be taken: a plugin registering one fails to load, listed by ``layerkit plugins``
with one sentence naming both distributions. When two other plugins register one name, looking
that name up fails with one sentence naming both distributions, unless exactly one of them
registered it with ``override=True``: a plugin that means to replace another package's
component says so, and then wins (over third-party registrations only, never over layerkit's
own). Any exception raised while a plugin is imported or registers (``SystemExit`` included;
only the user's Ctrl-C stops the program) is contained: that plugin is listed as failed with
its message and the others load.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("layerkit")

Register = Callable[..., Any]


@hookspec
def register_backbones(register: Register) -> None:
    """Register denoiser families (denoiser, VAE, encoders, schedule, checkpoint loaders)."""


@hookspec
def register_controls(register: Register) -> None:
    """Register per-layer control signals: a non-learned ``prepare`` plus a learned encoder."""


@hookspec
def register_adapters(register: Register) -> None:
    """Register changes to backbone modules with their own weights and scale (LoRA, attention processors)."""


@hookspec
def register_tasks(register: Register) -> None:
    """Register tasks: how a sample is packed for the backbone and how outputs are unpacked and written."""


@hookspec
def register_datasets(register: Register) -> None:
    """Register datasets that yield samples a task can pack."""


@hookspec
def register_stages(register: Register) -> None:
    """Register sampling stages: steps that run before the denoising loop with the run's parts,
    device and dtype (e.g. Layer-Animate's transparent image before its animation)."""


@hookspec
def register_curation_steps(register: Register) -> None:
    """Register curation steps (segmenter, optical flow, tracker, sketch extractor, cut detector)."""


@hookspec
def register_commands(register: Register) -> None:
    """Register ``layerkit`` subcommands: ``register(name, "pkg.module:main", description)``;
    ``main(argv: list[str]) -> int`` receives the arguments after the command name."""


@hookspec
def register_config_dirs(register: Register) -> None:
    """Register Hydra config directories (a filesystem path or ``pkg://package.subdir``)."""
