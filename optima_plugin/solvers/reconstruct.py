"""``reconstruct``: the public entry point to every solver."""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .base import get_solver
from .problem import figures, prepare

log = logging.getLogger(__name__)


@dataclass
class Reconstruction:
    """Result of :func:`reconstruct`.

    Attributes:
        weight: ``r x d``, the input's dtype and device, pruned entries exactly 0.
        objective: ``Σ_rows (ŵ - w)ᵀ H (ŵ - w)`` with the undamped ``H``.
        mask_objective: the same for the mask-only weights ``w ∘ keep``.
        error_ratio: ``objective / mask_objective`` (1.0 = no compensation).
        kkt_residual: relative stationarity error on kept entries (0 = optimal).
        iterations: solver iterations.
        converged: False when the solver missed its tolerance or did not improve.
        solver: the solver's name.
        seconds: wall time of the solve.
    """

    weight: Tensor
    objective: float
    mask_objective: float
    error_ratio: float
    kkt_residual: float
    iterations: int
    converged: bool
    solver: str
    seconds: float

    def stats(self) -> dict:
        """Everything but the weight, as plain Python values (for JSON reports)."""
        return {k: v for k, v in self.__dict__.items() if k != "weight"}


def reconstruct(
    weight: Tensor,
    pruned: Tensor,
    hessian: Tensor,
    *,
    solver: str = "pcg",
    damp: float = 0.01,
    tol: Optional[float] = None,
    max_iter: Optional[int] = None,
    double_precision: bool = False,
) -> Reconstruction:
    """Re-solve the kept weights of a layer so its outputs match the dense layer.

    Args:
        weight: ``r x d`` dense weights, any float dtype and device.
        pruned: bool ``r x d``, True = pruned.
        hessian: ``d x d`` mean of ``x xᵀ`` over calibration tokens.
        solver: one of ``pcg`` (default), ``direct``, ``pdhg``, ``adam``, ``sparsegpt``.
        damp: relative damping; ``λ = damp · mean(diag H)``.
        tol, max_iter: solver tolerance and iteration cap (solver defaults if None).
        double_precision: compute in float64 instead of float32.

    Returns:
        A :class:`Reconstruction`. Its weights are never worse (by the undamped
        objective) than the mask-only weights: when the solver does not improve
        on them, they are returned with ``converged=False`` and a warning.
    """
    solve = get_solver(solver)
    problem = prepare(weight, pruned, hessian, damp=damp, double_precision=double_precision)
    sync = torch.cuda.synchronize if problem.weight.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = solve(problem, tol=tol, max_iter=max_iter)
    sync()
    seconds = time.perf_counter() - t0

    new = out.weight.masked_fill(problem.pruned, 0.0)
    mask_only = problem.mask_only()
    before = figures(problem, mask_only - problem.weight)
    after = figures(problem, new - problem.weight)
    objective, mask_objective = after.objective, before.objective
    converged = out.converged
    if not torch.isfinite(new).all() or objective > mask_objective:
        warnings.warn(
            f"solver {solver!r} did not improve on the mask-only weights "
            f"(objective {objective:.4g} vs {mask_objective:.4g}); keeping the mask-only weights",
            RuntimeWarning,
            stacklevel=2,
        )
        new, after, converged = mask_only, before, False
        objective = before.objective
    if mask_objective > 0:
        error_ratio = objective / mask_objective
    else:
        error_ratio = 1.0 if objective > 0 else 0.0
    return Reconstruction(
        weight=new.to(dtype=weight.dtype, device=weight.device),
        objective=objective,
        mask_objective=mask_objective,
        error_ratio=error_ratio,
        kkt_residual=after.kkt_numerator / before.kkt_numerator if before.kkt_numerator > 0 else 0.0,
        iterations=out.iterations,
        converged=converged,
        solver=solver,
        seconds=seconds,
    )
