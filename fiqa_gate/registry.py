"""Plugin loading and the registries of detectors, recognizers and scorers.

The core never imports a plugin by name: everything comes through entry points.
`FIQA_GATE_PLUGINS=a,b` is an allow-list of third-party entry-point names and
`FIQA_GATE_NO_PLUGINS=1` (or `--no-plugins`) loads first-party plugins only.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import numpy as np
import pluggy

from fiqa_gate import hookspecs
from fiqa_gate.errors import FiqaGateError, PluginError, caused_by_interrupt

log = logging.getLogger("fiqa_gate")

FIRST_PARTY_PREFIX = "fiqa_gate_plugins."
DEFAULT_DETECTOR = "yunet"
DEFAULT_RECOGNIZER = "sface"
DEFAULT_SCORER = "student"


@dataclass
class Entry:
    name: str
    factory: Callable[..., Any]
    description: str
    plugin: str


@dataclass
class Registry:
    detectors: dict[str, Entry] = field(default_factory=dict)
    recognizers: dict[str, Entry] = field(default_factory=dict)
    scorers: dict[str, Entry] = field(default_factory=dict)


_pm: pluggy.PluginManager | None = None
_registry: Registry | None = None
# the (name, plugin) pairs _registry was collected from, the plugins held (not their
# ids: a freed id is reused), with their names (one plugin registered again under
# another name had kept the old name on its entries)
_registry_of: frozenset[tuple[str, Any]] = frozenset()
_failed: dict[str, str] = {}
_first_party: set[str] = set()  # fiqa-gate's own entry points: their names stay theirs
_setup_lock = threading.RLock()  # threads using the registry first get one of each


def _is_first_party(ep_value: str) -> bool:
    return ep_value.startswith(FIRST_PARTY_PREFIX)


def _plugin_allowed(ep_name: str, ep_value: str) -> bool:
    if _is_first_party(ep_value):
        return True
    if os.environ.get("FIQA_GATE_NO_PLUGINS", "") not in ("", "0"):
        return False
    allow = os.environ.get("FIQA_GATE_PLUGINS")
    if allow is None:
        return True
    return ep_name in {a.strip() for a in allow.split(",") if a.strip()}


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, loading entry points on first use."""
    global _pm
    with _setup_lock:
        if _pm is None:
            pm = pluggy.PluginManager("fiqa_gate")
            pm.add_hookspecs(hookspecs)
            # fiqa-gate's own first: a third party's entry point of the same name (student,
            # sface, ...) had replaced a built-in plugin whenever it was found first
            for ep in sorted(entry_points(group="fiqa_gate"),
                             key=lambda e: (not _is_first_party(e.value), e.name)):
                if not _plugin_allowed(ep.name, ep.value):
                    continue
                if pm.get_plugin(ep.name):
                    why = ("ignored: the name is taken by " + ("fiqa-gate's own plugin" if
                           ep.name in _first_party else "another plugin's entry point"))
                    log.warning("plugin entry point %s = %s %s", ep.name, ep.value, why)
                    _failed[f"{ep.name} = {ep.value}"] = why  # shown by `fiqa-gate plugins`
                    continue
                try:
                    pm.register(ep.load(), name=ep.name)
                except (Exception, SystemExit) as exc:  # it must not take the core down
                    _failed[ep.name] = f"{type(exc).__name__}: {exc}"
                    log.warning("plugin %s failed to load: %s: %s", ep.name,
                                type(exc).__name__, exc)
                    continue
                if _is_first_party(ep.value):
                    _first_party.add(ep.name)
            _pm = pm
        return _pm


def reset() -> None:
    """Forget loaded plugins (tests, or after changing the environment)."""
    global _pm, _registry
    with _setup_lock:
        _pm = None
        _registry = None
        _failed.clear()
        _first_party.clear()
        _refused.clear()
        _instances.clear()  # made by factories of the plugins just forgotten


def failed_plugins() -> dict[str, str]:
    plugin_manager()
    return dict(_failed)


def _collect(hook_name: str) -> dict[str, Entry]:
    pm = plugin_manager()
    found: dict[str, Entry] = {}
    hook = getattr(pm.hook, hook_name)
    for impl in hook.get_hookimpls():
        plugin = impl.plugin_name

        def register(name: str, factory: Callable[..., Any], description: str = "",
                     _plugin: str = plugin) -> None:
            # A built-in name (student, sface, yunet, ...) stays built-in: whichever loads
            # last, the gate's default and its pinned model must not depend on a plugin's
            # name. Between two other plugins, the later entry point name wins.
            before = found.get(name)
            if before is not None and before.plugin != _plugin:
                if before.plugin in _first_party:
                    log.warning("%s %r of plugin %s ignored: the name is fiqa-gate's own "
                                "(register it under another name)", hook_name, name, _plugin)
                    return
                log.warning("%s %r from plugin %s replaces the one from %s",
                            hook_name, name, _plugin, before.plugin)
            found[name] = Entry(name, factory, description, _plugin)

        try:
            impl.function(register=register)
        except Exception as exc:
            log.warning("plugin %s failed in %s: %s", plugin, hook_name, exc)
    return found


def registry() -> Registry:
    """What the plugins register, collected again when a plugin was registered or
    unregistered in-process (`plugin_manager().register(obj, name=...)`)."""
    global _registry, _registry_of
    with _setup_lock:
        plugins = frozenset(plugin_manager().list_name_plugin())
        if _registry is None or plugins != _registry_of:
            _registry = Registry(
                detectors=_collect("register_detectors"),
                recognizers=_collect("register_recognizers"),
                scorers=_collect("register_scorers"),
            )
            _registry_of = plugins
        return _registry


