"""The plugin manager: built-in plugins, entry-point plugins, lookup by name, declared options.

The manager is process-wide and created on first use. Entry-point plugins load then,
so plugins to leave out must be named before: ``get_plugin_manager(disabled=[...])``
on the first call (the CLIs do this with their ``--disable_plugin`` flags, read by
:func:`disabled_plugins` before anything else). A later call with ``disabled``
unregisters those plugins (they were imported already). Tests start afresh with
:func:`reset_plugin_manager`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
from typing import Any, Iterable, Optional, Sequence

import pluggy

from . import hookspecs
from .builtin import BUILTIN_PLUGINS
from .options import OptionParser

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "optima_plugin"

_manager: Optional[pluggy.PluginManager] = None


def get_plugin_manager(disabled: Iterable[str] = ()) -> pluggy.PluginManager:
    """The process-wide plugin manager (built-ins plus installed entry points).

    Args:
        disabled: plugin (entry-point) names to block. On the call that creates the manager
            they are blocked before the entry points load, so they are never imported; on a
            later call they are unregistered.
    """
    global _manager
    if _manager is None:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        for plugin in BUILTIN_PLUGINS:
            pm.register(plugin, name=f"builtin:{type(plugin).__name__}")
        for name in disabled:
            pm.set_blocked(name)
        n = _load_entry_points(pm)
        if n:
            log.info("loaded %d plugin(s) from entry-point group %r", n, ENTRY_POINT_GROUP)
        _manager = pm
    else:
        for name in disabled:
            _manager.set_blocked(name)
    return _manager


def reset_plugin_manager() -> None:
    """Forget the process-wide manager; the next :func:`get_plugin_manager` builds a new one (for tests)."""
    global _manager
    _manager = None


def disabled_plugins(argv: Sequence[str]) -> list[str]:
    """The ``--disable_plugin NAME`` values (repeatable) of a command line, read before the manager exists."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--disable_plugin", action="append", default=[])
    return pre.parse_known_args(list(argv))[0].disable_plugin


def add_disable_flag(parser: argparse.ArgumentParser) -> None:
    """``--disable_plugin NAME`` on a CLI's parser (for its help and so that it is consumed)."""
    parser.add_argument("--disable_plugin", action="append", default=[], metavar="NAME",
                        help="do not load the installed plugin NAME (its entry-point name; repeatable)")


def _load_entry_points(pm: pluggy.PluginManager) -> int:
    """Load the entry-point group with pluggy's loader, one entry point at a time.

    An entry point must name a module or an instance; one naming a class (its hooks take
    ``self``) is replaced by an instance. A plugin that fails to load is skipped with one
    warning line naming it, its package and the error.
    """
    n = 0
    for dist in list(importlib.metadata.distributions()):
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP or pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
                continue
            try:
                n += pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=ep.name)
                plugin = pm.get_plugin(ep.name)
                if isinstance(plugin, type):
                    pm.unregister(plugin)
                    pm.register(plugin(), name=ep.name)
            except Exception as err:  # a broken plugin must not stop the others, nor the run
                if pm.has_plugin(ep.name):
                    pm.unregister(name=ep.name)
                message = " ".join(str(err).split())
                log.warning("plugin %s (package %s, %s) not loaded: %s: %s", ep.name, dist.metadata["name"],
                            ep.value, type(err).__name__, message)
    return n


def _collect(results: Iterable[list]) -> dict[str, Any]:
    registry: dict[str, Any] = {}
    for items in results:
        for item in items or []:
            registry.setdefault(item.name, item)
    return registry


def registry(kind: str) -> dict[str, Any]:
    """``{name: object}`` for ``kind`` in ``selectors``, ``allocators``, ``row_allocators``, ``updaters``,
    ``quantizers``.

    The first object of each name wins; the built-in hooks are ``tryfirst``, so pluggy calls
    them first and a third party cannot silently shadow a built-in.
    """
    hook = getattr(get_plugin_manager().hook, f"optima_{kind}")
    return _collect(hook())


def lookup(kind: str, name: str, option: str) -> Any:
    """The registered object ``name`` of ``kind``; ``ValueError`` listing known names."""
    known = registry(kind)
    if name not in known:
        raise ValueError(f"unknown {option} {name!r}; known: {', '.join(sorted(known))}")
    return known[name]


def collect_options(reserved: Iterable[str] = (), builtin: bool = True) -> OptionParser:
    """The options every registered plugin declares through ``optima_addoption``.

    Args:
        reserved: the core option names; a plugin declaring one is an error (``ValueError``).
        builtin: include the built-in plugins' options. ``optima-host`` leaves them out: the
            host allocates itself and owns flags of those names (OWL's ``--Lamda``, TRIM's ``--qmetric``).
    """
    parser = OptionParser(reserved)
    pm = get_plugin_manager()
    hook = pm.hook.optima_addoption if builtin else pm.subset_hook_caller("optima_addoption", BUILTIN_PLUGINS)
    hook(parser=parser)
    return parser
