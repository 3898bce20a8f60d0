"""The OPTIMA implementation of the host-side ``optima_mask_emitted`` hook.

A host's mask generator announces each mask it applied through the
``optima_mask_emitted`` hook (firstresult); :class:`OptimaMaskPlugin` answers with
the weights of a registered weight updater (``optima`` by default: the exact
reconstruction of :func:`optima_plugin.reconstruct`) for that mask.
"""

from __future__ import annotations

import logging
from typing import Optional

from torch import Tensor, nn

from ..hookspecs import hookimpl
from ..plugins import lookup
from ..selectors.base import Selection
from ..updaters import UpdateOptions

log = logging.getLogger(__name__)


class OptimaMaskPlugin:
    """Answers ``optima_mask_emitted`` with the updater ``weight_update``'s weights.

    Args:
        weight_update: a registered weight updater (``optima``, ``native``, ``none``, a plugin's).
        options: solver settings (solver name, damping, tolerance, iteration cap, float64).
    """

    def __init__(self, weight_update: str = "optima", options: Optional[UpdateOptions] = None) -> None:
        self.updater = lookup("updaters", weight_update, "--weight_update")
        self.options = options or UpdateOptions()
        self._stats: dict[str, dict] = {}

    @hookimpl
    def optima_mask_emitted(self, name: str, module: nn.Module, pruned: Tensor, hessian: Optional[Tensor],
                            dense_weight: Tensor) -> Optional[Tensor]:
        if hessian is None and getattr(self.updater, "needs_hessian", False):
            log.warning("%s: no input Hessian given, so --weight_update %s cannot run; keeping the host's weights",
                        name, self.updater.name)
            return None
        update = self.updater.update(dense_weight, Selection(pruned), hessian, self.options)
        self._stats[name] = update.stats
        return update.weight

    def pop_stats(self, name: str) -> dict:
        """The updater's statistics (solver, iterations, converged, ...) for layer ``name``, once."""
        return self._stats.pop(name, {})
