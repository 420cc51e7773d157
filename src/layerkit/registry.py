"""The plugin registry: pluggy over the ``layerkit`` entry-point group, fault-tolerant.

A plugin that fails to import (or whose hook raises) is recorded with its error and skipped;
``LAYERKIT_STRICT_PLUGINS=1`` turns such a failure into an error, for plugin authors.
Components are registered by name with lazy targets, so listing plugins imports no model code.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from layerkit import hookspecs
from layerkit.errors import LayerkitError

ENTRY_POINT_GROUP = "layerkit"
STRICT_ENV = "LAYERKIT_STRICT_PLUGINS"

#: kind -> the hook that registers it
KINDS: dict[str, str] = {
    "backbone": "register_backbones",
    "control": "register_controls",
    "adapter": "register_adapters",
    "task": "register_tasks",
    "dataset": "register_datasets",
    "stage": "register_stages",
    "curation_step": "register_curation_steps",
    "command": "register_commands",
}


@dataclass
class Component:
    kind: str
    name: str
    target: str | Callable[..., Any]
    plugin: str
    description: str = ""

    def resolve(self) -> Callable[..., Any]:
        """Import a dotted ``module:attr`` target (or return a callable one)."""
        if callable(self.target):
            return self.target
        module_name, _, attr = self.target.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split(".") if attr else []:
                obj = getattr(obj, part)
        except Exception as exc:  # a broken plugin module must not crash the host with a traceback
            raise LayerkitError(
                f"{self.kind} '{self.name}' from plugin '{self.plugin}' could not be loaded "
                f"from '{self.target}': {type(exc).__name__}: {exc}."
            ) from exc
        return obj


@dataclass
class PluginInfo:
    name: str
    distribution: str | None = None
    version: str | None = None
    module: str | None = None
    components: dict[str, list[str]] = field(default_factory=dict)
    config_dirs: list[str] = field(default_factory=list)
    error: str | None = None
    descriptions: dict[str, str] = field(default_factory=dict)  # "kind name" -> one line

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            **{f"{kind}s": self.components.get(kind, []) for kind in KINDS},
            "descriptions": dict(self.descriptions),
            "config_dirs": self.config_dirs,
            "error": self.error,
        }


def _strict() -> bool:
    return os.environ.get(STRICT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


class Registry:
    """Names -> components for every kind, filled by the installed plugins."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.components: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}
        self.config_dirs: list[str] = []
        self.plugins: dict[str, PluginInfo] = {}

    # -- loading ---------------------------------------------------------------------------
    def load_entry_points(self) -> Registry:
        """Import every ``layerkit`` entry point, one at a time, keeping failures."""
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            info = PluginInfo(
                name=ep.name,
                distribution=dist.metadata["Name"] if dist is not None else None,
                version=dist.version if dist is not None else None,
                module=ep.value,
            )
            if ep.name in self.plugins:  # two packages claim one name: keep the first, report the second
                first = self.plugins[ep.name].distribution
                info.name = f"{ep.name} ({info.distribution})"
                self._fail(info, LayerkitError(f"plugin name '{ep.name}' is already used by '{first}'"))
                continue
            try:
                module = ep.load()
            except Exception as exc:
                self._fail(info, exc)
                continue
            self.add_plugin(module, ep.name, info=info)
        return self

    def add_plugin(self, plugin: object, name: str, *, info: PluginInfo | None = None) -> PluginInfo:
        """Register an imported plugin object (a module or any object with hookimpls)."""
        info = info or PluginInfo(name=name, module=getattr(plugin, "__name__", type(plugin).__name__))
        self.plugins[name] = info
        try:
            self.pm.register(plugin, name=name)
            unknown = [c.name for c in (self.pm.get_hookcallers(plugin) or []) if not c.has_spec()]
            if unknown:
                known = ", ".join([*KINDS.values(), "register_config_dirs"])
                raise LayerkitError(f"plugin '{name}' implements unknown hooks {unknown}; hooks are {known}.")
        except Exception as exc:
            self._fail(info, exc)
            return info
        for kind, hook_name in KINDS.items():
            self._call(info, hook_name, lambda n, t, description="", _k=kind: self._add(_k, n, t, info, description))
        self._call(info, "register_config_dirs", lambda path: self._add_config_dir(path, info))
        return info

    def _call(self, info: PluginInfo, hook_name: str, register: Callable[..., Any]) -> None:
        if info.error is not None:
            return
        hook = getattr(self.pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            if impl.plugin_name != info.name:
                continue
            try:
                impl.function(register=register)
            except Exception as exc:
                self._fail(info, exc)
                return

    def _fail(self, info: PluginInfo, exc: BaseException) -> None:
        info.error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        self.plugins[info.name] = info
        if self.pm.has_plugin(info.name):
            self.pm.unregister(name=info.name)
        # roll back what this plugin registered before failing
        for kind in KINDS:
            for comp_name in list(info.components.get(kind, [])):
                self.components[kind].pop(comp_name, None)
        info.components = {}
        if _strict():
            raise LayerkitError(
                f"plugin '{info.name}' failed to load ({info.error}); unset {STRICT_ENV} to skip it."
            ) from exc
        info.traceback = traceback.format_exception(exc)  # type: ignore[attr-defined]

    def _add(self, kind: str, name: str, target: Any, info: PluginInfo, description: str) -> None:
        existing = self.components[kind].get(name)
        if existing is not None and existing.plugin != info.name:
            raise LayerkitError(
                f"{kind} '{name}' is registered twice, by plugins '{existing.plugin}' and '{info.name}'."
            )
        self.components[kind][name] = Component(kind, name, target, info.name, description)
        info.components.setdefault(kind, []).append(name)
        if description:
            info.descriptions[f"{kind} {name}"] = " ".join(str(description).split())

    def _add_config_dir(self, path: Any, info: PluginInfo) -> None:
        text = str(path)
        if "://" not in text:
            text = "file://" + os.path.abspath(text)
        self.config_dirs.append(text)
        info.config_dirs.append(text)

    # -- lookup ----------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])

    def get(self, kind: str, name: str) -> Component:
        if kind not in self.components:
            raise LayerkitError(f"unknown component kind '{kind}'; kinds are: {', '.join(KINDS)}.")
        try:
            return self.components[kind][name]
        except KeyError:
            available = ", ".join(self.names(kind)) or "none"
            raise LayerkitError(f"unknown {kind} '{name}'; available {kind}s: {available}.") from None

    def build(self, kind: str, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(kind, name).resolve()(*args, **kwargs)

    def plugin_components(self, plugin: str) -> list[tuple[str, Component]]:
        """(kind, component) of everything ``plugin`` registered, in registration order."""
        info = self.plugins.get(plugin)
        if info is None:
            return []
        return [(kind, self.components[kind][name]) for kind in KINDS for name in info.components.get(kind, [])
                if name in self.components[kind]]

    def failures(self) -> list[PluginInfo]:
        return [p for p in self.plugins.values() if p.error]

    def describe(self) -> list[dict[str, Any]]:
        return [self.plugins[name].as_dict() for name in sorted(self.plugins)]


_REGISTRY: Registry | None = None


def get_registry(*, reload: bool = False) -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _REGISTRY
    if _REGISTRY is None or reload:
        _REGISTRY = Registry().load_entry_points()
    return _REGISTRY


def set_registry(registry: Registry | None) -> None:
    """Replace the process-wide registry (tests register in-process plugins this way)."""
    global _REGISTRY
    _REGISTRY = registry
