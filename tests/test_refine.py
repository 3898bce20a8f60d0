"""--refine_mask: swap and admm keep the pattern, never raise a row's objective, and fix bad masks."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from conftest import activation_hessian, random_weight

from optima_plugin import cli, prune
from optima_plugin.config import PruneConfig
from optima_plugin.validate import resolve
from optima_plugin.refine import refine_mask
from optima_plugin.solvers import reconstruct
from optima_plugin.sparsity import Pattern, count_mask, nm_mask
from optima_plugin.testing import tiny_model, tiny_tokenizer

D, R, DAMP = 64, 24, 0.01
FAST = dict(nsamples=4, seqlen=64, calibration_dataset="pydoc")


def oracle(target: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Float64 KKT solve, row by row, own damping: ``Hd_SS δ_S = Hd_SP t_P``, ``ŵ = t + δ``, ``ŵ_P = 0``."""
    h = hessian.double()
    h = 0.5 * (h + h.T)
    diag = torch.diagonal(h).clone()
    dead = diag <= 0
    hd = h.clone()
    hd[dead, :] = 0
    hd[:, dead] = 0
    hd[dead, dead] = 1
    hd = hd + damp * diag[~dead].mean() * torch.eye(h.shape[0], dtype=torch.float64)
    t = target.double()
    out = torch.zeros_like(t)
    for i in range(t.shape[0]):
        keep = ~pruned[i]
        s, p = torch.nonzero(keep).squeeze(1), torch.nonzero(~keep).squeeze(1)
        if s.numel() == 0:
            continue
        rhs = hd[s][:, p] @ t[i, p]
        chol = torch.linalg.cholesky(hd[s][:, s])
        out[i, s] = t[i, s] + torch.cholesky_solve(rhs.unsqueeze(1), chol).squeeze(1)
    return out


