"""Weights on disk: safetensors by default; a pickle only through ``torch.load(weights_only=True)``.

layerkit's own safetensors files carry a checksum of their tensors in the metadata
(``layerkit_sha256``: sha256 over each tensor's name, dtype, shape and bytes, in key order);
:func:`load_weights` verifies it when present, so flipped bits fail with one sentence. Files
written by other tools have no such key and load as before.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from layerkit.errors import LayerkitError

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
CHECKSUM_KEY = "layerkit_sha256"


def tensors_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over each tensor's name, dtype, shape and raw bytes, in sorted key order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        head = json.dumps([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape)])
        digest.update(len(head).to_bytes(8, "little") + head.encode())
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()  # any dtype (bf16, fp8) as bytes
        digest.update(raw.nbytes.to_bytes(8, "little"))
        digest.update(raw)
    return digest.hexdigest()


def _output_mode() -> int:
    """The mode an ordinary new file gets: ``0o666`` less the process umask (0644 under umask 022)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read the umask by setting it, and put it back at once
    os.umask(mask)
    return 0o666 & ~mask


def _check_file(path: Path, what: str) -> None:
    """Refuse, in one sentence, what is not a readable non-empty regular file."""
    try:
        info = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LayerkitError(f"{what} '{path}' is a symlink loop.") from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR) and path.is_symlink():
            raise LayerkitError(f"{what} '{path}' is a broken symlink (to '{os.readlink(path)}').") from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise LayerkitError(f"{what} '{path}' does not exist.") from None
        raise LayerkitError(f"{what} '{path}' cannot be read ({exc.strerror or exc}).") from None
    if stat.S_ISDIR(info.st_mode):
        raise LayerkitError(f"{what} '{path}' is a directory, not a file.")
    if not stat.S_ISREG(info.st_mode):
        raise LayerkitError(f"{what} '{path}' is not a regular file.")
    if info.st_size == 0:
        raise LayerkitError(f"{what} '{path}' is empty (0 bytes).")


def _first_sentence(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = text.split(". ")[0].rstrip(".")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LayerkitError(
            f"weights file '{path}' is not a readable safetensors file: truncated or corrupt "
            f"({' '.join(str(exc).split()).rstrip('.')})."
        ) from None
    expected = metadata.get(CHECKSUM_KEY)
    if expected is not None and tensors_sha256(state) != expected:
        raise LayerkitError(
            f"weights file '{path}' is corrupt: its tensors do not match the checksum ({CHECKSUM_KEY}) "
            "stored when layerkit wrote it."
        )
    return state


def _unwrap(obj: Any) -> Any:
    """The state dict inside a Lightning checkpoint (``state_dict``) or a DeepSpeed/SAT
    ``mp_rank_00_model_states.pt`` (``module``, beside non-tensor bookkeeping)."""
    if not isinstance(obj, dict):
        return obj
    if isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"]
    if isinstance(obj.get("module"), dict) and not any(
        isinstance(v, torch.Tensor) for k, v in obj.items() if k != "module"
    ):
        return obj["module"]
    return obj


def load_weights(path: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A flat state dict from a ``.safetensors`` file (or, with ``allow_pickle``, a torch pickle
    read with ``weights_only=True``; a Lightning checkpoint's ``state_dict`` and a DeepSpeed/SAT
    checkpoint's ``module`` are unwrapped). A layerkit checksum in the metadata is verified."""
    path = Path(path)
    _check_file(path, "weights file")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if not allow_pickle:
        raise LayerkitError(
            f"checkpoint '{path}' is not a safetensors file; convert it with `layerkit convert` "
            "or pass allow_pickle=true to read it with torch.load(weights_only=True)."
        )
    try:
        obj: Any = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        unsafe = next((line.split("Unsupported global:")[1].split(".")[0].strip()
                       for line in text.splitlines() if "Unsupported global:" in line), None)
        if unsafe is None and "Weights only load failed" in text:  # torch >= 2.6 words it so
            unsafe = next((line.split("GLOBAL", 1)[1].split(" whose")[0].strip()
                           for line in text.splitlines() if "unsupported GLOBAL" in line), "a pickled object")
        if unsafe is not None:
            raise LayerkitError(
                f"checkpoint '{path}' could not be read safely with torch.load(weights_only=True) "
                f"({unsafe.rstrip('.')}); layerkit never unpickles code."
            ) from None
        raise LayerkitError(
            f"checkpoint '{path}' is truncated or corrupt: torch.load(weights_only=True) could not read it "
            f"({_first_sentence(exc)})."
        ) from None
    obj = _unwrap(obj)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LayerkitError(f"checkpoint '{path}' does not hold a flat mapping of names to tensors.")
    return obj


def save_weights(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> Path:
    """Write a safetensors file atomically, with the checksum of its tensors (``layerkit_sha256``)
    and the permissions of any other output (``0o666`` less the umask); ``metadata`` values are
    stored as JSON strings."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta[CHECKSUM_KEY] = tensors_sha256(tensors)
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.chmod(tmp, _output_mode())  # safetensors creates its file 0600
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
        if k == CHECKSUM_KEY:  # a hex digest, never JSON (some would parse as a number)
            out[k] = v
            continue
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def save_fp16_copy(src: str | Path, dst: str | Path) -> Path:
    """Copy a safetensors file with every floating tensor in fp16, metadata kept and the checksum
    recomputed (committed toy weights: half the bytes; they are run in fp32). The source's own
    checksum, when it has one, is verified first."""
    from safetensors import safe_open

    state = load_weights(src)
    with safe_open(str(src), framework="pt") as f:
        metadata = {k: v for k, v in (f.metadata() or {}).items() if k != CHECKSUM_KEY}
    state = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    return save_weights(dst, state, metadata=metadata)
