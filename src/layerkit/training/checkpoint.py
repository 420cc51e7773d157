"""Resumable checkpoints written atomically, the one before kept: a run killed mid-write, or a
``last.ckpt`` damaged later, resumes from the previous one."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from layerkit.errors import LayerkitError

PREVIOUS_NAME = "previous.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Serialise to memory, write a sibling temp file, keep the current file as ``previous.ckpt``,
    then ``os.replace`` the new one into place.

    Loading always uses ``torch.load(weights_only=True)``: a checkpoint holds tensors, the
    optimiser state, random-number states and the resolved config as plain data, never pickled
    objects.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        tmp = path.with_name(f".{path.name}.partial")
        with open(tmp, "wb") as handle:
            handle.write(buffer.getvalue())
            handle.flush()
            os.fsync(handle.fileno())
        if path.is_file():
            os.replace(path, path.with_name(PREVIOUS_NAME))
        os.replace(tmp, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A layerkit training checkpoint, read with ``torch.load(weights_only=True)``, or one sentence
    saying why it cannot be used (missing, a folder, empty, truncated, not a checkpoint, unsafe)."""
    path = Path(path)
    if path.is_dir():
        raise LayerkitError(f"checkpoint '{path}' is a directory, not a checkpoint file.")
    if not path.is_file():
        raise LayerkitError(f"checkpoint '{path}' does not exist.")
    if path.stat().st_size == 0:
        raise LayerkitError(f"checkpoint '{path}' is empty (0 bytes).")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head != b"PK\x03\x04":  # torch.save's zip archive
        hint = " (it looks like a safetensors weights file: give it as init_from= or weights=)" \
            if path.suffix == ".safetensors" or _looks_like_safetensors(path) else ""
        raise LayerkitError(f"checkpoint '{path}' is not a layerkit training checkpoint{hint}.")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "Weights only load failed" in text or "Unsupported global" in text or "GLOBAL" in text:
            raise LayerkitError(f"checkpoint '{path}' holds pickled code, which layerkit never runs; it cannot be "
                                "used to resume.") from None
        raise LayerkitError(f"checkpoint '{path}' is damaged or truncated ({type(exc).__name__}).") from None
    if not isinstance(obj, dict) or "state_dict" not in obj or "global_step" not in obj:
        raise LayerkitError(f"checkpoint '{path}' is not a layerkit training checkpoint (no state_dict/global_step).")
    return obj


def _looks_like_safetensors(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def check_fits(checkpoint: dict[str, Any], module: torch.nn.Module, path: str | os.PathLike) -> None:
    """Every tensor of the checkpoint's ``state_dict`` must exist in ``module`` with its shape."""
    own = module.state_dict()
    for key, value in checkpoint["state_dict"].items():
        if key not in own:
            raise LayerkitError(f"checkpoint '{path}' does not fit this run: it holds '{key}', which this model "
                                "lacks (was it written by another experiment?).")
        if tuple(own[key].shape) != tuple(value.shape):
            raise LayerkitError(f"checkpoint '{path}' does not fit this run: '{key}' has shape {tuple(value.shape)}, "
                                f"the model's is {tuple(own[key].shape)} (was it written by another experiment?).")
