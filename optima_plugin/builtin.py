"""The built-in plugin: contributes the built-in selectors, allocators and updaters."""

from __future__ import annotations

from .allocators import BUILTIN_ALLOCATORS, BUILTIN_ROW_ALLOCATORS
from .hookspecs import hookimpl
from .selectors import BUILTIN_SELECTORS
from .updaters import BUILTIN_UPDATERS


class BuiltinRegistry:
    @hookimpl
    def optima_selectors(self):
        return list(BUILTIN_SELECTORS)

    @hookimpl
    def optima_allocators(self):
        return list(BUILTIN_ALLOCATORS)

    @hookimpl
    def optima_row_allocators(self):
        return list(BUILTIN_ROW_ALLOCATORS)

    @hookimpl
    def optima_updaters(self):
        return list(BUILTIN_UPDATERS)


BUILTIN_PLUGINS = [BuiltinRegistry()]
