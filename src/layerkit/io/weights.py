"""Weights on disk: safetensors by default; a pickle only through ``torch.load(weights_only=True)``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from layerkit.errors import LayerkitError

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}


def load_weights(path: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A flat state dict from a ``.safetensors`` file (or, with ``allow_pickle``, a torch pickle
    read with ``weights_only=True``; a Lightning checkpoint's ``state_dict`` is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise LayerkitError(f"weights file '{path}' does not exist.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise LayerkitError(f"weights file '{path}' is not a readable safetensors file ({exc}).") from None
    if not allow_pickle:
        raise LayerkitError(
            f"checkpoint '{path}' is not a safetensors file; convert it with `layerkit convert` "
            "or pass allow_pickle=true to read it with torch.load(weights_only=True)."
        )
    try:
        obj: Any = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        detail = next((line.split("Unsupported global:")[1].split(".")[0].strip()
                       for line in str(exc).splitlines() if "Unsupported global:" in line), type(exc).__name__)
        raise LayerkitError(
            f"checkpoint '{path}' could not be read safely with torch.load(weights_only=True) ({detail.rstrip('.')}); "
            "layerkit never unpickles code."
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LayerkitError(f"checkpoint '{path}' does not hold a flat mapping of names to tensors.")
    return obj


def save_weights(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> Path:
    """Write a safetensors file atomically; ``metadata`` values are stored as JSON strings."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata stored by :func:`save_weights`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    out: dict[str, Any] = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out
