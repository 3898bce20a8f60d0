"""SparseGPT's sequential OBS update for a fixed mask (Frantar & Alistarh, 2023).

Columns are visited left to right in blocks of ``blocksize``; pruning column
``i`` compensates only the columns after it, using the upper Cholesky factor
of ``Hd⁻¹``. This is the approximate update every other solver is compared to.
The column loop is sequential by nature; every step is vectorised over rows.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .base import SolverOutput, register_solver
from .problem import Problem, obs_factor

BLOCKSIZE = 128


#: ``select(w1, h1, m1, i1, i)``: before column ``i1 + i`` is visited, may set more of the block's mask ``m1``
#: (in place) from the block's current weights ``w1`` and its factor block ``h1``
ColumnSelect = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], None]


def obs_sweep(w: torch.Tensor, pruned: torch.Tensor, hinv: torch.Tensor, blocksize: int = BLOCKSIZE,
              target: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None,
              select: Optional[ColumnSelect] = None) -> None:
    """SparseGPT's sequential OBS sweep over the columns of ``w`` (``r x d``, updated in place).

    ``hinv`` is the ``d x d`` upper Cholesky factor of ``Hd⁻¹`` (:func:`obs_factor`). Column ``i`` is set to
    ``target(column, i)`` (default: the column itself; GPTQ rounds it to its grid) with its ``pruned`` entries 0,
    and the error is compensated on the columns after it, block by block. ``select`` (the SparseGPT selector)
    chooses the mask during the sweep, writing ``pruned`` (bool ``r x d``) in place; without it ``pruned`` is
    the fixed mask. Pruned entries of ``w`` are not zeroed here.
    """
    d = w.shape[1]
    for i1 in range(0, d, blocksize):
        i2 = min(i1 + blocksize, d)
        w1 = w[:, i1:i2].clone()
        m1 = pruned[:, i1:i2]
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if select is not None:
                select(w1, h1, m1, i1, i)
            q = (w1[:, i] if target is None else target(w1[:, i], i1 + i)).masked_fill(m1[:, i], 0.0)
            err = (w1[:, i] - q) / h1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]


def sparsegpt_update(weight: torch.Tensor, pruned: torch.Tensor, hinv: torch.Tensor,
                     blocksize: int = BLOCKSIZE,
                     target: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None) -> torch.Tensor:
    """Return ``weight`` (``r x d``) updated by sequential OBS (:func:`obs_sweep`) for ``pruned`` (bool ``r x d``).

    Pruned entries of the result are 0.
    """
    w = weight.clone()
    obs_sweep(w, pruned, hinv, blocksize, target)
    return w.masked_fill_(pruned, 0.0)


@register_solver("sparsegpt")
def solve_sparsegpt(
    problem: Problem, *, tol: Optional[float] = None, max_iter: Optional[int] = None
) -> SolverOutput:
    """SparseGPT's update on the problem's mask (``tol``/``max_iter`` ignored)."""
    hinv = problem.memo("obs_factor", lambda: obs_factor(problem.damped))
    new = sparsegpt_update(problem.weight, problem.pruned, hinv)
    return SolverOutput(new, problem.weight.shape[1], True)
