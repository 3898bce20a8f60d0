"""``--damp auto``: the held-out split of the calibration windows, the per-layer choice against an
independent float64 KKT oracle (its own damping, its own validation objective), the end-to-end prune,
the CLI flag and its validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from optima_plugin import cli
from optima_plugin.api import prune
from optima_plugin.config import PruneConfig
from optima_plugin.validate import resolve
from optima_plugin.damping import (
    AUTO_FALLBACK, DAMP_GRID, HeldOutAccumulator, HeldOutHessian, choose_damp, held_out, parse_damp,
    reconstruct_auto,
)
from optima_plugin.models import block_linears, get_adapter, input_groups
from optima_plugin.pipeline import BlockPipeline
from optima_plugin.selectors.base import Selection
from optima_plugin.testing import tiny_model, tiny_tokenizer
from optima_plugin.updaters import OptimaUpdate, UpdateOptions

D, R = 48, 24


# -- the test's own oracle: damping, float64 KKT solve, validation objective -----------------------------------

def own_damped(h: np.ndarray, damp: float) -> np.ndarray:
    """H + damp · mean(diag H) · I (no dead inputs in these problems)."""
    return h + damp * np.mean(np.diag(h)) * np.eye(h.shape[0])


def kkt_solve(w: np.ndarray, pruned: np.ndarray, hd: np.ndarray) -> np.ndarray:
    """Each row: min (v - w)ᵀ Hd (v - w) s.t. v_P = 0, from the full KKT system [[Hd, Eᵀ], [E, 0]]."""
    out = np.zeros_like(w)
    d = w.shape[1]
    for i in range(w.shape[0]):
        p = np.flatnonzero(pruned[i])
        e = np.zeros((len(p), d))
        e[np.arange(len(p)), p] = 1.0
        kkt = np.block([[hd, e.T], [e, np.zeros((len(p), len(p)))]])
        rhs = np.concatenate([hd @ w[i], np.zeros(len(p))])
        out[i] = np.linalg.solve(kkt, rhs)[:d]
        out[i, p] = 0.0
    return out


def own_validation(w: np.ndarray, new: np.ndarray, h_val: np.ndarray) -> float:
    delta = new - w
    return float(np.einsum("ij,jk,ik->", delta, h_val, delta))


def problem(case: str):
    """A random layer and its fit / held-out Hessians (float64).

    ``well``: 20000 fit tokens (N >> d), validation from the same distribution. ``deficient``: 24 fit
    tokens (< d = 48), validation tokens independent. ``shift``: validation from another distribution.
    """
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(D, D, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, D, dtype=torch.float64)[:, None]
    n_fit, n_val = (20000 if case == "well" else 24), 5000
    x_fit = torch.randn(n_fit, D, generator=g, dtype=torch.float64) @ mix
    other = torch.randn(D, D, generator=g, dtype=torch.float64) if case == "shift" else mix
    x_val = torch.randn(n_val, D, generator=g, dtype=torch.float64) @ other
    weight = torch.randn(R, D, generator=g, dtype=torch.float64)
    pruned = torch.rand(R, D, generator=g) < 0.5
    return weight, pruned, HeldOutHessian(x_fit.T @ x_fit / n_fit, x_val.T @ x_val / n_val, n_fit, n_val)


def own_scores(weight, pruned, held, grid=DAMP_GRID):
    """The oracle's validation objective of every grid damp's solve with H_fit, then the mask alone's."""
    w, p = weight.numpy(), pruned.numpy()
    h_fit, h_val = held.fit.numpy(), held.val.numpy()
    scores = [own_validation(w, kkt_solve(w, p, own_damped(h_fit, dmp)), h_val) for dmp in grid]
    return scores + [own_validation(w, np.where(p, 0.0, w), h_val)]


