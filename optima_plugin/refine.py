"""Mask refinement: change WHICH weights are pruned after the exact solve, keeping the pattern.

Given a layer's fixed-mask optimum ``ŵ`` (``r x d``) for the mask ``pruned`` (bool
``r x d``, True = pruned), each row minimises ``(ŵ - t)ᵀ H (ŵ - t)`` over the
masks with the same number of pruned entries in that row (so per-row ratios, TRIM's,
are kept) and, for N:M, exactly ``n`` pruned entries in every group of ``m``
consecutive inputs. ``t`` is the target row (``target``: the dense weights today;
any ``r x d`` target works). The solvers minimise with the damped ``Hd = H + λI``
(:func:`~optima_plugin.solvers.problem.damp_hessian`); the reported objectives use the
undamped ``H``.

Dead inputs (``H_jj = 0``; ``damp_hessian`` gives them ``Hd_jj = 1 + λ`` in absolute units,
decoupled from the rest) are never un-pruned: keeping one cannot lower the objective, and in
damped units its ``Hd_jj`` would dwarf every live input's at small activation scales. Pruning
a kept one is free (its undamped cost is 0), so both methods rank it first to prune.

Two methods, both vectorised over rows (loops run over iterations only):

* ``swap``: at ``ŵ`` the gradient ``g = Hd (ŵ - t)`` vanishes on kept entries and is the
  KKT multiplier on pruned ones. Pruning a kept ``i`` without compensation raises the
  damped objective by exactly ``ŵ_i² Hd_ii`` (``g_i = 0``); then freeing a pruned ``j``
  alone lowers it by ``(g_j - ŵ_i Hd_ij)² / Hd_jj``. The difference,
  ``s(i, j) = (g_j - ŵ_i Hd_ij)² / Hd_jj - ŵ_i² Hd_ii``, is a certified lower bound on
  the decrease of the swap (the exact re-solve on the new support only does better), and
  it sees the correlation ``Hd_ij`` between the pair (a correlated neighbour can stand in
  for the weight it replaces), which the separate estimates ``g_j² / Hd_jj`` and the OBS
  cost ``ŵ_i² / [(Hd_SS)⁻¹]_ii`` do not; it needs no per-row inverse. The cost proxy
  ``ŵ_i² Hd_ii`` is the exact uncompensated cost, an upper bound on the OBS cost. Each
  iteration every row proposes its ``b`` best disjoint pairs (for N:M the pair lies in one
  group, ``b`` groups per row) among its ``CANDIDATES`` best un-prune and prune candidates,
  the proposing rows are re-solved exactly, and a row's new mask is accepted only where
  its exact objective dropped. ``b`` doubles after an acceptance (up to ``MAX_SWAPS``) and
  halves after a rejection; a row rejected with ``b = 1`` stops.
* ``admm``: ALPS-style (Meng et al. 2024) ADMM with ``W`` free, ``Z`` in the pattern and
  the scaled dual ``U``, in the variables ``W diag(Hd)^½`` (unit-diagonal Hessian: the
  magnitude projection then weighs each input by its energy, as Wanda does; without it
  the iterates drift to plain magnitude masks). Starts at ``W = Z =`` the optimum, ``U = 0``.
  W-step: ``(Hd + ρ/2 I) W = Hd T + ρ/2 (Z - U)`` for all rows with
  one Cholesky per ``ρ``; Z-step: the Euclidean projection of ``W + U`` onto the pattern
  (per row its pruned count of smallest magnitudes, per group for N:M, dead inputs ranked
  below every live one); ``U += W - Z``;
  ``ρ ×= RHO_GROWTH`` every ``RHO_EVERY`` iterations so the support settles. Then the rows
  whose support changed are re-solved exactly on ``Z``'s support and kept only where
  their exact objective dropped.

Measured on SmolLM2-135M block 3 (16 x 256 pydoc tokens, Wanda mask, pcg, CPU): the exact
objective of ``down_proj`` (576 x 1536) drops 44% with ``swap`` (20 iterations, 54 s) and
46% with ``admm`` (30 iterations, 14 s) at 50% unstructured, 25% and 41% at 2:4; ``q_proj``
(576 x 576) 33% / 34% and 21% / 29%. ``swap`` re-solves every proposing row each iteration,
so it costs about one solve per iteration; ``admm`` one triangular solve pair per iteration.

Certification: a row's new mask and weights replace the old ones only when its undamped
objective ``(ŵ - t)ᵀ H (ŵ - t)`` drops by more than ``ACCEPT_RTOL`` (relative) and the new
mask un-prunes no dead input. The objective is computed in float64 straight from ``H`` on
the weights as returned (rounded to their dtype), not recovered from the damped figure
(``damped - Σ shift δ²`` loses it to rounding when dead inputs' ``Hd_jj = 1`` dominate), so
no row's objective, and hence no layer's, rises at any activation scale; the reported
``objective_before`` / ``objective`` are the sums of those float64 row figures.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from .solvers.base import get_solver
from .solvers.problem import Problem, cholesky_checked, prepare
from .sparsity import Pattern, count_mask, nm_mask

log = logging.getLogger(__name__)

METHODS = ("none", "swap", "admm")
#: un-prune and prune candidates per row among which ``swap`` pairs (unstructured)
CANDIDATES = 32
#: most swaps one row proposes in one iteration
MAX_SWAPS = 16
#: a row is accepted when its float64 undamped objective drops by more than this relative amount
ACCEPT_RTOL = 1e-6
#: ``admm``: ``ρ`` starts at ``RHO_START`` (the problem scaled to unit diagonal) and grows
#: ``× RHO_GROWTH`` every ``RHO_EVERY`` iterations
RHO_START = 0.3
RHO_GROWTH = 1.3
RHO_EVERY = 3
#: ``admm`` stops early once Z's support has not changed for this many iterations
ADMM_STABLE = 5
#: bytes the per-group pair scores of one row chunk may take (``swap`` with N:M)
CHUNK_BYTES = 256 * 2**20


@dataclass
class Refinement:
    """Result of :func:`refine_mask`.

    Attributes:
        pruned: bool ``r x d``, True = pruned; the same per-row counts (and N:M groups) as the input.
        weight: ``r x d`` in the input weights' dtype and device, pruned entries exactly 0.
        method: ``swap`` or ``admm``.
        objective_before: ``Σ_rows (ŵ - t)ᵀ H (ŵ - t)`` (undamped, each row in float64) of the input weights.
        objective: the same for the returned weights (never above ``objective_before``).
        iterations: iterations run.
        rows_changed: rows whose mask changed.
        swaps: pruned entries moved (a pair un-pruned/pruned counts once), over all rows.
        rejected_rows: rows whose proposal the exact re-solve did not certify (``admm``: at the end;
            ``swap``: summed over iterations).
        seconds: wall time.
    """

    pruned: Tensor
    weight: Tensor
    method: str
    objective_before: float
    objective: float
    iterations: int
    rows_changed: int
    swaps: int
    rejected_rows: int
    seconds: float

    def stats(self) -> dict:
        """Everything but the tensors, as plain Python values (the report's ``refine``)."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("pruned", "weight")}
        out["improvement"] = 1.0 - self.objective / self.objective_before if self.objective_before > 0 else 0.0
        return out


class _Layer:
    """The layer's problem in the compute dtype, its current mask and weights, and per-row objectives."""

    def __init__(self, target: Tensor, weight: Tensor, pruned: Tensor, hessian: Tensor, *, solver: str,
                 damp: float, tol: Optional[float], max_iter: Optional[int], double_precision: bool) -> None:
        self.problem: Problem = prepare(target, pruned, hessian, damp=damp, double_precision=double_precision)
        self.out_dtype = weight.dtype
        self.solve_fn = get_solver(solver)
        self.tol, self.max_iter = tol, max_iter
        p = self.problem
        self.target = p.weight  # the problem's "weight" is what the rows reconstruct: the target
        self.pruned = pruned.to(p.weight.device).clone()
        self.weight = self._round(weight.to(device=p.weight.device, dtype=p.dtype)).clone()
        self.hdiag = p.damped.diagonal().clone()
        # dead inputs (H_jj = 0, Hd_jj = 1 + λ by damp_hessian's convention): never un-pruned (keeping one
        # cannot lower the objective) and free to prune (a zero cost in the pair scores)
        self.dead = p.hessian.diagonal() <= 0
        self.cost_diag = self.hdiag.masked_fill(self.dead, 0.0)
        self.grad = self.gradient(self.weight, self.target)
        self.obj = self.objective(self.weight, self.target)

    def _round(self, w: Tensor) -> Tensor:
        """``w`` as the returned weights will be: rounded to the output dtype, back in the compute dtype."""
        return w.to(self.out_dtype).to(self.problem.dtype)

    def gradient(self, weight: Tensor, target: Tensor) -> Tensor:
        """``g = (ŵ - t) Hd`` (the pair scores' gradient, compute dtype) for rows ``weight`` of targets ``target``."""
        return (weight - target) @ self.problem.damped

    def objective(self, weight: Tensor, target: Tensor) -> Tensor:
        """float64 ``(r,)`` undamped ``(ŵ - t)ᵀ H (ŵ - t)``, straight from ``H`` (the acceptance's figure).

        Computed in float64 whatever the compute dtype, in column chunks of ``H`` (no ``d x d`` float64 copy),
        so a row's figure has a relative error near ``d · 1e-16`` at any activation scale.
        """
        h = self.problem.hessian
        delta = weight.double() - target.double()
        if h.dtype == torch.float64:
            return (delta @ h * delta).sum(dim=1)
        step = max(1, CHUNK_BYTES // (8 * h.shape[0]))
        out = torch.zeros(delta.shape[0], dtype=torch.float64, device=delta.device)
        for c in range(0, h.shape[1], step):
            out += (delta @ h[:, c:c + step].double() * delta[:, c:c + step]).sum(dim=1)
        return out

    def solve(self, rows: Tensor, pruned: Tensor) -> Tensor:
        """Exact weights (rounded to the output dtype) of rows ``rows`` (long) for their new mask ``pruned``."""
        sub = replace(self.problem, weight=self.target[rows], pruned=pruned)  # shares Hd's cached factors
        out = self.solve_fn(sub, tol=self.tol, max_iter=self.max_iter)
        return self._round(out.weight.masked_fill(pruned, 0.0)).masked_fill(pruned, 0.0)

    def try_rows(self, rows: Tensor, pruned: Tensor) -> Tensor:
        """Re-solve rows ``rows`` on masks ``pruned`` and keep those whose objective drops (see the module doc).

        A row is accepted when its float64 undamped objective, on the weights as returned, drops by more than
        ``ACCEPT_RTOL`` (relative), and its new mask un-prunes no dead input. Returns bool ``(len(rows),)``:
        which rows were accepted (their mask, weights, gradient and objective updated).
        """
        new = self.solve(rows, pruned)
        obj = self.objective(new, self.target[rows])
        revived = (self.pruned[rows] & ~pruned & self.dead).any(dim=1)
        finite = torch.isfinite(obj) & torch.isfinite(new).all(dim=1)
        old = self.obj[rows]
        ok = finite & ~revived & (obj < old - ACCEPT_RTOL * old.abs())
        if bool(ok.any()):
            idx = rows[ok]
            self.pruned[idx], self.weight[idx], self.obj[idx] = pruned[ok], new[ok], obj[ok]
            self.grad[idx] = self.gradient(new[ok], self.target[idx])
        return ok

    def total(self) -> float:
        """The layer's undamped objective: the sum of the rows' float64 figures (so refining never raises it)."""
        return float(self.obj.sum())


def refine_mask(
    method: str,
    target: Tensor,
    weight: Tensor,
    pruned: Tensor,
    hessian: Tensor,
    *,
    pattern: Pattern = Pattern(),
    iterations: int = 20,
    solver: str = "pcg",
    damp: float = 0.01,
    tol: Optional[float] = None,
    max_iter: Optional[int] = None,
    double_precision: bool = False,
) -> Refinement:
    """Refine the mask of one layer (``swap`` or ``admm``, see the module doc), never raising any row's objective.

    Args:
        method: ``swap`` or ``admm``.
        target: ``r x d`` the rows reconstruct (the dense weights, or another target).
        weight: ``r x d`` the fixed-mask optimum for ``pruned`` (any float dtype; the result has its dtype).
        pruned: bool ``r x d``, True = pruned.
        hessian: ``d x d`` undamped mean of ``x xᵀ``.
        pattern: unstructured (per-row counts kept) or N:M (``n`` pruned in each group of ``m``; ``pruned``
            must already be of that pattern).
        iterations: iteration cap; 0 returns the input unchanged.
        solver, damp, tol, max_iter, double_precision: the exact re-solves' settings (as :func:`reconstruct`'s;
            ``damp`` should be the one the input optimum was solved with).
    Returns:
        A :class:`Refinement`.
    """
    if method not in ("swap", "admm"):
        raise ValueError(f"--refine_mask must be one of {', '.join(METHODS)}, got {method!r}")
    if iterations < 0:
        raise ValueError(f"--refine_iters must be >= 0, got {iterations}")
    if target.shape != weight.shape or pruned.shape != weight.shape:
        raise ValueError(f"target {tuple(target.shape)}, weight {tuple(weight.shape)} and pruned "
                         f"{tuple(pruned.shape)} must have the same shape")
    if pattern.structured:
        pattern.check_columns(weight.shape[1])
        groups = pruned.reshape(pruned.shape[0], -1, pattern.m).sum(dim=2)
        if not bool((groups == pattern.n).all()):
            raise ValueError(f"the mask to refine is not {pattern}: refine keeps the pattern it is given")
    sync = torch.cuda.synchronize if weight.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    layer = _Layer(target, weight, pruned, hessian, solver=solver, damp=damp, tol=tol, max_iter=max_iter,
                   double_precision=double_precision)
    before = layer.total()
    original = layer.pruned.clone()
    if iterations == 0:
        its, rejected = 0, 0
    elif method == "swap":
        its, rejected = _swap(layer, pattern, iterations)
    else:
        its, rejected = _admm(layer, pattern, iterations)
    after = layer.total()
    changed = (layer.pruned != original)
    sync()
    result = Refinement(
        pruned=layer.pruned.to(pruned.device),
        weight=layer.weight.to(dtype=weight.dtype, device=weight.device),
        method=method, objective_before=before, objective=after,
        iterations=its, rows_changed=int(changed.any(dim=1).sum()), swaps=int(changed.sum()) // 2,
        rejected_rows=rejected, seconds=time.perf_counter() - t0,
    )
    log.info("refine %s: objective %.6g -> %.6g (%d rows changed, %d swaps, %d iterations)", method, before,
             result.objective, result.rows_changed, result.swaps, its)
    return result


# -- swap ------------------------------------------------------------------------------------------------


def _swap(layer: _Layer, pattern: Pattern, iterations: int) -> tuple[int, int]:
    """Certified greedy swaps (see the module doc); returns ``(iterations run, rejected row proposals)``."""
    r = layer.pruned.shape[0]
    dev = layer.pruned.device
    budget = torch.ones(r, dtype=torch.long, device=dev)  # swaps each row proposes next
    active = torch.ones(r, dtype=torch.bool, device=dev)
    rejected = 0
    it = 0
    for it in range(1, iterations + 1):
        rows = torch.nonzero(active).squeeze(1)
        if rows.numel() == 0:
            it -= 1
            break
        propose = _propose_nm if pattern.structured else _propose_unstructured
        new_mask, proposed = propose(layer, rows, budget[rows], pattern)
        active[rows[~proposed]] = False  # nothing left to try in those rows
        rows, new_mask = rows[proposed], new_mask[proposed]
        if rows.numel() == 0:
            break
        ok = layer.try_rows(rows, new_mask)
        rejected += int((~ok).sum())
        b = budget[rows]
        budget[rows] = torch.where(ok, (2 * b).clamp_max(MAX_SWAPS), (b // 2).clamp_min(1))
        active[rows[~ok & (b == 1)]] = False
        log.debug("refine swap iteration %d: %d of %d rows improved", it, int(ok.sum()), rows.numel())
        if not bool(active.any()):
            break
    return it, rejected


def _pair_scores(g_j: Tensor, w_i: Tensor, h_ij: Tensor, hd_jj: Tensor, hd_ii: Tensor) -> Tensor:
    """``s(i, j) = (g_j - ŵ_i Hd_ij)² / Hd_jj - ŵ_i² Hd_ii``, a certified lower bound on a swap's decrease.

    Shapes broadcast: ``g_j``/``hd_jj`` over un-prune candidates, ``w_i``/``hd_ii`` over prune candidates.
    """
    return (g_j - w_i * h_ij) ** 2 / hd_jj - w_i * w_i * hd_ii


def _propose_unstructured(layer: _Layer, rows: Tensor, budget: Tensor, pattern: Pattern) -> tuple[Tensor, Tensor]:
    """Each row's ``budget`` best disjoint swaps among its top candidates.

    Returns ``(new masks (len(rows) x d), bool (len(rows),): rows with a proposal)``.
    """
    pruned, w, g = layer.pruned[rows], layer.weight[rows], layer.grad[rows]
    hdiag, cdiag, hd = layer.hdiag, layer.cost_diag, layer.problem.damped
    n, d = pruned.shape
    k = min(CANDIDATES, d)
    inf = torch.tensor(float("inf"), dtype=w.dtype, device=w.device)
    gain = torch.where(pruned & ~layer.dead, g * g / hdiag, -inf)  # a dead input is never un-pruned
    cost = torch.where(pruned, inf, w * w * cdiag)
    gv, jj = torch.topk(gain, k, dim=1)
    cv, ii = torch.topk(cost, k, dim=1, largest=False)
    h_ij = hd[ii.unsqueeze(2), jj.unsqueeze(1)]  # n x k(i) x k(j)
    score = _pair_scores(torch.gather(g, 1, jj).unsqueeze(1), torch.gather(w, 1, ii).unsqueeze(2), h_ij,
                         hdiag[jj].unsqueeze(1), cdiag[ii].unsqueeze(2))
    valid = torch.isfinite(gv).unsqueeze(1) & torch.isfinite(cv).unsqueeze(2)
    score = torch.where(valid, score, -inf)
    new = pruned.clone()
    proposed = torch.zeros(n, dtype=torch.bool, device=w.device)
    ar = torch.arange(n, device=w.device)
    for step in range(min(MAX_SWAPS, k)):  # greedy disjoint pairs, all rows at once
        best, flat = score.reshape(n, -1).max(dim=1)
        take = torch.isfinite(best) & (budget > step)
        if not bool(take.any()):
            break
        a, c = flat // k, flat % k
        i, j = ii[ar, a], jj[ar, c]
        sel = ar[take]
        new[sel, i[take]] = True
        new[sel, j[take]] = False
        proposed |= take
        score[ar, a, :] = -inf
        score[ar, :, c] = -inf
    return new, proposed


def _propose_nm(layer: _Layer, rows: Tensor, budget: Tensor, pattern: Pattern) -> tuple[Tensor, Tensor]:
    """Each row's ``budget`` best groups, one swap inside each (N:M), the pair scored as in the unstructured case."""
    m = pattern.m
    d = layer.pruned.shape[1]
    groups = d // m
    hd = layer.problem.damped
    block = hd.reshape(groups, m, groups, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # G x m(i) x m(j)
    hdiag, cdiag = layer.hdiag.reshape(groups, m), layer.cost_diag.reshape(groups, m)
    dead = layer.dead.reshape(groups, m)
    per_row = max(1, groups * m * m * hd.element_size() * 3)
    chunk = max(1, CHUNK_BYTES // per_row)
    news, props = [], []
    inf = float("inf")
    for start in range(0, rows.numel(), chunk):  # row chunks bound the n x G x m x m scores
        rs = rows[start:start + chunk]
        b = budget[start:start + chunk]
        n = rs.numel()
        pruned = layer.pruned[rs].reshape(n, groups, m)
        w = layer.weight[rs].reshape(n, groups, m)
        g = layer.grad[rs].reshape(n, groups, m)
        score = _pair_scores(g.unsqueeze(2), w.unsqueeze(3), block, hdiag.unsqueeze(1), cdiag.unsqueeze(2))
        valid = (~pruned).unsqueeze(3) & (pruned & ~dead).unsqueeze(2)  # i kept, j pruned and live
        score = score.masked_fill(~valid, -inf)
        best, flat = score.reshape(n, groups, m * m).max(dim=2)  # n x G
        top = min(MAX_SWAPS, groups)
        gval, gidx = torch.topk(best, top, dim=1)
        take = torch.isfinite(gval) & (torch.arange(top, device=gval.device) < b.unsqueeze(1))
        pair = torch.gather(flat, 1, gidx)
        i = gidx * m + pair // m
        j = gidx * m + pair % m
        new = layer.pruned[rs].clone()
        rr = torch.arange(n, device=new.device).unsqueeze(1).expand_as(take)
        new[rr[take], i[take]] = True
        new[rr[take], j[take]] = False
        news.append(new)
        props.append(take.any(dim=1))
    return torch.cat(news), torch.cat(props)


# -- admm ------------------------------------------------------------------------------------------------


def _project(magnitudes: Tensor, counts: Tensor, pattern: Pattern) -> Tensor:
    """bool ``r x d`` mask of the pattern pruning the smallest ``magnitudes`` (``counts[i]`` per row, or N:M)."""
    if pattern.structured:
        return nm_mask(magnitudes, pattern)
    return count_mask(magnitudes, counts)


def _admm(layer: _Layer, pattern: Pattern, iterations: int) -> tuple[int, int]:
    """ALPS-style ADMM (see the module doc); returns ``(iterations run, rows the exact re-solve rejected)``."""
    scale = layer.hdiag.sqrt()  # in W·diag(Hd)^½ the magnitude projection weighs each input by its energy
    hd = layer.problem.damped / scale.unsqueeze(1) / scale.unsqueeze(0)  # unit diagonal
    t = layer.target * scale
    counts = layer.pruned.sum(dim=1)
    eye = torch.eye(hd.shape[0], dtype=hd.dtype, device=hd.device)
    rho = RHO_START
    z_mask = layer.pruned.clone()
    z = layer.weight * scale
    u = torch.zeros_like(z)
    ht = t @ hd
    # dead inputs rank below every live one: those pruned stay pruned (they fit: the counts include them), kept
    # ones are pruned first (free); among dead inputs the pruned rank lowest, so none is ever un-pruned
    floor = torch.where(layer.pruned, -2.0, -1.0).to(z.dtype)
    factor, factor_rho = None, None
    stable = 0
    it = 0
    for it in range(1, iterations + 1):
        if factor_rho != rho:
            factor, factor_rho = cholesky_checked(hd + 0.5 * rho * eye, "Hd + ρ/2 I"), rho
        rhs = ht + 0.5 * rho * (z - u)
        w = torch.cholesky_solve(rhs.T, factor).T
        v = w + u
        mask = _project(torch.where(layer.dead, floor, v.abs()), counts, pattern)
        z = v.masked_fill(mask, 0.0)
        u = v - z  # u + w - z
        moved = int((mask != z_mask).sum())
        z_mask = mask
        stable = stable + 1 if moved == 0 else 0
        log.debug("refine admm iteration %d: rho %.3g, support moved %d", it, rho, moved)
        if it % RHO_EVERY == 0:
            rho *= RHO_GROWTH
        if stable >= ADMM_STABLE:
            break
    rows = torch.nonzero((z_mask != layer.pruned).any(dim=1)).squeeze(1)
    if rows.numel() == 0:
        return it, 0
    ok = layer.try_rows(rows, z_mask[rows])
    rejected = int((~ok).sum())
    if not bool(ok.any()):
        log.info("refine admm: no row's exact objective dropped on the ADMM support; keeping the input mask")
    return it, rejected


def validate_config(config) -> None:
    """``--refine_mask``: a known method, a non-negative ``--refine_iters``, and the exact update it needs."""
    if config.refine_mask not in METHODS:
        raise ValueError(f"--refine_mask must be one of {', '.join(METHODS)}, got {config.refine_mask!r}")
    iters = config.refine_iters
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"--refine_iters must be an integer >= 0, got {iters!r}")
    if config.refine_mask != "none" and config.weight_update != "optima":
        raise ValueError(f"--refine_mask {config.refine_mask} re-solves the weights exactly for every mask it tries "
                         f"(it needs the Hessian): use --weight_update optima instead of "
                         f"--weight_update {config.weight_update}, or drop --refine_mask")
