"""Numerical failure modes of reconstruct() and the Hessian selectors: damping escalation,
exploding rows, non-convergence, figures after the dtype cast, out-of-memory back-off."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from conftest import activation_hessian, random_weight
from optima_plugin import reconstruct
from optima_plugin.selectors.base import Selection
from optima_plugin.selectors.sparsegpt import SparseGPTSelector, sparsegpt_prune
from optima_plugin.selectors.thanos import ThanosSelector, thanos_prune
from optima_plugin.solvers import SOLVERS, register_solver
from optima_plugin.solvers.base import SolverOutput
from optima_plugin.solvers.problem import DAMP_FLOOR, DAMP_GROWTH, DAMP_RETRIES
from optima_plugin.solvers.reconstruct import EXPLODE_FACTOR
from optima_plugin.sparsity import Pattern, row_mask
from optima_plugin.updaters import OptimaUpdate, UpdateOptions
from test_solvers import oracle, reference_damping

ALL_SOLVERS = ["pcg", "direct", "pdhg", "adam", "sparsegpt"]
ESCALATION_LOG = "optima_plugin.solvers.problem"


def row_growth(new: torch.Tensor, dense: torch.Tensor) -> float:
    """Largest ``‖ŵ_i‖ / ‖w_i‖`` over rows."""
    return float((new.double().norm(dim=1) / dense.double().norm(dim=1)).max())


def escalations(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == ESCALATION_LOG and "escalating damp" in r.getMessage()]


@pytest.fixture(scope="module")
def rank_deficient():
    """20 tokens for 64 inputs: ``H = x xᵀ`` has rank 20; half of each row pruned, so every
    kept principal submatrix (32 x 32) is singular too."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 64, generator=g, dtype=torch.float64)
    hessian = x.T @ x / 20
    weight = torch.randn(16, 64, generator=g) / 8
    pruned = row_mask(weight.abs() * hessian.diagonal().sqrt().float(), 0.5)
    return weight, pruned, hessian


def test_rank_deficient_hessian_is_singular_in_float32(rank_deficient):
    _, _, hessian = rank_deficient
    assert int(torch.linalg.cholesky_ex(reference_damping(hessian, 0.0).float()).info) != 0


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_undamped_rank_deficient_hessian_every_solver(rank_deficient, solver, caplog):
    weight, pruned, hessian = rank_deficient
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = reconstruct(weight, pruned, hessian.float(), solver=solver, damp=0.0,
                          max_iter=2000 if solver == "pdhg" else None)
    runtime = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert bool(torch.isfinite(res.weight).all())
    assert bool((res.weight[pruned] == 0).all())
    assert row_growth(res.weight, weight) <= EXPLODE_FACTOR
    assert res.error_ratio <= 1.0
    if solver in ("pcg", "direct", "sparsegpt"):  # these factor Hd: Cholesky fails at damp 0
        assert res.damp >= DAMP_FLOOR and res.fallback in ("damp", "mask_only")
        assert escalations(caplog)[0].endswith(f"escalating damp 0 -> {DAMP_FLOOR:g} (retry 1 of {DAMP_RETRIES})")
    else:  # pdhg and adam never factor Hd: nothing to escalate
        assert res.damp == 0.0 and not escalations(caplog)
    if res.damp != 0.0:
        assert escalations(caplog)
    if res.fallback == "mask_only" or not res.converged:
        assert runtime, "a fallback or non-convergence must be warned about"
    assert res.stats()["damp"] == res.damp


