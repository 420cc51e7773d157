"""What every curation step shares: the roles, frame checks, local weights and devices.

A curation step is a callable built from its config node (``registry.build("curation_step",
name, **params)``) with a ``role`` attribute saying which slot it fills:

| role | call | returns |
| --- | --- | --- |
| ``flow`` | ``step(frames)`` | :class:`~layerkit_plugins.curation.flow.Flow` |
| ``segmenter`` | ``step(frames, flow)`` | element labels ``int32 [F, H, W]`` (0 = no element) |
| ``tracker`` | ``step(frames, points, flow)`` | tracks ``float32 [F, P, 2]`` (x, y), visibility ``[F, P]`` |
| ``sketch`` | ``step(frames)`` | line strength ``float32 [F, H, W]`` in [0, 1], 1 = line |
| ``cuts`` | ``step(frames, flow)`` | :class:`~layerkit_plugins.curation.cuts.CutReport` |

``frames`` are always RGB ``uint8 [F, H, W, 3]``. Learned steps take their weights from a local
path only (nothing is downloaded) and fail with one sentence when it is missing or holds another model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from layerkit.errors import LayerkitError

ROLES = ("flow", "segmenter", "tracker", "sketch", "cuts")


def check_frames(frames: Any, *, min_frames: int = 1) -> np.ndarray:
    """``frames`` as a contiguous RGB ``uint8 [F, H, W, 3]`` array with at least ``min_frames``."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise LayerkitError(f"curation steps take RGB uint8 frames [F, H, W, 3], got {frames.dtype} {frames.shape}.")
    if frames.shape[0] < min_frames:
        raise LayerkitError(f"this step needs at least {min_frames} frames, got {frames.shape[0]}.")
    return np.ascontiguousarray(frames)


def resolve_device(device: str = "auto") -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise LayerkitError(f"device '{device}' was asked for, but no CUDA device is available; use device=cpu.")
    return str(device)


def local_path(path: Any, what: str, key: str, *, kind: str = "file") -> Path:
    """A user-given local weights path that exists (``kind`` "file" or "dir"), or one sentence why not."""
    if path in (None, "", "???"):
        raise LayerkitError(f"{what} needs local weights and none were given: set {key}=/path/to/them.")
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise LayerkitError(f"{what} weights path '{p}' does not exist.")
    if kind == "file" and not p.is_file():
        raise LayerkitError(f"{what} weights path '{p}' is a directory; give the weights file itself.")
    if kind == "dir" and not p.is_dir():
        raise LayerkitError(f"{what} weights path '{p}' is a file; give the directory that holds config.json.")
    return p


def load_state_dict(path: Any, what: str, key: str) -> dict[str, Any]:
    """Tensors of a local ``.safetensors`` or pickled torch file (read with ``weights_only=True``).

    A checkpoint that wraps its tensors (``{"state_dict": ...}``, ``{"model": ...}``) is unwrapped.
    """
    import torch

    p = local_path(path, what, key)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = " ".join(str(exc).split())[:160]
        raise LayerkitError(f"{what} weights '{p}' could not be read as a weights file ({type(exc).__name__}: {reason}).") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LayerkitError(f"{what} weights '{p}' hold no state dict of tensors.")
    return state


def check_role(step: Any, role: str, name: str) -> Any:
    """Fail when a configured step does not fill ``role`` (a tracker set as the flow, say)."""
    got = getattr(step, "role", None)
    if got != role:
        raise LayerkitError(f"curation step '{name}' is a {got or 'step of unknown role'}, not a {role}; "
                            f"choose a {role} step for this slot.")
    return step
