"""Weight updaters: what happens to the kept weights once a mask is chosen.

* ``none``: mask only, kept weights untouched;
* ``native``: the selector's own update (SparseGPT, Thanos), mask only otherwise;
* ``optima``: the exact reconstruction (:func:`optima_plugin.reconstruct`) from the
  dense weights, for the mask of any selector; with ``damp="auto"`` the damp is chosen per
  layer on held-out calibration windows (:mod:`optima_plugin.damping`). It is warm-started
  from the selector's own update (SparseGPT, Thanos) and reuses the selector's ``Hd⁻¹`` when
  computed from the same Hessian at the same damp: same optimum, same stopping test, less work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor

from ..damping import is_auto, reconstruct_auto
from ..selectors.base import Selection
from ..solvers import reconstruct
from ..solvers.problem import Warm


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

    ``damp``: a relative damp, or ``"auto"`` (``--damp auto``): the engine then passes each layer's full
    ``H`` as the ``hessian`` argument, as always, and its fit and held-out Hessians in ``holdout`` (a
    :class:`~optima_plugin.damping.HeldOutHessian`), from which ``optima`` chooses the damp. An updater
    that damps but does not choose may use :func:`~optima_plugin.damping.fixed_damp` (0.01 for ``auto``).
    """

    solver: str = "pcg"
    damp: float | str = 0.01
    tol: Optional[float] = None
    max_iter: Optional[int] = None
    double_precision: bool = False
    split: Any = None
    holdout: Any = None


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


def warm_start(selection: Selection) -> Optional[Warm]:
    """The solver's warm start from ``selection``: its own updated weights and its ``Hd⁻¹`` (either may be
    None; a mask-only selection's start is the mask-only weights, which is where the solver starts anyway)."""
    factor = getattr(selection, "factor", None)
    if selection.weight is None and factor is None:
        return None
    if factor is None:
        return Warm(weight=selection.weight)
    return Warm(weight=selection.weight, inverse=factor.inverse, hessian=factor.hessian, damp=factor.damp)


class OptimaUpdate:
    name = "optima"
    needs_hessian = True

    def update(self, weight: Tensor, selection: Selection, hessian: Optional[Tensor],
               options: UpdateOptions) -> Update:
        solve = dict(solver=options.solver, tol=options.tol, max_iter=options.max_iter,
                     double_precision=options.double_precision, split=options.split)
        choice = None
        if is_auto(options.damp):
            if options.holdout is None:
                raise ValueError("damp='auto' needs the layer's fit and held-out Hessians in UpdateOptions.holdout "
                                 "(prune_model supplies them); call with a number for damp otherwise")
            res, choice = reconstruct_auto(weight, selection.pruned, options.holdout, **solve)
            requested = choice.damp
        else:
            res = reconstruct(weight, selection.pruned, hessian, damp=options.damp, warm=warm_start(selection),
                              **solve)
            requested = options.damp
        keys = ("solver", "iterations", "converged", "kkt_residual", "seconds", "damp", "fallback",
                "mask_only_rows", "row_chunk")
        stats = {k: res.stats()[k] for k in keys}
        stats["damp_escalated"] = requested is not None and res.damp != requested
        if choice is not None:  # per layer: the choice, every candidate's validation figures, the time factor
            if choice.damp is None:  # the mask alone won (λ = ∞): no damp to report
                stats["damp"] = None
            total = choice.seconds + res.seconds
            stats["damp_auto"] = dict(choice.stats(), fit_tokens=options.holdout.fit_tokens,
                                      val_tokens=options.holdout.val_tokens, solve_seconds=res.seconds,
                                      time_factor=total / res.seconds if res.seconds > 0 else None)
            stats["seconds"] = total
        return Update(res.weight, stats, objective=res.objective, mask_objective=res.mask_objective)


BUILTIN_UPDATERS = [NoUpdate(), NativeUpdate(), OptimaUpdate()]
