"""Hydra composition: the core ``conf/`` plus the config directories plugins register.

The core's ``conf/`` ships inside the wheel as ``layerkit/conf``; in a source checkout it is
the top-level ``conf/``. Plugins add directories through the ``register_config_dirs`` hook and
never touch Hydra internals: they become ``hydra.searchpath`` entries here.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from layerkit.errors import LayerkitError
from layerkit.registry import Registry

#: config group -> registry kind whose names its nodes' ``name`` must hold
GROUP_KINDS = {"backbone": "backbone", "task": "task", "data": "dataset"}
DICT_KINDS = {"controls": "control", "adapters": "adapter"}


def core_config_dir() -> Path:
    """The directory of the core's primary configs (installed wheel first, then checkout)."""
    installed = importlib.resources.files("layerkit") / "conf"
    if installed.is_dir():
        return Path(str(installed))
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if checkout.is_dir():
        return checkout
    raise LayerkitError("layerkit's config directory is missing from this installation; reinstall layerkit.")


def package_path(spec: str) -> str:
    """``${pkg:package.name/relative/path}``: a file shipped inside an importable package
    (committed toy weights), as an absolute path that works from a checkout or a wheel."""
    package, _, relative = spec.partition("/")
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise LayerkitError(f"config value ${{pkg:{spec}}} names package '{package}', which is not installed.") from None
    return str(root / relative) if relative else str(root)


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("pkg"):
        OmegaConf.register_new_resolver("pkg", package_path)


def compose(primary: str, overrides: Sequence[str], registry: Registry) -> DictConfig:
    """Compose ``primary`` (``train`` or ``sample``) with command-line ``overrides``.

    A primary config may name a ``default_experiment``: it applies when the command line
    names none (``layerkit sample`` alone runs the embedded default; ``+experiment=NAME``
    replaces it).
    """
    overrides = list(overrides)
    if not any(o.lstrip("+~").startswith("experiment=") for o in overrides):
        head = _compose(primary, [o for o in overrides if o.startswith("default_experiment=")], registry)
        if head.get("default_experiment"):
            overrides.insert(0, f"+experiment={head.default_experiment}")
    cfg = _compose(primary, overrides, registry)
    validate(cfg, registry)
    _check_resolves(cfg)
    return cfg


def _check_resolves(cfg: DictConfig) -> None:
    """Every interpolation must resolve now, not deep inside a run: ``~layerflow.stage1_weights``
    leaves ``${layerflow.stage1_weights}`` elsewhere pointing at nothing (one sentence, no traceback)."""
    from omegaconf.errors import InterpolationKeyError, OmegaConfBaseException

    try:
        OmegaConf.to_container(cfg, resolve=True)  # a resolved copy; cfg itself stays as composed
    except OmegaConfBaseException as exc:
        message = str(exc).splitlines()[0].strip().rstrip(".")
        own = f"{LayerkitError.__name__} raised while resolving interpolation: "
        if message.startswith(own):  # a resolver's own sentence (``${pkg:...}`` naming a missing package)
            raise LayerkitError(message[len(own):] + ".") from None
        key = getattr(exc, "full_key", None)
        where = f" at '{key}'" if key else ""
        hint = " (was a key it refers to removed with '~' or misspelt?)" if isinstance(exc, InterpolationKeyError) else ""
        raise LayerkitError(f"the configuration does not resolve{where}: {message}{hint}.") from None