def row_objective(target: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    delta = weight.double() - target.double()
    return ((delta @ hessian.double()) * delta).sum(dim=1)


def problem(kind: str, mask_by: str, seed: int = 0):
    """``(target, hessian, pruned, pattern)``: correlated activations with outlier inputs; a magnitude mask (bad:
    it ignores the inputs' scales and correlations) or a Wanda mask (good); ``rows``: per-row ratios (TRIM-like)."""
    h = activation_hessian(D, seed=seed).float()
    w = random_weight(R, D, seed=seed)
    score = w.abs() if mask_by == "magnitude" else w.abs() * h.diagonal().sqrt()
    if kind == "2:4":
        return w, h, nm_mask(score, Pattern(2, 4)), Pattern(2, 4)
    if kind == "rows":
        order = torch.randperm(R, generator=torch.Generator().manual_seed(1))
        counts = torch.linspace(0.2, 0.8, R).mul(D).long()[order]
    else:
        counts = torch.full((R,), D // 2)
    return w, h, count_mask(score, counts), Pattern()


def check_pattern(before: torch.Tensor, after: torch.Tensor, pattern: Pattern) -> None:
    assert after.dtype == torch.bool and after.shape == before.shape
    assert torch.equal(after.sum(dim=1), before.sum(dim=1))
    if pattern.structured:
        groups = after.reshape(after.shape[0], -1, pattern.m).sum(dim=2)
        assert bool((groups == pattern.n).all())


@pytest.mark.parametrize("method", ["swap", "admm"])
@pytest.mark.parametrize("kind", ["unstructured", "2:4", "rows"])
@pytest.mark.parametrize("mask_by", ["magnitude", "wanda"])
def test_pattern_kept_and_no_row_rises(method, kind, mask_by):
    """With the exact ``direct`` solver (pcg stops within 1e-5 of the damped optimum, which moves the undamped
    objective by more than the tolerance here) the start is the oracle's optimum up to float32 rounding."""
    target, h, pruned, pattern = problem(kind, mask_by)
    start = reconstruct(target, pruned, h, damp=DAMP, solver="direct").weight
    ref = refine_mask(method, target, start, pruned, h, pattern=pattern, iterations=15, damp=DAMP, solver="direct")
    check_pattern(pruned, ref.pruned, pattern)
    assert bool((ref.weight[ref.pruned] == 0).all())
    # every row at most its fixed-mask optimum (independent float64 KKT solve)
    best = row_objective(target, oracle(target, pruned, h, DAMP), h)
    after = row_objective(target, ref.weight, h)
    assert bool((after <= best * (1 + 1e-4) + 1e-7).all()), (after - best).max()
    # and the weights returned are the optimum of the mask returned
    exact = row_objective(target, oracle(target, ref.pruned, h, DAMP), h)
    assert torch.allclose(after, exact, rtol=1e-3, atol=1e-6)
    assert ref.objective <= ref.objective_before
    assert ref.objective == pytest.approx(float(after.sum()), rel=1e-4)
    assert ref.rows_changed == int((ref.pruned != pruned).any(dim=1).sum())


@pytest.mark.parametrize("method", ["swap", "admm"])
@pytest.mark.parametrize("kind", ["unstructured", "2:4", "rows"])
def test_bad_mask_is_strictly_improved(method, kind):
    target, h, pruned, pattern = problem(kind, "magnitude")
    start = reconstruct(target, pruned, h, damp=DAMP)
    ref = refine_mask(method, target, start.weight, pruned, h, pattern=pattern, iterations=20, damp=DAMP)
    assert ref.objective_before == pytest.approx(start.objective, rel=1e-5)
    assert ref.objective < 0.8 * ref.objective_before
    assert ref.rows_changed > 0 and ref.swaps > 0


def test_admm_certifies_rows_it_would_worsen():
    """On a good mask the ADMM support is often worse: those rows are rejected and keep their mask."""
    target, h, pruned, pattern = problem("unstructured", "wanda")
    start = reconstruct(target, pruned, h, damp=DAMP).weight
    ref = refine_mask("admm", target, start, pruned, h, pattern=pattern, iterations=15, damp=DAMP)
    assert ref.rejected_rows > 0
    kept = ~(ref.pruned != pruned).any(dim=1)
    assert torch.equal(ref.weight[kept], start[kept])


@pytest.mark.parametrize("method", ["swap", "admm"])
def test_zero_iterations_returns_the_input(method):
    target, h, pruned, pattern = problem("unstructured", "magnitude")
    start = reconstruct(target, pruned, h, damp=DAMP).weight
    saved = (start.clone(), pruned.clone())
    ref = refine_mask(method, target, start, pruned, h, pattern=pattern, iterations=0, damp=DAMP)
    assert torch.equal(ref.pruned, pruned) and torch.equal(ref.weight, start)
    assert ref.objective == ref.objective_before and ref.rows_changed == 0 and ref.swaps == 0
    ref = refine_mask(method, target, start, pruned, h, pattern=pattern, iterations=5, damp=DAMP)
    assert torch.equal(start, saved[0]) and torch.equal(pruned, saved[1])  # inputs not modified


def test_target_is_not_the_weights():
    """The rows reconstruct ``target``: another target gives the optimum for that target."""
    target, h, pruned, pattern = problem("unstructured", "magnitude")
    other = target + 0.3 * random_weight(R, D, seed=5)
    start = reconstruct(other, pruned, h, damp=DAMP).weight
    ref = refine_mask("swap", other, start, pruned, h, pattern=pattern, iterations=10, damp=DAMP)
    after = row_objective(other, ref.weight, h)
    assert bool((after <= row_objective(other, oracle(other, pruned, h, DAMP), h) * (1 + 1e-4) + 1e-7).all())
    assert ref.objective < ref.objective_before


def test_bad_arguments():
    target, h, pruned, pattern = problem("unstructured", "magnitude")
    with pytest.raises(ValueError, match="--refine_mask must be one of"):
        refine_mask("nope", target, target, pruned, h)
    with pytest.raises(ValueError, match="not 2:4"):
        refine_mask("swap", target, target, pruned, h, pattern=Pattern(2, 4))


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(refine_mask="nope"), "--refine_mask must be one of none, swap, admm"),
        (dict(refine_mask="swap", refine_iters=-1), "--refine_iters must be an integer >= 0"),
        (dict(refine_mask="swap", weight_update="none"), "use --weight_update optima"),
        (dict(refine_mask="admm", weight_update="native"), "use --weight_update optima"),
    ],
)
def test_validation(options, match):
    with pytest.raises(ValueError, match=match):
        resolve(PruneConfig(**options))


