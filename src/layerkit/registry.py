"""The plugin registry: pluggy over the ``layerkit`` entry-point group, fault-tolerant.

A plugin that fails to import (or whose hook raises, or calls ``sys.exit``: anything but the
user's Ctrl-C) is recorded with its error and skipped; ``LAYERKIT_STRICT_PLUGINS=1`` turns such a
failure into an error, for plugin authors. Components are registered by name with lazy targets,
so listing plugins imports no model code.

Names are never taken silently. The names layerkit's own plugins register (modules under
``layerkit_plugins.``, distribution ``layerkit``) cannot be taken over: a plugin registering one
fails to load, with one sentence naming both distributions. Two other plugins claiming one name
make that name fail, when it is looked up, with one sentence naming both, unless exactly one of
them registered it with ``override=True``, which then replaces the other.
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


FIRST_PARTY_DISTRIBUTION = "layerkit"
FIRST_PARTY_PACKAGE = "layerkit_plugins"


def is_first_party(module: str | None, distribution: str | None) -> bool:
    """True for layerkit's own plugins: a module under ``layerkit_plugins.`` shipped by the
    ``layerkit`` distribution (or imported in-process, where there is no distribution)."""
    package = (module or "").partition(":")[0]
    if not (package == FIRST_PARTY_PACKAGE or package.startswith(FIRST_PARTY_PACKAGE + ".")):
        return False
    return distribution is None or distribution.strip().lower() == FIRST_PARTY_DISTRIBUTION


def _describe_exception(exc: BaseException) -> str:
    """``Type: message`` on one line (``Type`` alone when the message is empty)."""
    text = " ".join(str(exc).split()).rstrip(".")
    if isinstance(exc, SystemExit):
        return f"SystemExit: {text or 'None'} (the plugin exited while loading)"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass
class Component:
    kind: str
    name: str
    target: str | Callable[..., Any]
    plugin: str
    description: str = ""
    distribution: str | None = None
    first_party: bool = False
    override: bool = False
    conflict: str | None = None  # set on the stand-in for a name claimed twice: the sentence to raise
    #: a task's ``input_keys`` and ``file_keys`` as registered (``register(..., inputs=, files=)``):
    #: checked before torch or the task's module is imported; None when not declared
    inputs: tuple[str, ...] | None = None
    files: tuple[str, ...] | None = None

    def resolve(self) -> Callable[..., Any]:
        """Import a dotted ``module:attr`` target (or return a callable one)."""
        if self.conflict is not None:
            raise LayerkitError(self.conflict)
        if callable(self.target):
            return self.target
        module_name, _, attr = self.target.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split(".") if attr else []:
                obj = getattr(obj, part)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a broken plugin module must not crash the host with a traceback
            raise LayerkitError(
                f"{self.kind} '{self.name}' from plugin '{self.plugin}' could not be loaded "
                f"from '{self.target}': {_describe_exception(exc)}."
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

    @property
    def first_party(self) -> bool:
        return is_first_party(self.module, self.distribution)

    @property
    def label(self) -> str:
        """The distribution as a user would uninstall it (the module when imported in-process)."""
        if self.distribution:
            return self.distribution
        return FIRST_PARTY_DISTRIBUTION if self.first_party else (self.module or self.name)

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
        #: kind -> name -> the component a lookup gets (a stand-in raising the conflict for a
        #: name claimed twice)
        self.components: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}
        #: kind -> name -> every registration of it, in load order
        self.claims: dict[str, dict[str, list[Component]]] = {kind: {} for kind in KINDS}
        self.config_dirs: list[str] = []
        self.plugins: dict[str, PluginInfo] = {}
        self._evict: list[tuple[str, str]] = []  # (plugin, sentence): squatters found by a first-party plugin

    # -- loading ---------------------------------------------------------------------------
    def load_entry_points(self) -> Registry:
        """Import every ``layerkit`` entry point, one at a time, keeping failures.

        layerkit's own plugins load first, so their plugin names are theirs; then the others, by name.
        """
        def order(ep: metadata.EntryPoint) -> tuple[bool, str]:
            dist = getattr(ep, "dist", None)
            return (not is_first_party(ep.value, dist.metadata["Name"] if dist is not None else None), ep.name)

        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=order):
            dist = getattr(ep, "dist", None)
            info = PluginInfo(
                name=ep.name,
                distribution=dist.metadata["Name"] if dist is not None else None,
                version=dist.version if dist is not None else None,
                module=ep.value,
            )
            if ep.name in self.plugins:  # two packages claim one name: keep the first, report the second
                first = self.plugins[ep.name].label
                info.name = f"{ep.name} ({info.distribution})"
                self._fail(info, LayerkitError(
                    f"plugin name '{ep.name}' of distribution '{info.label}' is already used by "
                    f"distribution '{first}'"))
                continue
            try:
                module = ep.load()
            except KeyboardInterrupt:  # the user's Ctrl-C stops the program; anything else is the plugin's
                raise
            except BaseException as exc:
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
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            self._fail(info, exc)
            return info
        for kind, hook_name in KINDS.items():
            self._call(info, hook_name, self._registrar(kind, info))
        self._call(info, "register_config_dirs", lambda path: self._add_config_dir(path, info))
        evict, self._evict = self._evict, []
        for squatter, sentence in evict:  # plugins that took a name this first-party plugin owns
            victim = self.plugins.get(squatter)
            if victim is not None and victim.error is None:
                self._fail(victim, LayerkitError(sentence))
        return info

    def _registrar(self, kind: str, info: PluginInfo) -> Callable[..., None]:
        def register(name: str, target: Any, description: str = "", *, override: bool = False,
                     inputs: Any = None, files: Any = None) -> None:
            if (inputs is not None or files is not None) and kind != "task":
                raise LayerkitError(f"{kind} '{name}': only a task declares inputs= and files=.")
            self._add(kind, name, target, info, description, override=bool(override),
                      inputs=None if inputs is None else tuple(inputs), files=None if files is None else tuple(files))

        return register

    def _call(self, info: PluginInfo, hook_name: str, register: Callable[..., Any]) -> None:
        if info.error is not None:
            return
        hook = getattr(self.pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            if impl.plugin_name != info.name:
                continue
            try:
                impl.function(register=register)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:
                self._fail(info, exc)
                return

    def _fail(self, info: PluginInfo, exc: BaseException) -> None:
        info.error = _describe_exception(exc)
        self.plugins[info.name] = info
        if self.pm.has_plugin(info.name):
            self.pm.unregister(name=info.name)
        # roll back what this plugin registered before failing
        for kind in KINDS:
            for comp_name in dict.fromkeys(info.components.get(kind, [])):
                claims = self.claims[kind].get(comp_name, [])
                claims[:] = [c for c in claims if c.plugin != info.name]
                self._settle(kind, comp_name)
        info.components = {}
        info.descriptions = {}
        for path in info.config_dirs:
            if path in self.config_dirs:
                self.config_dirs.remove(path)
        info.config_dirs = []
        if _strict():
            raise LayerkitError(
                f"plugin '{info.name}' failed to load ({info.error}); unset {STRICT_ENV} to skip it."
            ) from exc
        info.traceback = traceback.format_exception(exc)  # type: ignore[attr-defined]

    def _add(self, kind: str, name: str, target: Any, info: PluginInfo, description: str, *,
             override: bool = False, inputs: tuple[str, ...] | None = None,
             files: tuple[str, ...] | None = None) -> None:
        claims = self.claims[kind].setdefault(name, [])
        claim = Component(kind, name, target, info.name, description, distribution=info.label,
                          first_party=info.first_party, override=override, inputs=inputs, files=files)
        others = [c for c in claims if c.plugin != info.name]
        owners = [c for c in others if c.first_party]
        if owners and not claim.first_party:  # layerkit's own names are never taken over
            raise LayerkitError(self._squat_sentence(claim, owners[0]))
        if owners:  # two of layerkit's own plugins: a bug in layerkit, refused as before
            raise LayerkitError(
                f"{kind} '{name}' is registered twice, by plugins '{owners[0].plugin}' and '{info.name}'."
            )
        if claim.first_party:  # it was squatted before layerkit's own plugin loaded: evict the squatter
            self._evict.extend((c.plugin, self._squat_sentence(c, claim)) for c in others)
        claims[:] = [*others, claim]  # a plugin registering one name again replaces its own entry
        if name not in info.components.get(kind, []):
            info.components.setdefault(kind, []).append(name)
        if description:
            info.descriptions[f"{kind} {name}"] = " ".join(str(description).split())
        self._settle(kind, name)
        winner = self.components[kind].get(name)
        if _strict() and winner is not None and winner.conflict is not None:
            raise LayerkitError(winner.conflict)

    @staticmethod
    def _squat_sentence(squatter: Component, owner: Component) -> str:
        how = " with override=True" if squatter.override else ""
        return (
            f"plugin '{squatter.plugin}' (distribution '{squatter.distribution}') registers {squatter.kind} "
            f"'{squatter.name}'{how}, which belongs to layerkit's own plugin '{owner.plugin}' "
            f"(distribution '{owner.distribution}') and cannot be taken over"
        )

    def _settle(self, kind: str, name: str) -> None:
        """Decide which registration of ``kind``/``name`` a lookup gets (or that it is a conflict)."""
        claims = [c for c in self.claims[kind].get(name, []) if not (c.plugin in self.plugins
                                                                       and self.plugins[c.plugin].error)]
        self.claims[kind][name] = claims
        if not claims:
            self.claims[kind].pop(name, None)
            self.components[kind].pop(name, None)
            return
        first_party = [c for c in claims if c.first_party]
        overriding = [c for c in claims if c.override]
        if first_party:
            winner = first_party[0]
        elif len(claims) == 1:
            winner = claims[0]
        elif len(overriding) == 1:
            winner = overriding[0]
        else:
            who = [f"'{c.distribution}' (plugin '{c.plugin}')" for c in claims]
            listed = ", ".join(who[:-1]) + f" and {who[-1]}"
            advice = ("uninstall all but one" if len(overriding) > 1 else
                      "uninstall one, or register the one meant to replace the other with override=True")
            both = "all with override=True" if len(overriding) > 1 else ""
            sentence = (f"{kind} '{name}' is registered by {len(claims)} distributions, {listed}"
                        f"{', ' + both if both else ''}; {advice}.")
            self.components[kind][name] = Component(
                kind, name, "", ", ".join(c.plugin for c in claims), f"conflict: {sentence}", conflict=sentence)
            return
        self.components[kind][name] = winner

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
        component = self.components[kind].get(name)
        if component is None:
            available = ", ".join(self.names(kind)) or "none"
            raise LayerkitError(f"unknown {kind} '{name}'; available {kind}s: {available}.")
        if component.conflict is not None:
            raise LayerkitError(component.conflict)
        return component

    def build(self, kind: str, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(kind, name).resolve()(*args, **kwargs)

    def plugin_components(self, plugin: str) -> list[tuple[str, Component]]:
        """(kind, component) of everything ``plugin`` registered and provides, in registration order
        (a name it shares with another plugin: the stand-in whose description states the conflict)."""
        info = self.plugins.get(plugin)
        if info is None:
            return []
        out = []
        for kind in KINDS:
            for name in info.components.get(kind, []):
                component = self.components[kind].get(name)
                if component is not None and (component.plugin == plugin or component.conflict is not None):
                    out.append((kind, component))
        return out

    def notes(self, plugin: str) -> list[str]:
        """One sentence for each name ``plugin`` registered but does not provide (claimed twice,
        or replaced by a plugin registering it with ``override=True``) or replaces."""
        info = self.plugins.get(plugin)
        out: list[str] = []
        for kind in KINDS:
            for name in (info.components.get(kind, []) if info else []):
                component = self.components[kind].get(name)
                others = [c for c in self.claims[kind].get(name, []) if c.plugin != plugin]
                if component is None:
                    continue
                if component.conflict is not None:
                    out.append(component.conflict)
                elif component.plugin != plugin:
                    out.append(f"{kind} '{name}' is replaced by plugin '{component.plugin}' "
                               f"(distribution '{component.distribution}', override=True).")
                elif others:
                    replaced = ", ".join(f"'{c.plugin}' (distribution '{c.distribution}')" for c in others)
                    out.append(f"{kind} '{name}' replaces the one of plugin {replaced}.")
        return out

    def failures(self) -> list[PluginInfo]:
        return [p for p in self.plugins.values() if p.error]

    def describe(self) -> list[dict[str, Any]]:
        return [{**self.plugins[name].as_dict(), "conflicts": self.notes(name)} for name in sorted(self.plugins)]


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
