"""Masked preconditioned conjugate gradient on the pruned set, all rows at once.

The default solver. With ``G = Hd⁻¹`` the optimum of every row is the OBS
multi-weight removal ``ŵ = w - z G`` where ``z`` (supported on the row's pruned
set ``P``) solves ``G_PP z_P = w_P``. All rows share ``G``, so restricting it to
each row's ``P`` is a mask on both sides of one product: an iteration for all
rows together is one GEMM ``(p ∘ pruned) @ G`` followed by ``∘ pruned``. Step
sizes are per row; the preconditioner is Jacobi ``1 / diag(G)`` (its first
step is the classic one-weight-at-a-time OBS update).

Why the pruned-set (dual) form: on real LLM activations it needs 3-7x fewer
iterations than masked CG on the kept set ``Hd_SS`` with Jacobi (measured on
SmolLM2-135M layers: 6-15 versus 27-110 iterations to a 1e-5 objective gap).

Stopping is certified per row. CG increases the dual value
``D(z) = 2 wᵀz - zᵀGz`` (a lower bound on the optimum ``f*``) by ``α·rᵀs`` per
step, and the feasible weights it implies have objective at most
``D + ρᵀ Hd ρ`` (``ρ`` the residual on ``P``). A row stops once
``ρᵀ Hd ρ <= tol · D``, i.e. once its damped objective is provably within a
relative ``tol`` of its optimum. The GEMM that certifies is only paid for rows
whose CG step ``α·rᵀs`` is below ``CERTIFY_AT · tol · D``: on real and synthetic
layers ``ρᵀ Hd ρ`` is 3-5x smaller than the step that produced it, so most rows
certify one iteration earlier than a step-only test would let them, and the few
that fail simply go on iterating.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .base import SolverOutput, register_solver
from .problem import Problem

DEFAULT_TOL = 1e-5
DEFAULT_MAX_ITER = 300
#: rows whose CG step is below ``CERTIFY_AT · tol · D`` are certified (one GEMM on those rows)
CERTIFY_AT = 4.0


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``(r,)`` row-wise dot products of two ``r x d`` matrices."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def warm_multiplier(damped: Tensor, pruned: Tensor, weight: Tensor, start: Tensor) -> Tensor:
    """``r x d`` multiplier ``z = ((w - ŵ₀) Hd) ∘ pruned`` implied by warm weights ``ŵ₀`` (pruned entries 0).

    At the optimum the stationarity ``((w - ŵ) Hd)_S = 0`` on the kept set makes ``ŵ = w - z G`` exactly, so
    warm weights at the optimum give the optimal ``z`` (PCG then certifies before its first step); near it, a
    ``z`` near the optimal one.
    """
    return ((weight - start) @ damped).masked_fill_(~pruned, 0.0)


def dual_pcg(
    inverse: Tensor, damped: Tensor, pruned: Tensor, weight: Tensor, *, tol: float, max_iter: int,
    start: Optional[Tensor] = None
) -> tuple[Tensor, int, Tensor]:
    """Solve ``inverse[P_i, P_i] z_i = weight[i, P_i]`` for every row ``i`` by PCG.

    Args:
        inverse: ``d x d`` ``G = Hd⁻¹``.
        damped: ``d x d`` ``Hd`` (only used to certify convergence).
        pruned: bool ``r x d``, row ``i``'s set ``P_i``.
        weight: ``r x d`` dense weights.
        tol: relative objective gap at which a row stops.
        max_iter: iteration cap.
        start: optional ``r x d`` warm weights (pruned entries 0): each row starts from the multiplier
            :func:`warm_multiplier` implies, scaled by the ``γ`` that maximises ``D(γ z)`` (``γ = wᵀz / zᵀGz``,
            so ``D = (wᵀz)² / zᵀGz >= 0 = D(0)``: never a worse start than the cold one; a row with
            ``wᵀz = 0`` starts cold), and rows whose start already meets the certificate stop before any
            iteration. The stopping test is the same, so a warm and a cold solve are both within ``tol`` of
            the same optimum.
    Returns:
        ``(correction, iterations, converged)``: ``correction = z G`` (``r x d``,
        so ``ŵ = w - correction`` off ``P``), accumulated along the iterations
        so no final product is needed; ``converged`` is bool ``(r,)``.
    """
    r, _ = pruned.shape
    mask = pruned.to(inverse.dtype)
    b = weight * mask
    out = torch.zeros_like(b)
    converged = (b == 0).all(dim=1)
    rows = torch.nonzero(~converged).squeeze(1)  # the working set
    m, res = mask[rows], b[rows]
    u = torch.zeros_like(res)  # z G for the working rows
    dual = torch.zeros(rows.numel(), dtype=res.dtype, device=res.device)
    if start is not None and rows.numel():
        z = warm_multiplier(damped, pruned[rows], weight[rows], start[rows])
        zg = z @ inverse
        wz, zgz = _rowdot(z, res), _rowdot(z, zg)
        gamma = (wz / zgz.clamp_min(torch.finfo(z.dtype).tiny)).unsqueeze(1)  # the best multiple of z
        z, zg = z * gamma, zg * gamma
        warm_dual = _rowdot(z, 2.0 * res - zg)  # D(z) = 2 wᵀz - zᵀGz
        better = warm_dual > 0  # D(0) = 0: a row whose start does not beat it starts cold
        if bool(better.any()):
            u = torch.where(better.unsqueeze(1), zg, u)
            res = torch.where(better.unsqueeze(1), res - zg * m, res)
            dual = torch.where(better, warm_dual, dual)
            # the certificate at the start: rows already within tol of their optimum do not iterate
            done = better & (_rowdot(res @ damped, res) <= tol * dual)
            if bool(done.any()):
                converged[rows[done]] = True
                out[rows[done]] = u[done]
                left = ~done
                rows, m, res, u, dual = (t[left] for t in (rows, m, res, u, dual))
    inv_diag = 1.0 / inverse.diagonal()
    s = res * inv_diag
    p = s
    rs = _rowdot(res, s)
    tiny = torch.finfo(inverse.dtype).tiny
    it = 0
    while rows.numel() and it < max_iter:
        it += 1
        gp_full = p @ inverse
        gp = gp_full * m
        alpha = (rs / _rowdot(p, gp).clamp_min(tiny)).unsqueeze(1)
        u.addcmul_(alpha, gp_full)
        res.addcmul_(alpha, gp, value=-1.0)
        step = alpha.squeeze(1) * rs
        dual += step
        done = step <= CERTIFY_AT * tol * dual
        if bool(done.any()):
            cand = torch.nonzero(done).squeeze(1)
            rc = res[cand]
            done[cand] = _rowdot(rc @ damped, rc) <= tol * dual[cand]
        if bool(done.any()):
            converged[rows[done]] = True
            out[rows[done]] = u[done]
            left = ~done
            rows, m, res, p, rs, u, dual = (t[left] for t in (rows, m, res, p, rs, u, dual))
            if rows.numel() == 0:
                break
        s = res * inv_diag
        rs_new = _rowdot(res, s)
        p.mul_((rs_new / rs.clamp_min(tiny)).unsqueeze(1)).add_(s)
        rs = rs_new
    out[rows] = u  # rows that hit max_iter keep their last iterate
    return out, it, converged


@register_solver("pcg")
def solve_pcg(
    problem: Problem, *, tol: Optional[float] = None, max_iter: Optional[int] = None
) -> SolverOutput:
    """Masked PCG on the pruned set; ``tol`` (default 1e-5) is a certified relative objective gap; starts
    from ``problem.start`` when there is one (a warm start: same stopping test, fewer iterations)."""
    tol = DEFAULT_TOL if tol is None else tol
    max_iter = DEFAULT_MAX_ITER if max_iter is None else max_iter
    inverse = problem.inverse()
    correction, it, conv = dual_pcg(
        inverse, problem.damped, problem.pruned, problem.weight, tol=tol, max_iter=max_iter, start=problem.start
    )
    new = (problem.weight - correction).masked_fill(problem.pruned, 0.0)
    return SolverOutput(new, it, bool(conv.all()))
