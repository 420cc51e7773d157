from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# A small, fast version of the toy world for tests: 4 frames of 16x16, a 2-layer DiT.
TINY_BACKBONE = ["backbone.hidden=32", "backbone.heads=2", "backbone.layers=2", "backbone.sample_size=16"]
TINY = [
    *TINY_BACKBONE,
    "data.num_frames=4",
    "data.height=16",
    "data.width=16",
    "data.size=16",
    "train.batch_size=2",
]
TINY_SAMPLE = [
    *TINY_BACKBONE,
    "sampler.num_frames=4",
    "sampler.height=16",
    "sampler.width=16",
    "sampler.steps=3",
    "sampler.progress=false",
]


@pytest.fixture(autouse=True)
def _small_torch():
    torch.set_num_threads(int(os.environ.get("LAYERKIT_TEST_THREADS", "2")))
    yield


@pytest.fixture
def registry():
    """A fresh registry loaded from the installed entry points."""
    from layerkit.registry import Registry, set_registry

    reg = Registry().load_entry_points()
    set_registry(reg)
    yield reg
    set_registry(None)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``layerkit ARGS`` in a subprocess, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "layerkit.cli", *args], cwd=cwd, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )
