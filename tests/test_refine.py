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
        PruneConfig(**options).validate()


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
