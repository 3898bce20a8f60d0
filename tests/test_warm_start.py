"""The optima update warm-started from the selector's own solution (issue 27 item 3): the same optimum within
the certificate's bound, fewer iterations when the start is good, the selector's ``Hd⁻¹`` reused exactly."""

from __future__ import annotations

import pytest
import torch

from conftest import activation_hessian, random_weight
from optima_plugin import reconstruct
from optima_plugin.selectors.sparsegpt import sparsegpt_prune
from optima_plugin.selectors.thanos import thanos_prune
from optima_plugin.solvers import problem as problem_module
from optima_plugin.solvers.pcg import DEFAULT_TOL
from optima_plugin.solvers.problem import Warm, prepare
from optima_plugin.sparsity import parse_pattern
from optima_plugin.updaters import OptimaUpdate, UpdateOptions, warm_start

CASES = [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", 0.5)]
DAMP = 0.01


def damped64(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """float64 ``H + λI`` from its definition: dead inputs (``H_jj = 0``) zeroed with ``H_jj = 1``, then
    ``λ = damp · mean(live diag H)`` on the whole diagonal (independent of the package)."""
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    lam = damp * h.diagonal()[~dead].mean()
    return h + torch.diag(dead.double()) + lam * torch.eye(h.shape[0], dtype=torch.float64)


def optimum64(weight: torch.Tensor, pruned: torch.Tensor, hd: torch.Tensor) -> torch.Tensor:
    """Each row's exact minimiser of ``(ŵ - w)ᵀ Hd (ŵ - w)`` with ``ŵ_P = 0``: ``Hd_SS ŵ_S = (Hd w)_S``."""
    w = weight.double()
    out = torch.zeros_like(w)
    for i in range(w.shape[0]):
        s = ~pruned[i]
        if s.any():
            out[i, s] = torch.linalg.solve(hd[s][:, s], (hd @ w[i])[s])
    return out


def row_objective(hd: torch.Tensor, weight: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    delta = new.double() - weight.double()
    return ((delta @ hd) * delta).sum(dim=1)


@pytest.fixture(scope="module")
def layer():
    h = activation_hessian(96, seed=3).float()
    return random_weight(48, 96, seed=4), h


@pytest.mark.parametrize("prune", [sparsegpt_prune, thanos_prune], ids=["sparsegpt", "thanos"])
@pytest.mark.parametrize("pattern,ratio", CASES)
def test_warm_start_reaches_the_cold_optimum_within_the_certificate(layer, prune, pattern, ratio):
    """PCG stops when ``ρᵀ Hd ρ <= tol · D``; its weights' damped objective is ``f = D + ρᵀ Hd ρ`` and
    ``D <= f*``, so ``f - f* <= tol · f*`` per row, cold or warm. ``f - f* = ‖ŵ - ŵ*‖²_Hd`` (ŵ* is the
    Hd-projection of ``w`` on the row's kept subspace), so warm and cold differ by at most
    ``2 sqrt(tol · f*)`` in the Hd-norm. Solved in float64 (rounding ~1e-16, far below tol = 1e-5); the
    margin ``1e-9 · f*`` covers float64 rounding of the sums."""
    w, h = layer
    sel = prune(w, h, ratio, parse_pattern(pattern))
    w64, h64 = w.double(), h.double()
    warm = Warm(weight=sel.weight.double())
    cold_res = reconstruct(w64, sel.pruned, h64, damp=DAMP, double_precision=True)
    warm_res = reconstruct(w64, sel.pruned, h64, damp=DAMP, double_precision=True, warm=warm)
    hd = damped64(h, DAMP)
    best = optimum64(w, sel.pruned, hd)
    f_star = row_objective(hd, w, best)
    for res in (cold_res, warm_res):
        gap = row_objective(hd, w, res.weight) - f_star
        assert bool((gap <= DEFAULT_TOL * f_star + 1e-9 * f_star).all()), float((gap / f_star).max())
        assert bool((gap >= -1e-9 * f_star).all())  # never below the optimum
    diff = warm_res.weight.double() - cold_res.weight.double()
    dist = ((diff @ hd) * diff).sum(dim=1).sqrt()
    assert bool((dist <= 2 * (DEFAULT_TOL * f_star).sqrt() + 1e-6 * f_star.sqrt()).all())
    assert warm_res.iterations <= cold_res.iterations + 1  # a start the rows reject is dropped (z = 0 again)


@pytest.mark.parametrize("pattern,ratio", CASES)
def test_warm_start_at_the_optimum_takes_no_iteration(layer, pattern, ratio):
    """Warm weights = the float64 optimum: the multiplier they imply is the optimal one, every row meets
    the certificate before the first step (0 iterations), and the answer is the optimum itself. A cold solve
    of the same problem needs several iterations."""
    w, h = layer
    sel = sparsegpt_prune(w, h, ratio, parse_pattern(pattern))
    hd = damped64(h, DAMP)
    best = optimum64(w, sel.pruned, hd)
    w64, h64 = w.double(), h.double()
    cold = reconstruct(w64, sel.pruned, h64, damp=DAMP, double_precision=True)
    warm = reconstruct(w64, sel.pruned, h64, damp=DAMP, double_precision=True, warm=Warm(weight=best))
    assert cold.iterations >= 3
    assert warm.iterations == 0 and warm.converged
    # 0 iterations: ŵ = w - z G with z = ((w - ŵ*) Hd)_P, i.e. ŵ* up to float64 rounding of two products
    assert torch.allclose(warm.weight, best, rtol=0, atol=1e-9 * float(w.abs().max()))


@pytest.mark.parametrize("scale", [10.0, -3.0])
def test_a_poor_start_still_reaches_the_optimum(layer, scale):
    """Start weights far from the optimum (the mask-only weights times 10, or times -3): the start is
    rescaled (never below ``z = 0``'s dual value) and the solve still ends within the certificate's bound of
    the float64 optimum (the bound of the test above)."""
    w, h = layer
    sel = sparsegpt_prune(w, h, 0.5, parse_pattern("unstructured"))
    w64 = w.double()
    start = Warm(weight=scale * w64.masked_fill(sel.pruned, 0))
    res = reconstruct(w64, sel.pruned, h.double(), damp=DAMP, double_precision=True, warm=start)
    hd = damped64(h, DAMP)
    f_star = row_objective(hd, w, optimum64(w, sel.pruned, hd))
    gap = row_objective(hd, w, res.weight) - f_star
    assert res.converged and bool((gap <= DEFAULT_TOL * f_star + 1e-9 * f_star).all())


def test_warm_start_of_real_selectors_saves_iterations():
    """On a wider synthetic layer the selector's update is a better start than the mask alone: summed over
    SparseGPT and Thanos, 50%/70%/2:4, warm-started solves take fewer iterations than cold ones."""
    h = activation_hessian(256, seed=1).float()
    w = random_weight(192, 256, seed=2)
    cold = warm = 0
    for prune in (sparsegpt_prune, thanos_prune):
        for pattern, ratio in CASES:
            sel = prune(w, h, ratio, parse_pattern(pattern))
            cold += reconstruct(w, sel.pruned, h, damp=DAMP).iterations
            warm += reconstruct(w, sel.pruned, h, damp=DAMP, warm=warm_start(sel)).iterations
    assert warm < cold, (warm, cold)


@pytest.mark.parametrize("prune", [sparsegpt_prune, thanos_prune], ids=["sparsegpt", "thanos"])
def test_the_selectors_inverse_is_the_solvers(layer, prune):
    """The ``Hd⁻¹`` a selector hands over is bit for bit the one the solver would compute (same damped H,
    same factorisation): a solve given only that inverse returns exactly the cold solve's weights."""
    w, h = layer
    sel = prune(w, h, 0.5, parse_pattern("unstructured"))
    assert sel.factor is not None and sel.factor.hessian is h and sel.factor.damp == DAMP
    cold = reconstruct(w, sel.pruned, h, damp=DAMP)
    reused = reconstruct(w, sel.pruned, h, damp=DAMP, warm=Warm(inverse=sel.factor.inverse, hessian=h, damp=DAMP))
    assert torch.equal(reused.weight, cold.weight) and reused.iterations == cold.iterations


def test_inverse_reused_only_for_its_hessian_damp_and_dtype(layer):
    w, h = layer
    sel = sparsegpt_prune(w, h, 0.5, parse_pattern("unstructured"))
    warm = warm_start(sel)
    assert prepare(w, sel.pruned, h, damp=DAMP, double_precision=False, warm=warm).inverse() is sel.factor.inverse
    for other in (dict(hessian=h.clone()), dict(damp=0.1), dict(double_precision=True)):
        kw = dict(hessian=h, damp=DAMP, double_precision=False) | other
        problem = prepare(w, sel.pruned, kw["hessian"], damp=kw["damp"], double_precision=kw["double_precision"],
                          warm=warm)
        assert problem.inverse() is not sel.factor.inverse, other


@pytest.mark.parametrize("prune", [sparsegpt_prune, thanos_prune], ids=["sparsegpt", "thanos"])
def test_optima_update_factorises_nothing_after_a_sparsegpt_or_thanos_selection(layer, prune, monkeypatch):
    """The optima update after SparseGPT/Thanos computes no second ``Hd⁻¹`` (the selector's is reused)."""
    w, h = layer
    sel = prune(w, h, 0.5, parse_pattern("2:4"))
    calls = []
    real = problem_module.inverse_spd
    monkeypatch.setattr(problem_module, "inverse_spd", lambda m: calls.append(1) or real(m))
    upd = OptimaUpdate().update(w, sel, h, UpdateOptions(damp=DAMP))
    assert calls == [] and upd.stats["converged"]
