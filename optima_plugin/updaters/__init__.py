"""Weight updaters: what happens to the kept weights once a mask is chosen.

* ``none``: mask only, kept weights untouched;
* ``native``: the selector's own update (SparseGPT, Thanos), mask only otherwise;
* ``optima``: the exact reconstruction (:func:`optima_plugin.reconstruct`) from the
  dense weights, for the mask of any selector.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor

from ..selectors.base import Selection
from ..solvers import reconstruct


@dataclass
class Update:
    """An updater's answer: ``weight`` (``r x d``, pruned entries 0) and solver stats.

    ``objective`` and ``mask_objective``: ``Σ_rows (ŵ - w)ᵀ H (ŵ - w)`` of ``weight`` and of
    the mask-only weights, as :func:`~optima_plugin.solvers.problem.reconstruction_error`
    computes them, when the updater measured them (the engine then does not again).
    """

    weight: Tensor
    stats: dict = field(default_factory=dict)
    objective: Optional[float] = None
    mask_objective: Optional[float] = None
    target: Optional[Tensor] = None  # the rows the update fitted when they are not the dense weights (--objective dense)


@dataclass
class UpdateOptions:
    """Solver settings an updater may use.

    ``split``: under torchrun, the job's :class:`~optima_plugin.distributed.Distributed`: an updater may
    solve its share of the rows and gather them (``optima`` does); every rank must end with the same weights.
    """

    solver: str = "pcg"
    damp: float = 0.01
    tol: Optional[float] = None
    max_iter: Optional[int] = None
    double_precision: bool = False
    split: Any = None


class NoUpdate:
    name = "none"
    needs_hessian = False

    def update(self, weight: Tensor, selection: Selection, hessian: Optional[Tensor],
               options: UpdateOptions) -> Update:
        return Update(weight.masked_fill(selection.pruned, 0))


class NativeUpdate:
    name = "native"
    needs_hessian = False

    def update(self, weight: Tensor, selection: Selection, hessian: Optional[Tensor],
               options: UpdateOptions) -> Update:
        if selection.weight is None:
            return Update(weight.masked_fill(selection.pruned, 0))
        return Update(selection.weight.to(weight.dtype).masked_fill(selection.pruned, 0))


class OptimaUpdate:
    name = "optima"
    needs_hessian = True

    def update(self, weight: Tensor, selection: Selection, hessian: Optional[Tensor],
               options: UpdateOptions) -> Update:
        res = reconstruct(weight, selection.pruned, hessian, solver=options.solver, damp=options.damp,
                          tol=options.tol, max_iter=options.max_iter,
                          double_precision=options.double_precision, split=options.split)
        keys = ("solver", "iterations", "converged", "kkt_residual", "seconds", "damp", "fallback",
                "mask_only_rows", "row_chunk")
        stats = {k: res.stats()[k] for k in keys}
        stats["damp_escalated"] = res.damp != options.damp
        return Update(res.weight, stats, objective=res.objective, mask_objective=res.mask_objective)


BUILTIN_UPDATERS = [NoUpdate(), NativeUpdate(), OptimaUpdate()]