def test_exploding_rows_are_resolved_with_more_damping():
    """Two kept inputs nearly equal (``x_1 = x_0 + 1e-4 x_2``) and ``x_2`` pruned: the exact
    undamped optimum writes ``x_2`` as ``(x_1 - x_0) / 1e-4``, rows 6000x the dense norm."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g, dtype=torch.float64)
    x[:, 1] = x[:, 0] + 1e-4 * x[:, 2]
    hessian = x.T @ x / 256
    weight = torch.randn(8, 16, generator=g, dtype=torch.float64) / 4
    pruned = torch.zeros(8, 16, dtype=torch.bool)
    pruned[:, 2] = True
    pruned[:, 3::2] = True
    with pytest.warns(RuntimeWarning, match="over 100x their dense norm with damp=0; re-solving"):
        res = reconstruct(weight, pruned, hessian, solver="direct", damp=0.0, double_precision=True)
    assert res.damp == DAMP_FLOOR and res.fallback == "damp" and res.converged
    assert row_growth(res.weight, weight) <= EXPLODE_FACTOR
    assert torch.allclose(res.weight, oracle(weight, pruned, hessian, damp=DAMP_FLOOR), rtol=0, atol=1e-8)


def test_rows_still_exploding_keep_mask_only_weights(caplog):
    """A solver whose row 0 explodes at any damping: after every escalation that row gets
    the mask-only weights, the others keep their solution, and the layer is not converged."""
    weight, hessian = random_weight(12, 32, seed=5), activation_hessian(32, seed=5)
    pruned = row_mask(weight.abs(), 0.5)

    @register_solver("explodes_for_test")
    def explodes(problem, *, tol=None, max_iter=None):
        out = SOLVERS["direct"](problem, tol=tol, max_iter=max_iter)
        new = out.weight.clone()
        new[0] *= 1e4
        return SolverOutput(new, 1, True)

    caplog.set_level(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = reconstruct(weight, pruned, hessian, solver="explodes_for_test")
    finally:
        SOLVERS.pop("explodes_for_test")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert sum("re-solving with more damping" in m for m in messages) == DAMP_RETRIES
    assert sum("keeping the mask-only weights for those rows" in m for m in messages) == 1
    assert len(escalations(caplog)) == DAMP_RETRIES
    assert res.damp == pytest.approx(0.01 * DAMP_GROWTH**DAMP_RETRIES)
    assert res.fallback == "mask_only" and res.mask_only_rows == 1 and not res.converged
    assert torch.equal(res.weight[0], weight[0].masked_fill(pruned[0], 0.0))
    direct = reconstruct(weight, pruned, hessian, solver="direct", damp=res.damp)
    assert torch.allclose(res.weight[1:], direct.weight[1:], atol=1e-6)


def test_pcg_capped_iterations_warn():
    weight, hessian = random_weight(24, 64, seed=2), activation_hessian(64, seed=2)
    pruned = row_mask(weight.abs(), 0.6)
    with pytest.warns(RuntimeWarning, match=r"'pcg' did not converge in 2 iterations.*--max_iter.*--tol"):
        res = reconstruct(weight, pruned, hessian, solver="pcg", max_iter=2, tol=1e-14)
    assert not res.converged and res.iterations == 2
    assert res.error_ratio < 1.0


def test_figures_are_those_of_the_rounded_weights():
    """Pruned weights 1000x smaller than the kept ones, each with a near-twin kept input: the
    float32 optimum compensates almost perfectly, but the compensation is below bfloat16's
    resolution of the kept weights, so after rounding little of it is left."""
    g = torch.Generator().manual_seed(0)
    r, d = 16, 64
    x = torch.randn(2048, d, generator=g, dtype=torch.float64)
    x[:, 1::2] = x[:, 0::2] + 0.01 * x[:, 1::2]
    hessian = x.T @ x / 2048
    weight = torch.randn(r, d, generator=g)
    weight[:, 1::2] *= 1e-3
    weight = weight.to(torch.bfloat16)
    pruned = torch.zeros(r, d, dtype=torch.bool)
    pruned[:, 1::2] = True
    exact = reconstruct(weight.float(), pruned, hessian, solver="direct")
    res = reconstruct(weight, pruned, hessian, solver="direct")
    assert res.weight.dtype == torch.bfloat16 and bool((res.weight[pruned] == 0).all())
    w, new = weight.double(), res.weight.double()
    h = hessian.double()
    true_ratio = float((((new - w) @ h) * (new - w)).sum()) / float((((w * ~pruned - w) @ h) * (w * ~pruned - w)).sum())
    assert exact.error_ratio < 0.1 < true_ratio <= 1.0  # the rounding matters here
    assert res.error_ratio == pytest.approx(true_ratio, rel=1e-3)


def test_out_of_memory_halves_the_row_chunk(caplog):
    weight, hessian = random_weight(40, 48, seed=4), activation_hessian(48, seed=4)
    pruned = row_mask(weight.abs(), 0.5)
    k, calls = 7, []

    @register_solver("small_memory_for_test")
    def small(problem, *, tol=None, max_iter=None):
        calls.append(problem.weight.shape[0])
        if problem.weight.shape[0] > k:
            raise torch.OutOfMemoryError("test: too many rows")
        return SOLVERS["direct"](problem, tol=tol, max_iter=max_iter)

    caplog.set_level(logging.WARNING)
    try:
        res = reconstruct(weight, pruned, hessian, solver="small_memory_for_test")
    finally:
        SOLVERS.pop("small_memory_for_test")
    exact = reconstruct(weight, pruned, hessian, solver="direct")
    assert calls == [40, 20, 10] + [5] * 8 and res.row_chunk == 5 <= k
    assert exact.row_chunk == 40
    assert torch.allclose(res.weight, exact.weight, rtol=0, atol=1e-6)
    assert torch.allclose(res.weight.double(), oracle(weight, pruned, hessian), rtol=0, atol=1e-4)
    assert sum("out of memory" in r.getMessage() for r in caplog.records) == 3


def test_out_of_memory_on_one_row_is_explained():
    weight, hessian = random_weight(4, 16, seed=4), activation_hessian(16, seed=4)

    @register_solver("no_memory_for_test")
    def none(problem, *, tol=None, max_iter=None):
        raise torch.OutOfMemoryError("test")

    try:
        with pytest.raises(torch.OutOfMemoryError, match="even one row"):
            reconstruct(weight, row_mask(weight.abs(), 0.5), hessian, solver="no_memory_for_test")
    finally:
        SOLVERS.pop("no_memory_for_test")


def indefinite_hessian(d: int) -> torch.Tensor:
    """Unit diagonal, ``H_01 = H_10 = 1000``: eigenvalue -999, beyond any escalation."""
    h = torch.eye(d)
    h[0, 1] = h[1, 0] = 1000.0
    return h


@pytest.mark.parametrize("solver", ["pcg", "direct", "sparsegpt"])
def test_exhausted_escalation_raises_with_advice(solver, caplog):
    weight = random_weight(4, 8)
    pruned = torch.zeros(4, 8, dtype=torch.bool)
    pruned[:, 4:] = True  # inputs 0 and 1 kept: every kept submatrix is indefinite too
    caplog.set_level(logging.WARNING)
    with pytest.raises(torch.linalg.LinAlgError, match=r"after 4 escalations from damp=0.01.*--damp"):
        reconstruct(weight, pruned, indefinite_hessian(8), solver=solver)
    assert len(escalations(caplog)) == DAMP_RETRIES


@pytest.mark.parametrize("prune", [sparsegpt_prune, thanos_prune])
def test_selectors_escalate_on_singular_hessian(rank_deficient, prune, caplog):
    weight, _, hessian = rank_deficient
    caplog.set_level(logging.WARNING)
    sel = prune(weight, hessian.float(), 0.5, Pattern(), damp=0.0)
    assert escalations(caplog) and bool(torch.isfinite(sel.weight).all())
    assert bool((sel.weight[sel.pruned] == 0).all()) and int(sel.pruned.sum()) == weight.numel() // 2
    with pytest.raises(torch.linalg.LinAlgError, match="escalations"):
        prune(weight[:, :8], indefinite_hessian(8), 0.5, Pattern())


@pytest.mark.parametrize("selector", [SparseGPTSelector(), ThanosSelector()])
def test_selectors_escalate_from_default_damp(rank_deficient, selector, caplog):
    """A singular H pushed slightly indefinite (as a lossy accumulation may): the default
    DAMP=0.01 is not enough and the selectors escalate to 0.1 instead of raising."""
    weight, _, hessian = rank_deficient
    h = (hessian - 0.05 * hessian.diagonal().mean() * torch.eye(64)).float()
    caplog.set_level(logging.WARNING)
    sel = selector.select(weight, h, 0.5, Pattern())
    assert any(m.endswith("escalating damp 0.01 -> 0.1 (retry 1 of 4)") for m in escalations(caplog))
    assert bool(torch.isfinite(sel.weight).all()) and bool((sel.weight[sel.pruned] == 0).all())
    assert bool(torch.isfinite(selector.score(weight, h)).all())


def test_updater_stats_report_damp_and_chunk(rank_deficient):
    weight, pruned, hessian = rank_deficient
    upd = OptimaUpdate().update(weight, Selection(pruned), hessian.float(), UpdateOptions(solver="pcg", damp=0.0))
    assert upd.stats["damp"] >= DAMP_FLOOR and upd.stats["fallback"] == "damp"
    assert upd.stats["row_chunk"] == weight.shape[0] and upd.stats["mask_only_rows"] == 0
