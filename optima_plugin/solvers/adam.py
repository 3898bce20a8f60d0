"""The OPTIMA paper's fallback update (``use_qp_solver=False``): Adam on the objective.

For each learning rate of a small grid, run a few Adam steps on all rows at once
(loss ``Σ_rows (ŵ - w)ᵀ Hd (ŵ - w)``) with a linearly decaying rate, re-applying
the mask after every step, and keep the best iterate seen over the whole grid.
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import SolverOutput, register_solver
from .problem import Problem, objective_per_row

LEARNING_RATES = (1e-2, 1e-3, 1e-4, 1e-5)
DEFAULT_STEPS = 20


@register_solver("adam")
def solve_adam(
    problem: Problem, *, tol: Optional[float] = None, max_iter: Optional[int] = None
) -> SolverOutput:
    """Adam over ``LEARNING_RATES`` with ``max_iter`` (default 20) steps each; ``tol`` unused."""
    steps = DEFAULT_STEPS if max_iter is None else max_iter
    keep = problem.keep.to(problem.dtype)
    start = problem.mask_only()
    best = start
    best_loss = float(objective_per_row(problem.damped, start - problem.weight).sum())
    for lr in LEARNING_RATES:
        w = start.clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / steps)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = objective_per_row(problem.damped, w - problem.weight).sum()
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                w.mul_(keep)
                cur = float(objective_per_row(problem.damped, w - problem.weight).sum())
                if cur < best_loss:
                    best_loss, best = cur, w.detach().clone()
    return SolverOutput(best, steps * len(LEARNING_RATES), True)