def _compose(primary: str, overrides: Sequence[str], registry: Registry) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    _register_resolvers()
    overrides = list(overrides)
    if registry.config_dirs:
        overrides.append(f"hydra.searchpath=[{','.join(registry.config_dirs)}]")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(core_config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name=primary, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise LayerkitError(_one_line(exc)) from None
    finally:
        GlobalHydra.instance().clear()
    if "hydra" in cfg:
        with _writable(cfg):
            del cfg["hydra"]
    return cfg


def search_dirs(registry: Registry) -> list[Path]:
    """The core's config directory and every plugin's, as filesystem paths."""
    dirs = [core_config_dir()]
    for spec in registry.config_dirs:
        if spec.startswith("pkg://"):
            package = spec[len("pkg://"):]
            try:
                dirs.append(Path(str(importlib.resources.files(package))))
            except (ModuleNotFoundError, TypeError):
                continue
        elif spec.startswith("file://"):
            dirs.append(Path(spec[len("file://"):]))
    return dirs


def list_group(group: str, registry: Registry) -> dict[str, str]:
    """Config names of ``group`` on the search path -> the first line of each file's comment."""
    out: dict[str, str] = {}
    for root in search_dirs(registry):
        for path in sorted((root / group).glob("*.yaml")) if (root / group).is_dir() else []:
            words: list[str] = []
            for line in path.read_text(encoding="utf-8").splitlines():
                text = line.strip()
                if not text.startswith("#") or text.startswith("# @package") or not text.lstrip("#").strip():
                    if words or (text and not text.startswith("#")):
                        break
                    continue
                words += text.lstrip("#").split()
                if words[-1].endswith((".", ":")) and not words[-1].endswith("sec."):
                    break
            about = re.split(r"(?<!sec)\. ", " ".join(words))[0].rstrip(".:")
            out.setdefault(path.stem, about if len(about) <= 120 else about[:117] + "...")
    return dict(sorted(out.items()))


def validate(cfg: DictConfig, registry: Registry) -> None:
    """Every component name must exist in the registry; fail with the names that do."""
    for group, kind in GROUP_KINDS.items():
        node = cfg.get(group)
        if node is None:
            continue
        if not isinstance(node, DictConfig) or "name" not in node:
            raise LayerkitError(f"config group '{group}' must be a mapping with a 'name' key naming a {kind}.")
        registry.get(kind, node.name)
    for key, kind in DICT_KINDS.items():
        node = cfg.get(key)
        if node is None:
            continue
        if not isinstance(node, DictConfig):
            raise LayerkitError(f"'{key}' must be a mapping from a name to a {kind} config, not {type(node).__name__}.")
        for entry, sub in node.items():
            if sub is None:
                continue
            if not isinstance(sub, DictConfig) or "name" not in sub:
                raise LayerkitError(f"{key}.{entry} must be a mapping with a 'name' key naming a {kind}.")
            registry.get(kind, sub.name)


def params(node: DictConfig | None) -> dict[str, Any]:
    """A component's keyword arguments: its config node without ``name``."""
    if node is None:
        return {}
    data = OmegaConf.to_container(node, resolve=True)
    assert isinstance(data, dict)
    data.pop("name", None)
    return data


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    return data


class _writable:
    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def __enter__(self) -> None:
        OmegaConf.set_struct(self.cfg, False)

    def __exit__(self, *exc: object) -> None:
        OmegaConf.set_struct(self.cfg, True)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return f"the configuration could not be composed ({type(exc).__name__})."
    head = lines[0]
    if head.startswith("Could not override") and len(lines) > 1:
        head = f"{head.rstrip('.')}: {lines[-1]}"
    # Hydra lists the available options on the following lines: keep them on one line.
    options = []
    for line in lines[1:]:
        low = line.lower()
        if low.startswith("config search path"):
            break
        if not low.startswith(("in '", "available options")):
            options.append(line)
    if ("Could not find" in head or "Could not load" in head) and options:
        head = f"{head.rstrip('.')}; available: {', '.join(o.strip() for o in options)}"
    head = head if head.endswith(".") else head + "."
    if head.startswith("Ambiguous value for argument"):
        key = head.split("'")[1].split("=", 1)[0] if "'" in head else "KEY"
        head = (f"{head[:-1]}: a value with a comma must be quoted for Hydra, e.g. "
                f"\"{key}='a red circle, moving left'\" (the outer quotes for the shell).")
    return head
