"""The built-in plugin: contributes the built-in selectors, allocators, updaters, quantizers and their options.

Its hooks are ``tryfirst``: pluggy calls them before any third party's, so the built-ins
come first in every registry (the first object of a name wins) and declare their options first.
"""

from __future__ import annotations

import dataclasses

from . import checkpoint, compress, damping, data, export, hessian, local_reconstruction, objective, refine
from . import allocators
from .allocators import BUILTIN_ALLOCATORS, BUILTIN_ROW_ALLOCATORS, alphapruning, owl, trim
from .hookspecs import hookimpl
from .lowrank import addoption as lowrank_options
from .options import OptionParser
from .quantizers import BUILTIN_QUANTIZERS, addoption as quantization_options
from .selectors import BUILTIN_SELECTORS, file as file_selector
from .updaters import BUILTIN_UPDATERS


#: The built-in features' checks (``config -> None or {field: derived value}``), in the order they run.
BUILTIN_CHECKS = (damping.validate_config, hessian.validate_sinks, refine.validate_config, hessian.validate_shrink,
                  allocators.validate_config, compress.validate, file_selector.validate_config,
                  objective.validate_config, export.validate_config, data.validate_config,
                  checkpoint.validate_config, local_reconstruction.validate_config)


class BuiltinRegistry:
    @hookimpl(tryfirst=True)
    def optima_validate(self, config) -> dict:
        derived: dict = {}
        for check in BUILTIN_CHECKS:
            changes = check(config)
            if changes:
                config = dataclasses.replace(config, **changes)
                derived.update(changes)
        return derived

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
