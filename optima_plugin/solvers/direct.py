"""Exact solver: batched Cholesky of each row's kept (or pruned) principal submatrix.

Two equivalent exact forms, chosen per call by which set is smaller:

* kept set ``S``:   ``Hd_SS ŵ_S = (Hd (w ∘ pruned))_S + Hd_SS w_S``, i.e. solve
  ``Hd_SS x = (Hd p)_S`` with ``p = w ∘ pruned`` and ``ŵ_S = w_S + x``;
* pruned set ``P``: with ``G = Hd⁻¹``, solve ``G_PP z = w_P`` and set
  ``ŵ = w - z G`` (the OBS multi-weight removal), which zeroes ``P`` exactly.

Rows are padded to the largest set in their chunk with identity, so one batched
``cholesky`` / ``cholesky_solve`` handles a chunk of rows; chunks are sized to
a memory budget. A submatrix that Cholesky rejects raises ``LinAlgError``, and
:func:`~optima_plugin.solvers.reconstruct.reconstruct` re-solves with more damping.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .base import SolverOutput, register_solver
from .problem import Problem, cholesky_checked

#: Bytes the padded ``rows x k x k`` systems of one chunk may take.
MEMORY_BUDGET_BYTES = 512 * 2**20


def _batched_principal_solve(matrix: Tensor, members: Tensor, rhs: Tensor) -> Tensor:
    """Solve ``matrix[S_i, S_i] x_i = rhs[i, S_i]`` for every row ``i``.

    Args:
        matrix: ``d x d`` symmetric positive definite.
        members: bool ``r x d``, row ``i``'s set ``S_i``.
        rhs: ``r x d``; only entries in ``S_i`` are read.
    Returns:
        ``r x d`` with ``x_i`` scattered into ``S_i`` and zeros elsewhere.
    """
    r, d = members.shape
    out = torch.zeros_like(rhs)
    sizes = members.sum(dim=1)
    # Sort rows by set size so padding inside a chunk is small.
    order = torch.argsort(sizes, descending=True)
    bytes_per_elem = matrix.element_size()
    start = 0
    while start < r:
        kmax = int(sizes[order[start]])
        if kmax == 0:
            break
        per_row = max(1, kmax * kmax * bytes_per_elem * 3)
        chunk = max(1, min(r - start, MEMORY_BUDGET_BYTES // per_row))
        rows = order[start : start + chunk]
        start += chunk
        m = members[rows]
        # Members first (stable), then padding positions.
        idx = torch.argsort((~m).to(torch.int8), dim=1, stable=True)[:, :kmax]
        valid = torch.gather(m, 1, idx)
        sub = matrix[idx.unsqueeze(2), idx.unsqueeze(1)]
        pair = valid.unsqueeze(2) & valid.unsqueeze(1)
        eye = torch.eye(kmax, dtype=matrix.dtype, device=matrix.device).expand_as(sub)
        sub = torch.where(pair, sub, eye)
        b = torch.gather(rhs[rows], 1, idx).masked_fill(~valid, 0.0).unsqueeze(2)
        chol = cholesky_checked(sub, "a row's kept (or pruned) principal submatrix")
        x = torch.cholesky_solve(b, chol).squeeze(2).masked_fill(~valid, 0.0)
        block = torch.zeros(len(rows), d, dtype=rhs.dtype, device=rhs.device)
        block.scatter_(1, idx, x)
        out[rows] = block.masked_fill(~m, 0.0)
    return out


@register_solver("direct")
def solve_direct(
    problem: Problem, *, tol: Optional[float] = None, max_iter: Optional[int] = None
) -> SolverOutput:
    """Exact optimum for every row (``tol`` and ``max_iter`` are ignored)."""
    keep, pruned = problem.keep, problem.pruned
    hd = problem.damped
    n_keep, n_pruned = int(keep.sum()), int(pruned.sum())
    if n_pruned == 0:
        return SolverOutput(problem.weight.clone(), 0, True)
    if n_keep <= n_pruned:
        p = problem.pruned_part()
        x = _batched_principal_solve(hd, keep, p @ hd)
        new = problem.mask_only() + x
    else:
        g = problem.inverse()
        z = _batched_principal_solve(g, pruned, problem.weight)
        new = problem.weight - z @ g
    return SolverOutput(new.masked_fill(pruned, 0.0), 1, True)
