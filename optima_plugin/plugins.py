"""The plugin manager: built-in plugins, entry-point plugins, lookup by name."""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

import pluggy

from . import hookspecs

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "optima_plugin"

_manager: Optional[pluggy.PluginManager] = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (built-ins plus installed entry points)."""
    global _manager
    if _manager is None:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        from .builtin import BUILTIN_PLUGINS

        for plugin in BUILTIN_PLUGINS:
            pm.register(plugin, name=f"builtin:{type(plugin).__name__}")
        n = _load_entry_points(pm)
        if n:
            log.info("loaded %d plugin(s) from entry-point group %r", n, ENTRY_POINT_GROUP)
        _manager = pm
    return _manager


def _load_entry_points(pm: pluggy.PluginManager) -> int:
    """Register every plugin of the entry-point group; a class is instantiated (its hooks take ``self``)."""
    from importlib.metadata import entry_points

    try:
        found = entry_points(group=ENTRY_POINT_GROUP)
    except TypeError:  # Python 3.9: a dict of groups
        found = entry_points().get(ENTRY_POINT_GROUP, [])
    n = 0
    for ep in found:
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        plugin = ep.load()
        pm.register(plugin() if isinstance(plugin, type) else plugin, name=ep.name)
        n += 1
    return n


def _collect(results: Iterable[list]) -> dict[str, Any]:
    registry: dict[str, Any] = {}
    for items in results:
        for item in items or []:
            registry.setdefault(item.name, item)
    return registry


def registry(kind: str) -> dict[str, Any]:
    """``{name: object}`` for ``kind`` in ``selectors``, ``allocators``, ``row_allocators``, ``updaters``."""
    hook = getattr(get_plugin_manager().hook, f"optima_{kind}")
    # pluggy calls the most recently registered plugin first: reverse so that
    # built-ins win a name clash and third parties cannot silently shadow them.
    return _collect(reversed(hook()))


def lookup(kind: str, name: str, option: str) -> Any:
    """The registered object ``name`` of ``kind``; ``ValueError`` listing known names."""
    known = registry(kind)
    if name not in known:
        raise ValueError(f"unknown {option} {name!r}; known: {', '.join(sorted(known))}")
    return known[name]
