"""Output directories and run records: no silent overwrite, nothing half-written left behind."""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata as metadata
import json
import os
import platform
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from layerkit.errors import LayerkitError

RUN_DIR_ENV = "LAYERKIT_RUN_DIR"  # set by rank 0 so DDP children reuse its directory
RECORD_NAME = "record.json"
LOCK_NAME = ".layerkit.lock"
#: what a training run leaves in its folder before it has written anything else (logs, its lock,
#: checkpoints or a checkpoint being written): such a folder is resumed or restarted, never refused
TRACES = ("logs", "checkpoints", LOCK_NAME)
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


def only_traces(path: Path) -> bool:
    """True when ``path`` holds nothing but what an interrupted training run leaves (no record,
    no weights, no file of anyone else's)."""
    return path.is_dir() and all(p.name in TRACES or p.name.endswith(".partial") for p in path.iterdir())


def check_output_dir(path: Path, *, overwrite: bool, resumable: bool = False) -> None:
    """Fail before any work when ``path`` holds something and ``overwrite`` is not set.

    With ``resumable`` (training), a folder holding a checkpoint resumes, and one holding only an
    interrupted run's traces (logs, a lock, a partial checkpoint) restarts.
    """
    if path.exists() and not path.is_dir():
        raise LayerkitError(f"output_dir '{path}' exists and is a file, not a directory.")
    if not _has_content(path) or overwrite:
        return
    if resumable and ((path / "checkpoints").is_dir() or only_traces(path) or (path / RECORD_NAME).is_file()):
        return
    raise LayerkitError(
        f"output_dir '{path}' already exists and is not empty; pass overwrite=true (the old folder is moved "
        "aside, not deleted) or choose another output_dir."
    )


def set_aside(path: Path) -> Path | None:
    """``overwrite=true``: move an existing non-empty ``path`` to a sibling ``NAME.replaced-STAMP``
    (nothing is deleted; the message says where it went). Returns the new place, or None."""
    if not _has_content(path):
        return None
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.replaced-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.replaced-{stamp}-{n}")
    os.replace(path, target)
    print(f"layerkit: overwrite=true: the old output_dir '{path}' was moved to '{target}'", file=sys.stderr)
    return target


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def run_lock(path: Path) -> Iterator[None]:
    """One run per folder: ``path/.layerkit.lock`` holds the owner's pid and host while it runs.
    A second run fails with one sentence naming the first; a lock left by a dead process on this
    host is taken over. A folder this run created and left empty (it failed before writing
    anything) is removed again: a failed start leaves nothing behind."""
    created = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    lock = path / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = {}
            pid, host = holder.get("pid"), holder.get("host")
            if isinstance(pid, int) and host == me["host"] and not _alive(pid):
                lock.unlink(missing_ok=True)  # its owner is gone: a killed run's lock
                continue
            if not holder:  # being written by a run that started this instant
                raise LayerkitError(f"output_dir '{path}' is being used by another layerkit run that is starting; "
                                    "choose another output_dir.") from None
            raise LayerkitError(
                f"output_dir '{path}' is in use by another layerkit run (pid {pid} on {host}, since "
                f"{holder.get('started')}); wait for it to finish or choose another output_dir"
                + (f" (if that run is gone, delete {lock})." if host != me["host"] else ".")) from None
        with os.fdopen(fd, "w") as handle:
            json.dump(me, handle)
        break
    else:  # pragma: no cover - three stale locks in a row
        raise LayerkitError(f"output_dir '{path}': could not take its lock {lock}.")
    failed = True
    try:
        yield
        failed = False
    finally:
        lock.unlink(missing_ok=True)
        if created and failed:  # a folder this failed run made: drop the empty folders in it (e.g. a logger's)
            for root, _dirs, _files in os.walk(path, topdown=False):
                if Path(root) != path:
                    with contextlib.suppress(OSError):
                        Path(root).rmdir()
        for folder in created:  # innermost first
            try:
                folder.rmdir()
            except OSError:
                break


@contextlib.contextmanager
def staged_output_dir(path: Path, *, overwrite: bool) -> Iterator[Path]:
    """Write into a sibling staging directory and move it into place only on success
    (``overwrite``: the old folder is moved aside first, never deleted)."""
    check_output_dir(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if overwrite:
        set_aside(path)
    elif path.exists():
        path.rmdir()  # empty (checked above)
    os.replace(staging, path)


def merge_metrics(logs: Path, parts: list[Path]) -> None:
    """Put the metrics of earlier attempts (``parts``, oldest first) in front of ``logs/metrics.csv``:
    a resumed run's log continues, it is never truncated. Columns are the union, in order."""
    import csv

    current = logs / "metrics.csv"
    files = [p for p in [*parts, current] if p.is_file()]
    if not parts or not files:
        return
    rows: list[dict[str, str]] = []
    columns: list[str] = []
    for f in files:
        with f.open(newline="") as handle:
            reader = csv.DictReader(handle)
            for name in reader.fieldnames or []:
                if name not in columns:
                    columns.append(name)
            rows += list(reader)
    tmp = logs / ".metrics.csv.partial"
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, current)
    for p in parts:
        p.unlink(missing_ok=True)


def stash_metrics(logs: Path) -> list[Path]:
    """Before a resumed fit (the CSV logger starts its file afresh): keep ``metrics.csv`` aside."""
    current = logs / "metrics.csv"
    if not current.is_file():
        return [p for p in sorted(logs.glob("metrics.part*.csv"))]
    n = len(list(logs.glob("metrics.part*.csv")))
    target = logs / f"metrics.part{n:03d}.csv"
    os.replace(current, target)
    return sorted(logs.glob("metrics.part*.csv"))


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


def run_summary(run: Path, root: Path | None = None) -> dict[str, Any]:
    """What a model card needs of a ``layerkit train`` run folder: step count, final loss,
    trainable parameters, seed, versions, the loss curve from ``logs/metrics.csv``, the fit's wall
    time (the log folder appears when fitting starts, the weights at the end) and the config.
    Paths under ``root`` (a repository's folder) are written relative to it, so a committed
    summary names no one's machine."""
    import csv

    record = json.loads((run / RECORD_NAME).read_text())
    metrics = run / "logs" / "metrics.csv"
    losses = []
    if metrics.is_file():
        with metrics.open() as handle:
            losses = [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(handle) if r.get("train/loss")]
    keep = {k: record.get(k) for k in ("global_step", "final_loss", "trainable_parameters", "seed", "versions", "time")}
    if record.get("latent_cache"):  # the VAE passes its latent cache encoded and served
        keep["latent_cache"] = record["latent_cache"]
    keep["wall_seconds"] = round((run / "weights.safetensors").stat().st_mtime - (run / "logs").stat().st_ctime, 1)
    keep["loss_every_25_steps"] = losses
    keep["config"] = record.get("config")
    if root is not None:
        prefix = str(Path(root).resolve()) + "/"
        keep = json.loads(json.dumps(keep, default=str).replace(prefix, ""))
    return keep
