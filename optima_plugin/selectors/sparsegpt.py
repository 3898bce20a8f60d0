"""SparseGPT (Frantar & Alistarh, 2023): mask selection and OBS update together.

Columns are visited in blocks of 128. Unstructured: at the start of each block
the weights with the smallest ``w² / diag(Hinv)²`` in the block are pruned
(one threshold over the block, as the original; with per-row ratios each row
prunes its remaining quota in proportion to the columns left, so that row ``i``
ends with exactly ``floor(ratio_i · d)`` pruned weights). N:M: every ``M``
columns the ``N`` smallest of each group. Each pruned weight's error is spread over the later columns with the
upper Cholesky factor of ``Hd⁻¹``; the loop over columns is sequential, every
step vectorised over rows. A damped Hessian that Cholesky rejects escalates
damping (:func:`~optima_plugin.solvers.problem.escalate_damp`) with a warning.
"""

from __future__ import annotations

import torch

from ..solvers.problem import Warm, cholesky_checked, escalate_damp, inverse_spd, solver_damped
from ..solvers.sparsegpt import obs_sweep
from ..sparsity import Pattern, block_quota, count_mask, row_counts
from .base import Ratio, Selection, check_ratio

BLOCKSIZE = 128
DAMP = 0.01


def _factors(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(G, U, damp used)``: ``G = Hd⁻¹`` (``Hd`` as the solvers damp it, :func:`solver_damped`) and its
    upper Cholesky factor ``U`` (``G = Uᵀ U``, SparseGPT's ``Hinv``) for ``hessian`` (float32 ``d x d``), with
    damping escalated while Cholesky fails."""
    def attempt(dmp: float, _last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        inverse = inverse_spd(solver_damped(hessian, dmp))
        return inverse, cholesky_checked(inverse, "inverse of the damped Hessian", upper=True)

    (inverse, upper), used = escalate_damp(attempt, damp, what="sparsegpt selector")
    return inverse, upper, used


def _hinv(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """``(U, damp used)`` of :func:`_factors`: SparseGPT's ``Hinv``."""
    _, upper, used = _factors(hessian, damp)
    return upper, used


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, ratio: Ratio, pattern: Pattern,
                    blocksize: int = BLOCKSIZE, damp: float = DAMP) -> Selection:
    """Return SparseGPT's mask and updated weights (float32, ``r x d``) for one layer."""
    w = weight.detach().float().clone()
    h = hessian.to(device=w.device, dtype=torch.float32)
    dead = h.diagonal() == 0
    w[:, dead] = 0
    inverse, hinv, used = _factors(h, damp)
    r, d = w.shape
    pruned = torch.zeros(r, d, dtype=torch.bool, device=w.device)
    per_row = row_counts(ratio, r, d, w.device) if torch.is_tensor(ratio) and not pattern.structured else None
    done = torch.zeros(r, dtype=torch.long, device=w.device)

    def select(w1: torch.Tensor, h1: torch.Tensor, m1: torch.Tensor, i1: int, i: int) -> None:
        """The mask of the block starting at ``i1`` (unstructured: at its first column; N:M: every M columns)."""
        if not pattern.structured and i == 0:
            score = w1**2 / h1.diagonal().unsqueeze(0) ** 2
            if per_row is not None:  # each row meets its own ratio over the whole layer
                m1.copy_(count_mask(score, block_quota(per_row, done, i1, i1 + w1.shape[1], d)))
                done.add_(m1.sum(1))
            else:
                k = int(score.numel() * ratio)
                if k:
                    mask = torch.zeros_like(score, dtype=torch.bool)
                    mask.view(-1)[torch.topk(score.flatten(), k, largest=False).indices] = True
                    m1.copy_(mask)
        elif pattern.structured and i % pattern.m == 0:
            score = w1[:, i : i + pattern.m] ** 2 / h1.diagonal()[i : i + pattern.m].unsqueeze(0) ** 2
            idx = torch.topk(score, pattern.n, dim=1, largest=False).indices
            m1[:, i : i + pattern.m].scatter_(1, idx, True)

    obs_sweep(w, pruned, hinv, blocksize, select=select)
    return Selection(pruned, w.masked_fill_(pruned, 0.0), {"damp": used, "damp_escalated": used != damp},
                     factor=Warm(inverse=inverse, hessian=hessian, damp=used))


class SparseGPTSelector:
    name = "sparsegpt"
    needs_hessian = True

    def score(self, weight, hessian):
        """``r x d`` float32 OBS saliency ``w² / diag(U)²`` (``U`` = upper Cholesky factor of
        ``(H + λI)⁻¹``) of the dense weights, as SparseGPT ranks its first block; dead inputs score 0."""
        w = weight.detach().float().clone()
        h = hessian.to(device=w.device, dtype=torch.float32)
        w[:, h.diagonal() == 0] = 0
        _, u, _ = _factors(h, DAMP)
        return w**2 / u.diagonal().unsqueeze(0) ** 2

    def select(self, weight, hessian, ratio: Ratio, pattern: Pattern) -> Selection:
        if not pattern.structured:
            check_ratio(ratio)
        return sparsegpt_prune(weight, hessian, ratio, pattern)