# -- the choice --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["well", "deficient", "shift"])
def test_the_chosen_damp_has_the_least_validation_objective(case):
    weight, pruned, held = problem(case)
    choice = choose_damp(weight, pruned, held, solver="direct", double_precision=True)
    own = own_scores(weight, pruned, held)
    assert [c["damp"] for c in choice.candidates] == sorted(DAMP_GRID)
    assert [c["validation"] for c in choice.candidates] + [choice.mask_validation] == pytest.approx(own, rel=1e-7)
    for c in choice.candidates:
        assert c["ratio"] == pytest.approx(c["validation"] / own[-1], rel=1e-7)
    best = int(np.argmin(own))
    assert choice.damp == (DAMP_GRID[best] if best < len(DAMP_GRID) else None)
    assert min(own) < sorted(own)[1] * (1 - 1e-3)  # a clear minimum: the test could fail


def test_auto_picks_a_smaller_damp_when_well_conditioned_and_a_larger_when_rank_deficient():
    well = choose_damp(*problem("well"), solver="direct", double_precision=True)
    deficient = choose_damp(*problem("deficient"), solver="direct", double_precision=True)
    assert well.damp is not None and deficient.damp is not None
    assert well.damp <= 1e-2  # plenty of tokens: (almost) the exact fit
    assert deficient.damp >= 1e-1 and deficient.damp > well.damp  # fewer fit tokens than inputs: shrink
    # on the rank-deficient one the exact fit overfits: the smallest damp is clearly worse than the chosen
    ratios = {c["damp"]: c["ratio"] for c in deficient.candidates}
    assert ratios[min(DAMP_GRID)] > 1.2 * ratios[deficient.damp]


def test_final_solve_uses_the_full_hessian_and_the_chosen_damp():
    weight, pruned, held = problem("deficient")
    res, choice = reconstruct_auto(weight, pruned, held, solver="direct", double_precision=True)
    n = held.fit_tokens + held.val_tokens
    full = (held.fit.numpy() * held.fit_tokens + held.val.numpy() * held.val_tokens) / n
    expected = kkt_solve(weight.numpy(), pruned.numpy(), own_damped(full, choice.damp))
    assert np.allclose(res.weight.numpy(), expected, rtol=0, atol=1e-9)
    assert res.damp == choice.damp
    assert res.objective == pytest.approx(own_validation(weight.numpy(), expected, full), rel=1e-9)


def test_the_mask_alone_wins_when_the_held_out_tokens_disagree_with_the_fit():
    weight, pruned, held = problem("shift")
    res, choice = reconstruct_auto(weight, pruned, held, solver="direct", double_precision=True)
    assert choice.damp is None and choice.stats()["chosen"] == "mask_only"
    assert torch.equal(res.weight, weight.masked_fill(pruned, 0)) and res.error_ratio == 1.0
    update = OptimaUpdate().update(weight, Selection(pruned), held.full,
                                   UpdateOptions("direct", "auto", double_precision=True, holdout=held))
    assert update.stats["damp"] is None and update.stats["damp_auto"]["chosen"] == "mask_only"
    assert torch.equal(update.weight, weight.masked_fill(pruned, 0))


def test_a_candidate_whose_cholesky_fails_is_escalated():
    """H_fit shifted below positive definiteness by 0.5% of its mean diagonal: damp 1e-3 fails Cholesky and is
    escalated (to 1e-2, which succeeds), as for a fixed damp."""
    weight, pruned, held = problem("deficient")
    shift = 0.005 * float(held.fit.diagonal().mean())
    bad = HeldOutHessian(held.fit - shift * torch.eye(D, dtype=torch.float64), held.val, held.fit_tokens,
                         held.val_tokens)
    choice = choose_damp(weight, pruned, bad, solver="direct", double_precision=True)
    used = {c["damp"]: c["used"] for c in choice.candidates}
    assert used[1e-3] == pytest.approx(1e-2) and used[1e-2] == 1e-2 and used[10.0] == 10.0


def test_optima_updater_needs_the_held_out_hessians_with_auto():
    weight, pruned, held = problem("well")
    with pytest.raises(ValueError, match="UpdateOptions.holdout"):
        OptimaUpdate().update(weight, Selection(pruned), held.full, UpdateOptions("direct", "auto"))
    fixed = OptimaUpdate().update(weight, Selection(pruned), held.full, UpdateOptions("direct", 0.01))
    assert fixed.stats["damp"] == 0.01 and "damp_auto" not in fixed.stats


# -- the held-out split ----------------------------------------------------------------------------------------

def test_accumulator_sends_each_window_to_its_half():
    g = torch.Generator().manual_seed(0)
    windows = torch.randn(7, 5, 6, generator=g, dtype=torch.float64)  # 7 windows of 5 tokens, d = 6
    acc = HeldOutAccumulator(torch.float64, every=4, first_window=2)  # global windows 2..8: 4 and 8 held out
    for start in range(0, 7, 3):  # chunks of 3 windows, as the pipeline's batches
        acc.chunk(start, min(3, 7 - start))
        acc.add(windows[start : start + 3])
    held = acc.result((6, 6))
    val_idx = [2, 6]  # local indices of global windows 4 and 8
    fit_idx = [i for i in range(7) if i not in val_idx]
    xv, xf = windows[val_idx].reshape(-1, 6), windows[fit_idx].reshape(-1, 6)
    assert torch.allclose(held.val, xv.T @ xv / len(xv), atol=1e-12)
    assert torch.allclose(held.fit, xf.T @ xf / len(xf), atol=1e-12)
    assert (held.fit_tokens, held.val_tokens) == (25, 10)
    x = windows.reshape(-1, 6)
    assert torch.allclose(held.full, x.T @ x / len(x), atol=1e-12)
    assert held_out(torch.arange(9)).tolist() == [True, False, False, False, True, False, False, False, True]


def test_pipeline_held_out_hessians_match_separate_passes_over_each_part():
    """The split Hessians of one statistics pass (2 windows per forward, so chunks straddle the split) equal
    plain Hessians of separate pipelines over the held-out windows alone and the fit windows alone."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    tokens = torch.randint(0, model.config.vocab_size, (6, 16))

    def hessians(toks, holdout=None):
        adapter = get_adapter(model)
        pipe = BlockPipeline(adapter, device=torch.device("cpu"), batch_size=2 if len(toks) % 2 == 0 else 1)
        pipe.capture(toks)
        with pipe.onloaded(0) as block:
            todo = block_linears(block)
            return pipe.hessians(0, block, todo, input_groups(block), torch.float64, holdout=holdout)

    split = hessians(tokens, holdout=4)  # windows 0 and 4 held out
    val, fit, plain = hessians(tokens[[0, 4]]), hessians(tokens[[1, 2, 3, 5]]), hessians(tokens)
    for rel, h in split.items():
        assert isinstance(h, HeldOutHessian) and (h.fit_tokens, h.val_tokens) == (64, 32)
        assert torch.allclose(h.val, val[rel], rtol=1e-9, atol=1e-12), rel
        assert torch.allclose(h.fit, fit[rel], rtol=1e-9, atol=1e-12), rel
        assert torch.allclose(h.full, plain[rel], rtol=1e-9, atol=1e-12), rel
    assert split["self_attn.q_proj"] is split["self_attn.k_proj"]  # one per distinct input


# -- end to end, CLI, validation --------------------------------------------------------------------------------

COMMON = dict(nsamples=8, seqlen=32, calibration_dataset="pydoc", seed=0, checkpoint=False)


def test_prune_model_with_damp_auto_reports_a_chosen_damp_per_layer():
    model = tiny_model("llama")
    report = prune(model, tiny_tokenizer(), progress=False, damp="auto", **COMMON)
    assert report["options"]["damp"] == "auto" and len(report["layers"]) == 21
    for layer in report["layers"]:
        auto = layer["update"]["damp_auto"]
        assert auto["chosen"] in DAMP_GRID or auto["chosen"] == "mask_only", layer["name"]
        assert layer["update"]["damp"] == (auto["chosen"] if auto["chosen"] != "mask_only" else None)
        assert [c["damp"] for c in auto["candidates"]] == list(DAMP_GRID)
        ratios = [c["ratio"] for c in auto["candidates"]]
        assert all(math.isfinite(x) and x > 0 for x in ratios)
        chosen = auto["chosen"]
        best = min(ratios + [1.0])
        assert (ratios[DAMP_GRID.index(chosen)] if chosen != "mask_only" else 1.0) == best
        assert (auto["fit_tokens"], auto["val_tokens"]) == (6 * 32, 2 * 32)
        assert auto["select_seconds"] > 0 and (auto["time_factor"] is None or auto["time_factor"] > 1)
        assert layer["accepted"] and 0 <= layer["error_ratio"] <= 1


def test_damp_auto_with_input_recalc_splits_every_recomputed_hessian():
    report = prune(tiny_model("llama"), tiny_tokenizer(), progress=False, damp="auto", input_recalc=True,
                   skip_attention=True, **COMMON)
    assert len(report["layers"]) == 9
    assert all(x["update"]["damp_auto"]["val_tokens"] == 2 * 32 for x in report["layers"])


def test_with_auto_selectors_that_damp_themselves_use_the_fixed_default():
    model = tiny_model("llama")
    report = prune(model, tiny_tokenizer(), progress=False, damp="auto", prune_method="sparsegpt",
                   skip_attention=True, quantize_weight=True, quantizer="gptq", bitwidth=4, group_size=16, **COMMON)
    for layer in report["layers"]:
        assert layer["selection"]["damp"] == AUTO_FALLBACK
        assert layer["compression"]["quantizer"]["damp"] == AUTO_FALLBACK
        assert "damp_auto" in layer["update"]


def test_cli_parses_damp_auto_and_rejects_words(capsys):
    parser = cli.build_parser()
    assert parser.parse_args(["--damp", "auto"]).damp == "auto"
    assert parser.parse_args(["--damp", "0.1"]).damp == 0.1
    assert parse_damp("AUTO") == "auto"
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--damp", "foo"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --damp: expected a number >= 0 or 'auto', got 'foo'" in err


@pytest.mark.parametrize("damp, nsamples, match", [
    ("foo", 8, "--damp must be a finite number >= 0 or 'auto', got 'foo'"),
    (-0.1, 8, "--damp must be a finite number >= 0 or 'auto', got -0.1"),
    (float("nan"), 8, "--damp must be a finite number >= 0 or 'auto', got nan"),
    (float("inf"), 8, "--damp must be a finite number >= 0 or 'auto', got inf"),
    ("auto", 1, "--damp auto .* needs --nsamples 2 or more"),
])
def test_validation_names_the_flag(damp, nsamples, match):
    with pytest.raises(ValueError, match=match):
        resolve(PruneConfig(damp=damp, nsamples=nsamples))
    resolve(PruneConfig(damp="auto", nsamples=2))
    resolve(PruneConfig(damp=0.0))


@pytest.mark.slow  # about half a minute: two Gloo ranks and one process
def test_two_ranks_choose_the_damps_of_one_process(tmp_path):
    """torchrun: 5 windows, 2 on rank 0 and 3 on rank 1, the held-out ones (0 and 4) one on each rank: the fit and
    held-out Hessians are all-reduced token-weighted, so both ranks choose the single process's damps."""
    import json

    from test_distributed import RUN_CASES, torchrun

    options = dict(COMMON, nsamples=5, double_precision=True, damp="auto")
    script = tmp_path / "run_cases.py"
    script.write_text(RUN_CASES)
    proc = torchrun(script, [json.dumps({"auto": options}), str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranked = torch.load(tmp_path / "auto.pt", weights_only=False)
    model = tiny_model("llama")
    single = prune(model, tiny_tokenizer(), progress=False, **options)
    chosen = [x["update"]["damp_auto"]["chosen"] for x in single["layers"]]
    assert [x["update"]["damp_auto"]["chosen"] for x in ranked["report"]["layers"]] == chosen
    for x, y in zip(single["layers"], ranked["report"]["layers"]):
        assert (x["update"]["damp_auto"]["fit_tokens"], x["update"]["damp_auto"]["val_tokens"]) == \
            (y["update"]["damp_auto"]["fit_tokens"], y["update"]["damp_auto"]["val_tokens"]) == (3 * 32, 2 * 32)
        assert [c["ratio"] for c in x["update"]["damp_auto"]["candidates"]] == \
            pytest.approx([c["ratio"] for c in y["update"]["damp_auto"]["candidates"]], rel=1e-3)  # float32 weights
    for key, dense in model.state_dict().items():
        other = ranked["state"][key]
        assert torch.equal(dense == 0, other == 0), key
        assert float((dense - other).abs().max() / dense.abs().max().clamp_min(1e-12)) <= 1e-5, key


def test_cli_run_with_damp_auto_reports_and_prints_the_choices(tiny_dir, tmp_path, capsys):
    import json

    report = tmp_path / "report.json"
    argv = ["--model", str(tiny_dir), "--nsamples", "4", "--seqlen", "32", "--damp", "auto", "--report", str(report),
            "--quiet", "--no_checkpoint"]
    assert cli.main(argv) == 0
    layers = json.loads(report.read_text())["layers"]
    chosen = [x["update"]["damp_auto"]["chosen"] for x in layers]
    assert len(chosen) == 21
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("--damp auto chose"))
    for c in set(chosen):
        assert f"{c if c == 'mask_only' else f'{c:g}'} ({chosen.count(c)} layers)" in line, line


def test_held_out_hessians_filter_sink_tokens_like_the_plain_one():
    """--damp auto with --sink_tokens exclude: both halves drop the first position, as the plain Hessian does."""
    from optima_plugin.damping import HeldOutAccumulator
    from optima_plugin.hessian import HessianAccumulator, SinkTokens

    torch.manual_seed(0)
    x = torch.randn(4, 16, 8, dtype=torch.float64)
    x[:, 0] *= 50  # massive first-position tokens
    sink = SinkTokens(mode="exclude", positions=1, factor=100.0)
    acc = HeldOutAccumulator(torch.float64, every=4, first_window=0, sink=sink)
    acc.chunk(0, 4)
    acc.add(x)
    rest = x[:, 1:]
    fit, val = rest[1:].reshape(-1, 8), rest[:1].reshape(-1, 8)  # window 0 is held out
    torch.testing.assert_close(acc.fit.hessian, fit.T @ fit / fit.shape[0])
    torch.testing.assert_close(acc.val.hessian, val.T @ val / val.shape[0])
    plain = HessianAccumulator(torch.float64, sink)
    plain.add(x)
    both = rest.reshape(-1, 8)
    torch.testing.assert_close(plain.hessian, both.T @ both / both.shape[0])


def test_auto_damp_with_mask_refinement_runs():
    """--damp auto with --refine_mask swap: refined layers use the chosen damp; a mask-only choice is not refined."""
    report = prune(tiny_model("llama"), tiny_tokenizer(), damp="auto", refine_mask="swap", refine_iters=3,
                   nsamples=4, seqlen=32, progress=False)
    for layer in report["layers"]:
        chosen = layer["update"]["damp_auto"]["chosen"]
        assert (layer["refine"] is None) == (chosen == "mask_only")
        if layer["refine"] is not None:
            assert layer["refine"]["objective"] <= layer["refine"]["objective_before"]