def _lookup(kind: str, table: dict[str, Entry], name: str) -> Entry:
    if name not in table:
        known = ", ".join(sorted(table)) or "none"
        raise PluginError(f"unknown {kind} {name!r}; available: {known} "
                          "(see `fiqa-gate plugins`)")
    return table[name]


_instances: dict[tuple[str, str], tuple[Any, Any]] = {}
_instances_lock = threading.RLock()  # threads asking at once get one model, loaded once


def _instance(kind: str, table: dict[str, Any], name: str) -> Any:
    entry = _lookup(kind, table, name)
    owner = plugin_manager().get_plugin(entry.plugin)  # the object, not its factory: a
    with _instances_lock:  # rebuilt registry makes new lambdas of the same plugin
        made = _instances.get((kind, name))
        if made is None or made[0] is not owner:  # a plugin registered since took the name
            made = _instances[(kind, name)] = (owner, _made(kind, entry))
        return made[1]


def _made(kind: str, entry: Entry, *args: Any) -> Any:
    """What the entry's factory makes; its failure names the component and its plugin
    (a plugin's ValueError had left a bare traceback and the exit status of failed
    inputs)."""
    try:
        return entry.factory(*args)
    except FiqaGateError:
        raise
    except Exception as exc:
        if caused_by_interrupt(exc):  # a Ctrl-C while a model loads stays one
            raise
        raise PluginError(f"{kind} {entry.name!r} of plugin {entry.plugin} could not be "
                          f"made: {type(exc).__name__}: {exc}") from exc


def get_detector(name: str = DEFAULT_DETECTOR) -> Any:
    return _instance("detector", registry().detectors, name)


def get_recognizer(name: str = DEFAULT_RECOGNIZER) -> Any:
    return _instance("recognizer", registry().recognizers, name)


@dataclass
class ScorerContext:
    """What a scorer factory may ask for; the recognizer loads only when asked."""

    recognizer_name: str = DEFAULT_RECOGNIZER
    options: dict[str, Any] = field(default_factory=dict)

    def recognizer(self) -> Any:
        return get_recognizer(self.recognizer_name)


def get_scorer(name: str = DEFAULT_SCORER, context: ScorerContext | None = None) -> Any:
    """The scorer, calibrated for the context's recognizer where a map for it ships
    (else it keeps its own map, for the recognizer `scorer.calibrated_for` names)."""
    from fiqa_gate.calibration import shipped_fitted

    ctx = context or ScorerContext()
    scorer = _made("scorer", _lookup("scorer", registry().scorers, name), ctx)
    if getattr(scorer, "calibrated_for", ctx.recognizer_name) != ctx.recognizer_name:
        shipped = shipped_fitted(name, ctx.recognizer_name, ctx.options.get("model"))
        if shipped is not None:
            scorer.calibration = shipped
    return scorer


_warned: set[tuple[str, str]] = set()


def _plain_impls(hook: Any) -> list[Any]:
    """The hook's implementations in pluggy's call order (newest first). The two hooks
    below call them one by one (pluggy's own call cannot isolate one plugin's error or
    say which plugin decided), so wrappers, which only pluggy can drive, are refused."""
    impls = []
    for impl in reversed(hook.get_hookimpls()):
        if impl.hookwrapper or getattr(impl, "wrapper", False):
            if (impl.plugin_name, hook.name) not in _warned:  # once, not once per face
                _warned.add((impl.plugin_name, hook.name))
                log.warning("plugin %s: a wrapper for %s is not supported; ignored",
                            impl.plugin_name, hook.name)
            continue
        impls.append(impl)
    return impls


def emit(event: str, **kwargs: Any) -> None:
    """Call an event hook on every plugin; one plugin's exception is logged, not raised."""
    for impl in _plain_impls(getattr(plugin_manager().hook, event)):
        try:
            impl.function(**{k: kwargs[k] for k in impl.argnames})
        except Exception as exc:
            log.warning("plugin %s raised in %s: %s: %s", impl.plugin_name, event,
                        type(exc).__name__, exc)


def policy_decision(face: Any, score: float, threshold: float,
                    stage: str) -> tuple[bool, str] | None:
    """Ask the `gate_decision` policy hooks, newest plugin first; first non-None wins."""
    for impl in _plain_impls(plugin_manager().hook.gate_decision):
        args = {"face": face, "score": score, "threshold": threshold, "stage": stage}
        try:
            result = impl.function(**{k: args[k] for k in impl.argnames})
        except Exception as exc:
            raise PluginError(f"{impl.plugin_name}: {type(exc).__name__}: {exc}") from exc
        if result is None:
            continue
        if _yes_or_no(result):
            return bool(result), f"policy {impl.plugin_name}"
        # (accepted, reason) as any pair but a string: "no" had unpacked into an acceptance
        if (isinstance(result, (str, bytes)) or not isinstance(result, Sequence)
                or len(result) != 2 or not _yes_or_no(result[0])):
            if impl.plugin_name not in _refused:  # once a plugin, not once a face
                _refused.add(impl.plugin_name)
                log.warning("policy plugin %s returned %r; a policy returns None, a bool or "
                            "(accepted, reason): the faces it decides are rejected",
                            impl.plugin_name, result)
            raise PluginError(f"{impl.plugin_name}: returned {result!r}; a policy returns "
                              "None, a bool or (accepted: bool, reason: str)")
        why = "" if result[1] is None else str(result[1]).strip()  # (True, None): none
        return bool(result[0]), f"policy {impl.plugin_name}" + (f": {why}" if why else "")
    return None


_refused: set[str] = set()


def _yes_or_no(value: Any) -> bool:
    """A bool, numpy's (a 0-d array too), or the integers 0 and 1."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)):
        return True
    return isinstance(value, (int, np.integer)) and value in (0, 1)
