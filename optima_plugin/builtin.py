"""The built-in plugin: contributes the built-in selectors, allocators, updaters, quantizers and their options.

Its hooks are ``tryfirst``: pluggy calls them before any third party's, so the built-ins
come first in every registry (the first object of a name wins) and declare their options first.
"""

from __future__ import annotations

from .allocators import BUILTIN_ALLOCATORS, BUILTIN_ROW_ALLOCATORS, alphapruning, owl, trim
from .hookspecs import hookimpl
from .lowrank import addoption as lowrank_options
from .options import OptionParser
from .quantizers import BUILTIN_QUANTIZERS, addoption as quantization_options
from .selectors import BUILTIN_SELECTORS, file as file_selector
from .updaters import BUILTIN_UPDATERS


class BuiltinRegistry:
    @hookimpl(tryfirst=True)
    def optima_addoption(self, parser: OptionParser) -> None:
        for declare in (owl.addoption, alphapruning.addoption, trim.addoption, file_selector.addoption, quantization_options,
                        lowrank_options):
            declare(parser)

    @hookimpl(tryfirst=True)
    def optima_selectors(self) -> list:
        return list(BUILTIN_SELECTORS)

    @hookimpl(tryfirst=True)
    def optima_allocators(self) -> list:
        return list(BUILTIN_ALLOCATORS)

    @hookimpl(tryfirst=True)
    def optima_row_allocators(self) -> list:
        return list(BUILTIN_ROW_ALLOCATORS)

    @hookimpl(tryfirst=True)
    def optima_updaters(self) -> list:
        return list(BUILTIN_UPDATERS)

    @hookimpl(tryfirst=True)
    def optima_quantizers(self) -> list:
        return list(BUILTIN_QUANTIZERS)


BUILTIN_PLUGINS = [BuiltinRegistry()]
