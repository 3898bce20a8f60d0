"""Thanos-style block-wise pruning (after Ilin & Richtárik, "Thanos", 2024).

Columns are visited in blocks of ``B`` (128). For each block, every row's
pruned set ``P`` inside the block is chosen by Wanda-like scores
``|w| · sqrt(H_jj)`` (unstructured: each row prunes its share of the block so
the row meets its ratio; N:M: inside each group), then all of the block's
pruned weights of a row are removed *at once* with the exact multi-weight OBS
update on the columns not yet processed:

    Δ = - z · Hinv[P, :]     with   Hinv[P, P] z = w_P,   Hinv = (Hd[i:, i:])⁻¹

(one small batched Cholesky solve per block, rows padded to the block's largest
``|P|``). This differs from SparseGPT, which removes one column at a time and
compensates only later columns with a fixed inverse. Simplification against the
original code: the mask inside a block uses the Wanda metric on the current
(updated) weights rather than Thanos' global-residual selection. A damped
Hessian (or block) that Cholesky rejects re-runs the layer with escalated
damping (:func:`~optima_plugin.solvers.problem.escalate_damp`), with a warning.
"""

from __future__ import annotations

import torch

from ..solvers.problem import Warm, cholesky_checked, damp_hessian, escalate_damp, inverse_spd, solver_damped
from ..sparsity import Pattern, block_quota, count_mask, nm_mask, row_counts
from .base import Ratio, Selection, check_ratio

BLOCKSIZE = 128
DAMP = 0.01


def _obs_remove(w: torch.Tensor, hinv: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Remove ``pruned`` (bool ``r x k``, within the first k columns of ``w``) optimally.

    ``w`` is ``r x m`` (the not yet processed columns), ``hinv`` ``m x m``.
    """
    r, k = pruned.shape
    sizes = pruned.sum(1)
    kmax = int(sizes.max()) if r else 0
    if kmax == 0:
        return w
    idx = torch.argsort((~pruned).to(torch.int8), dim=1, stable=True)[:, :kmax]
    valid = torch.gather(pruned, 1, idx)
    sub = hinv[idx.unsqueeze(2), idx.unsqueeze(1)]
    eye = torch.eye(kmax, dtype=w.dtype, device=w.device).expand_as(sub)
    sub = torch.where(valid.unsqueeze(2) & valid.unsqueeze(1), sub, eye)
    rhs = torch.gather(w, 1, idx).masked_fill(~valid, 0.0).unsqueeze(2)
    chol = cholesky_checked(sub, "a block's pruned submatrix of the inverse")
    z = torch.cholesky_solve(rhs, chol).squeeze(2).masked_fill(~valid, 0.0)
    # Δ = -Σ_p z_p Hinv[p, :]  →  gather the needed rows of Hinv per row of w
    delta = torch.bmm(z.unsqueeze(1), hinv[idx]).squeeze(1)
    return w - delta


def thanos_prune(weight, hessian, ratio: Ratio, pattern: Pattern, blocksize: int = BLOCKSIZE,
                 damp: float = DAMP) -> Selection:
    """Return Thanos-style mask and updated weights (float32, ``r x d``).

    The whole layer is re-run with escalated damping if a Cholesky factorisation fails.
    """
    h = hessian.to(device=weight.device, dtype=torch.float32)
    selection, used = escalate_damp(
        lambda dmp, _last: _thanos_blocks(weight, solver_damped(h, dmp), ratio, pattern, blocksize),
        damp, what="thanos selector")
    selection.stats.update(damp=used, damp_escalated=used != damp)
    if selection.factor is not None:  # its first block's inverse is the whole Hd⁻¹
        selection.factor = Warm(inverse=selection.factor.inverse, hessian=hessian, damp=used)
    return selection


def _thanos_blocks(weight, hd: torch.Tensor, ratio: Ratio, pattern: Pattern, blocksize: int) -> Selection:
    """:func:`thanos_prune` for a given damped Hessian ``hd`` (float32 ``d x d``)."""
    w = weight.detach().float().clone()
    r, d = w.shape
    norms = hd.diagonal().sqrt()
    pruned = torch.zeros(r, d, dtype=torch.bool, device=w.device)
    target = None if pattern.structured else row_counts(ratio, r, d, w.device)
    done = torch.zeros(r, dtype=torch.long, device=w.device)
    full = None  # the first block's inverse: Hd⁻¹ of the whole layer
    for i1 in range(0, d, blocksize):
        i2 = min(i1 + blocksize, d)
        score = w[:, i1:i2].abs() * norms[i1:i2]
        if pattern.structured:
            m1 = nm_mask(score, pattern)
        else:
            # each row prunes its remaining quota in proportion to the columns left
            m1 = count_mask(score, block_quota(target, done, i1, i2, d))
            done += m1.sum(1)
        hinv = inverse_spd(hd[i1:, i1:])
        full = hinv if i1 == 0 else full
        w[:, i1:] = _obs_remove(w[:, i1:], hinv, m1)
        pruned[:, i1:i2] = m1
        w[:, i1:i2].masked_fill_(m1, 0.0)
    return Selection(pruned, w.masked_fill_(pruned, 0.0), factor=None if full is None else Warm(inverse=full))


class ThanosSelector:
    name = "thanos"
    needs_hessian = True

    def score(self, weight, hessian):
        """``r x d`` float32 ``|w| · sqrt(diag(H + λI))``, the in-block selection score (lower goes first)."""
        hd = damp_hessian(hessian.to(device=weight.device, dtype=torch.float32), DAMP)
        return weight.detach().abs().float() * hd.diagonal().sqrt()

    def select(self, weight, hessian, ratio: Ratio, pattern: Pattern) -> Selection:
        if not pattern.structured:
            check_ratio(ratio)
        return thanos_prune(weight, hessian, ratio, pattern)
