"""Output directories and run records: no silent overwrite, nothing half-written left behind."""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata as metadata
import json
import os
import platform
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from layerkit.errors import LayerkitError

RUN_DIR_ENV = "LAYERKIT_RUN_DIR"  # set by rank 0 so DDP children reuse its directory
RECORD_NAME = "record.json"
VERSION_PACKAGES = ("layerkit", "torch", "torchvision", "diffusers", "peft", "transformers",
                    "lightning", "hydra-core", "av", "safetensors", "numpy")


def default_output_dir(command: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{command}-{stamp}"


def is_child_process() -> bool:
    """True in the extra processes a multi-process strategy launches."""
    return any(os.environ.get(k, "0") not in ("0", "") for k in ("LOCAL_RANK", "NODE_RANK")) and bool(
        os.environ.get(RUN_DIR_ENV)
    )


def _has_content(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def check_output_dir(path: Path, *, overwrite: bool, resumable: bool = False) -> None:
    """Fail before any work when ``path`` holds something and ``overwrite`` is not set.

    A training directory that holds a checkpoint is fine when ``resumable``: the run resumes.
    """
    if path.exists() and not path.is_dir():
        raise LayerkitError(f"output_dir '{path}' exists and is a file, not a directory.")
    if not _has_content(path) or overwrite:
        return
    if resumable and (path / "checkpoints" / "last.ckpt").is_file():
        return
    raise LayerkitError(
        f"output_dir '{path}' already exists and is not empty; pass overwrite=true or choose another output_dir."
    )


@contextlib.contextmanager
def staged_output_dir(path: Path, *, overwrite: bool) -> Iterator[Path]:
    """Write into a sibling staging directory and move it into place only on success."""
    check_output_dir(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(staging, path)


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_record(directory: Path, *, command: str, config: dict[str, Any], seed: int | None,
                 files: list[str], extra: dict[str, Any] | None = None, final_dir: Path | None = None) -> Path:
    """``record.json``: command, resolved config, seed, package versions, files written."""
    record = {
        "command": command,
        "argv": sys.argv,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "output_dir": str((final_dir or directory).resolve()),
        "seed": seed,
        "versions": package_versions(),
        "files": sorted(files),
        "config": config,
        **(extra or {}),
    }
    path = directory / RECORD_NAME
    tmp = path.with_name(f".{RECORD_NAME}.partial")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, path)
    return path


def list_files(directory: Path) -> list[str]:
    return [str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")]
