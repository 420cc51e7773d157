"""Resumable checkpoints written atomically: a run killed mid-write keeps its previous one."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Serialise to memory, write a sibling temp file, then ``os.replace`` it into place.

    Loading always uses ``torch.load(weights_only=True)``: a checkpoint holds tensors, the
    optimiser state and the resolved config as plain data, never pickled objects.
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
        os.replace(tmp, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return torch.load(str(path), map_location=map_location or "cpu", weights_only=True)