def test_cli_flags():
    args = cli.build_parser().parse_args(["--refine_mask", "admm", "--refine_iters", "7"])
    assert (args.refine_mask, args.refine_iters) == ("admm", 7)
    assert cli.build_parser().parse_args([]).refine_mask == "none"


@pytest.mark.parametrize("method", ["swap", "admm"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_prune_model_reports_before_and_after(method, pattern):
    tok = tiny_tokenizer()
    base = tiny_model("llama")
    plain = prune(copy.deepcopy(base), tok, prune_method="magnitude", sparsity_type=pattern, progress=False, **FAST)
    model = copy.deepcopy(base)
    report = prune(model, tok, prune_method="magnitude", sparsity_type=pattern, refine_mask=method,
                   refine_iters=5, progress=False, **FAST)
    assert report["options"]["refine_mask"] == method
    before = {x["name"]: x for x in plain["layers"]}
    for layer in report["layers"]:
        ref = layer["refine"]
        assert ref["method"] == method and ref["objective"] <= ref["objective_before"]
        assert layer["solved_objective"] == pytest.approx(ref["objective"])  # both on the H the solver solved
        assert layer["sparsity"] == pytest.approx(before[layer["name"]]["sparsity"])
        if layer["block"] == 0:  # same inputs with and without refinement
            assert ref["objective_before"] == pytest.approx(before[layer["name"]]["solved_objective"], rel=1e-5)
    assert sum(x["refine"]["rows_changed"] for x in report["layers"]) > 0
    if pattern == "2:4":
        for name, lin in model.named_modules():
            if name.endswith("proj"):
                groups = (lin.weight == 0).reshape(lin.weight.shape[0], -1, 4).sum(-1)
                assert bool((groups >= 2).all())
    assert all(x["refine"] is None for x in plain["layers"])
    out = io.StringIO()
    cli.print_summary(report, out)
    assert f"mask refinement ({method}): objective" in out.getvalue()


@pytest.mark.slow  # about 30 s: two refined prunes on two Gloo ranks and in this process
def test_two_ranks_refine_like_one_process(tmp_path):
    """Every rank refines the same gathered weights and rank 0's result is broadcast: the same masks as one
    process (float64 Hessians, so the certified decisions see the same numbers)."""
    from test_distributed import COMMON, RUN_CASES, torchrun

    cases = {f"refine_{m}": dict(COMMON, prune_method="magnitude", weight_update="optima", refine_mask=m,
                                 refine_iters=3) for m in ("swap", "admm")}
    script = tmp_path / "run_cases.py"
    script.write_text(RUN_CASES)
    proc = torchrun(script, [json.dumps(cases), str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name, options in cases.items():
        model = tiny_model("llama")
        single = prune(model, tiny_tokenizer(), progress=False, **options)
        ranked = torch.load(tmp_path / f"{name}.pt", weights_only=False)
        assert ranked["report"]["distributed"]["world_size"] == 2
        assert sum(x["refine"]["rows_changed"] for x in single["layers"]) > 0
        for key, dense in model.state_dict().items():
            other = ranked["state"][key]
            assert torch.equal(dense == 0, other == 0), f"{name}: the masks of {key} differ"
            scale = dense.abs().max().clamp_min(1e-12)
            assert float((dense - other).abs().max() / scale) <= 1e-5, f"{name}: {key} differs"


def test_pair_score_is_a_lower_bound_on_the_exact_decrease():
    """``s(i, j)`` (the swap's ranking) never exceeds the exact damped decrease of swapping ``i`` out, ``j`` in."""
    from optima_plugin.refine import _pair_scores

    target, h, pruned, _ = problem("unstructured", "wanda")
    hd = 0.5 * (h.double() + h.double().T)
    hd = hd + DAMP * hd.diagonal()[hd.diagonal() > 0].mean() * torch.eye(D, dtype=torch.float64)
    hd[hd.diagonal() <= 0, hd.diagonal() <= 0] = 1.0 + DAMP * h.diagonal()[h.diagonal() > 0].double().mean()

    def damped(weight, t):
        delta = weight - t.double()
        return ((delta @ hd) * delta).sum(dim=1)

    opt = oracle(target, pruned, h, DAMP)
    grad = (opt - target.double()) @ hd
    gen = torch.Generator().manual_seed(3)
    checked = 0
    for row in range(4):
        kept, gone = torch.nonzero(~pruned[row]).squeeze(1), torch.nonzero(pruned[row]).squeeze(1)
        for _ in range(5):
            i = kept[torch.randint(len(kept), (1,), generator=gen)].item()
            j = gone[torch.randint(len(gone), (1,), generator=gen)].item()
            swapped = pruned[row:row + 1].clone()
            swapped[0, i], swapped[0, j] = True, False
            new = oracle(target[row:row + 1], swapped, h, DAMP)
            exact = float(damped(opt[row:row + 1], target[row:row + 1]) - damped(new, target[row:row + 1]))
            bound = float(_pair_scores(grad[row, j], opt[row, i], hd[i, j], hd[j, j], hd[i, i]))
            assert bound <= exact + 1e-9 * max(1.0, abs(exact)), (row, i, j, bound, exact)
            # the bound is the decrease of the uncompensated move: drop i, then the best step on j alone
            moved = opt[row:row + 1].clone()
            moved[0, i] = 0.0
            g_j = float(((moved - target[row:row + 1].double()) @ hd)[0, j])
            moved[0, j] -= g_j / float(hd[j, j])
            direct = float(damped(opt[row:row + 1], target[row:row + 1]) - damped(moved, target[row:row + 1]))
            assert bound == pytest.approx(direct, rel=1e-6, abs=1e-12)
            checked += 1
    assert checked == 20


def test_refines_towards_the_dense_objective_target():
    """With --objective dense the mask is refined for the target rows T, and the layer keeps the dense objective's
    figures: the refined objective towards T drops, the reported dense objective never exceeds the mask only's."""
    tok = tiny_tokenizer()
    base = tiny_model("llama")
    report = prune(copy.deepcopy(base), tok, prune_method="magnitude", objective="dense", refine_mask="swap",
                   refine_iters=5, progress=False, **FAST)
    for layer in report["layers"]:
        assert layer["update"]["objective_kind"] == "dense"
        assert layer["refine"]["objective"] <= layer["refine"]["objective_before"]
        assert layer["objective"] <= layer["mask_objective"] * (1 + 1e-6)
    assert sum(x["refine"]["rows_changed"] for x in report["layers"]) > 0


# -- dead inputs and small activations (issue 24 item 3) -----------------------------------------------------

DEAD = 8  # of D inputs always zero: H_jj = 0, the damped problem's Hd_jj = 1 + λ
#: u = 2⁻⁵³; a float64 quadratic form δᵀHδ summed over ``n`` products has an error of at most
#: γ_n |δ|ᵀ|H||δ|, γ_n = n u / (1 - n u), whatever the order (n = 2D + 2 bounds both the package's chunked
#: GEMM and this file's; δ = ŵ - t of two float32 values within 2²⁹ of each other in scale, or ŵ = 0, is exact
#: in float64)
GAMMA = (2 * D + 2) * 2.0**-53 / (1 - (2 * D + 2) * 2.0**-53)


def dead_problem(kind: str, mask_by: str, seed: int, scale: float):
    """``(target, float32 H, pruned, pattern)`` with ``DEAD`` dead inputs and activations scaled by ``scale``."""
    h = (activation_hessian(D, dead=DEAD, seed=seed) * scale**2).float()
    w = random_weight(R, D, seed=seed)
    score = w.abs() if mask_by == "magnitude" else w.abs() * h.diagonal().sqrt()
    if kind == "2:4":
        return w, h, nm_mask(score, Pattern(2, 4)), Pattern(2, 4)
    return w, h, count_mask(score, torch.full((R,), D // 2)), Pattern()


def objective_and_bound(target: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor):
    """float64 per-row ``δᵀHδ`` from the layer's own ``H`` and the bound on its rounding error (``GAMMA``)."""
    delta = weight.double() - target.double()
    h = hessian.double()
    return ((delta @ h) * delta).sum(dim=1), GAMMA * ((delta.abs() @ h.abs()) * delta.abs()).sum(dim=1)


@pytest.mark.parametrize("scale", [1.0, 1e-3])
@pytest.mark.parametrize("method", ["swap", "admm"])
def test_dead_inputs_no_row_rises_at_any_scale(method, scale):
    """With dead inputs, in float32, at activation scale 1 and 1e-3: every row's float64 objective after refine is at
    most its objective before (up to the derived float64 rounding bound, about 1e-14 relative), a row changes only
    where it strictly drops, no dead input is un-pruned, the pattern is kept and the stats are those figures."""
    for kind in ("unstructured", "2:4"):
        for mask_by in ("wanda", "magnitude"):
            for seed in range(3):
                case = (kind, mask_by, seed)
                target, h, pruned, pattern = dead_problem(kind, mask_by, seed, scale)
                dead = h.diagonal() <= 0
                assert int(dead.sum()) == DEAD
                start = reconstruct(target, pruned, h, damp=DAMP).weight
                ref = refine_mask(method, target, start, pruned, h, pattern=pattern, iterations=20, damp=DAMP)
                check_pattern(pruned, ref.pruned, pattern)
                assert bool((ref.weight[ref.pruned] == 0).all())
                before, err_b = objective_and_bound(target, start, h)
                after, err_a = objective_and_bound(target, ref.weight, h)
                slack = err_a + err_b
                assert bool((after <= before + slack).all()), (case, float(((after - before) / before).max()))
                assert not bool((pruned & ~ref.pruned & dead).any()), f"{case}: a dead input was un-pruned"
                changed = (ref.pruned != pruned).any(dim=1)
                assert bool((after[changed] < before[changed] - slack[changed]).all()), case
                assert torch.equal(ref.weight[~changed], start[~changed])
                assert ref.rows_changed == int(changed.sum())
                assert abs(ref.objective_before - float(before.sum())) <= 2 * float(err_b.sum()), case
                assert abs(ref.objective - float(after.sum())) <= 2 * float(err_a.sum()), case
                assert ref.objective <= ref.objective_before


def test_forced_bad_swaps_are_rejected(monkeypatch):
    """The acceptance, not the proposal, certifies: swaps forced to be bad (prune each row's most expensive kept
    weight, un-prune its least useful pruned live input) are all rejected and nothing changes."""
    from optima_plugin import refine

    def worst(layer, rows, budget, pattern):
        pruned, w, g = layer.pruned[rows], layer.weight[rows], layer.grad[rows]
        hdiag = layer.problem.damped.diagonal()
        live = layer.problem.hessian.diagonal() > 0
        i = torch.where(~pruned, w * w * hdiag, -float("inf")).argmax(dim=1)
        j = torch.where(pruned & live, g * g / hdiag, float("inf")).argmin(dim=1)
        new = pruned.clone()
        ar = torch.arange(rows.numel())
        new[ar, i], new[ar, j] = True, False
        return new, torch.ones(rows.numel(), dtype=torch.bool)

    monkeypatch.setattr(refine, "_propose_unstructured", worst)
    for scale in (1.0, 1e-3):
        target, h, pruned, pattern = dead_problem("unstructured", "wanda", 0, scale)
        start = reconstruct(target, pruned, h, damp=DAMP).weight
        ref = refine_mask("swap", target, start, pruned, h, iterations=5, damp=DAMP)
        assert ref.rows_changed == 0 and ref.swaps == 0
        assert ref.rejected_rows == R  # each row rejected once with budget 1, then stopped
        assert torch.equal(ref.pruned, pruned) and torch.equal(ref.weight, start)
        assert ref.objective == ref.objective_before


def test_forced_bad_admm_support_is_rejected(monkeypatch):
    """An ADMM support forced to be bad (each row keeps its smallest magnitudes) is rejected row by row."""
    from optima_plugin import refine

    monkeypatch.setattr(refine, "_project", lambda mags, counts, pattern: count_mask(-mags, counts))
    target, h, pruned, pattern = dead_problem("unstructured", "wanda", 0, 1e-3)
    start = reconstruct(target, pruned, h, damp=DAMP).weight
    ref = refine_mask("admm", target, start, pruned, h, iterations=5, damp=DAMP)
    assert ref.rows_changed == 0 and ref.rejected_rows == R
    assert torch.equal(ref.pruned, pruned) and torch.equal(ref.weight, start)


def test_a_flat_change_is_not_accepted(monkeypatch):
    """A row changes only where its objective drops: swapping two identical inputs (same activations, same
    target) changes the mask but not the objective, and is rejected (the figures differ by rounding only)."""
    from optima_plugin import refine

    target, h, pruned, _ = dead_problem("unstructured", "wanda", 0, 1e-3)
    a, b = 1, 2
    assert bool((h.diagonal()[[a, b]] > 0).all())
    h[b, :] = h[a, :]  # x_b := x_a
    h[:, b] = h[:, a]
    target[:, b] = target[:, a]
    pruned[:, a], pruned[:, b] = True, False
    start = reconstruct(target, pruned, h, damp=DAMP).weight

    def mirror(layer, rows, budget, pattern):
        new = layer.pruned[rows].clone()
        new[:, a], new[:, b] = False, True
        return new, torch.ones(rows.numel(), dtype=torch.bool)

    monkeypatch.setattr(refine, "_propose_unstructured", mirror)
    ref = refine_mask("swap", target, start, pruned, h, iterations=3, damp=DAMP)
    assert ref.rows_changed == 0 and ref.rejected_rows == R
    assert torch.equal(ref.pruned, pruned) and torch.equal(ref.weight, start)


def test_a_proposal_reviving_a_dead_input_is_rejected(monkeypatch):
    """A row's proposal that un-prunes a dead input is rejected even where the rest of it lowers the objective:
    the good swaps alone are accepted, the same swaps plus a dead input un-pruned (and another pruned) are not."""
    from optima_plugin import refine

    target, h, pruned, _ = dead_problem("unstructured", "magnitude", 0, 1e-3)  # a bad mask: good swaps exist
    d1, d2 = torch.nonzero(h.diagonal() <= 0).squeeze(1)[:2].tolist()
    pruned[:, d1], pruned[:, d2] = True, False
    start = reconstruct(target, pruned, h, damp=DAMP).weight
    good = refine_mask("swap", target, start, pruned, h, iterations=1, damp=DAMP)
    assert good.rows_changed > 0
    propose = refine._propose_unstructured

    def revive_d1(layer, rows, budget, pattern):
        new, proposed = propose(layer, rows, budget, pattern)
        new[:, d1], new[:, d2] = False, True  # d2 pruned for free, d1 (dead) un-pruned: objective unchanged
        return new, proposed

    monkeypatch.setattr(refine, "_propose_unstructured", revive_d1)
    ref = refine_mask("swap", target, start, pruned, h, iterations=1, damp=DAMP)
    assert ref.rows_changed == 0 and ref.rejected_rows > 0
    assert torch.equal(ref.pruned, pruned) and torch.equal(ref.weight, start)
