"""--hessian_shrink: the correlations between inputs (off-diagonal of H) scaled by 1 - alpha before the update."""

from __future__ import annotations

import copy

import pytest
import torch

from optima_plugin import cli
from optima_plugin.api import prune
from optima_plugin.config import PruneConfig
from optima_plugin.data import get_calibration
from optima_plugin.hessian import shrink_to_diagonal
from optima_plugin.solvers import reconstruct
from optima_plugin.testing import tiny_model, tiny_tokenizer

OPTS = dict(prune_method="magnitude", nsamples=4, seqlen=32, calibration_dataset="pydoc", progress=False)


def test_shrink_scales_the_off_diagonal_only():
    m = torch.arange(16, dtype=torch.float64).reshape(4, 4)
    out = shrink_to_diagonal(m, 0.25)
    expected = m.clone()
    for i in range(4):
        for j in range(4):
            if i != j:
                expected[i, j] = 0.75 * m[i, j]
    torch.testing.assert_close(out, expected)
    assert torch.equal(m, torch.arange(16, dtype=torch.float64).reshape(4, 4))  # input untouched
    assert shrink_to_diagonal(m, 0.0) is m


def _block0_q_hessian(model, tok) -> torch.Tensor:
    """Block 0's q_proj input Hessian over the run's calibration windows, computed here (one window per forward)."""
    windows = get_calibration("pydoc", tok, OPTS["nsamples"], OPTS["seqlen"], 0)
    xs = []
    lin = model.model.layers[0].self_attn.q_proj
    handle = lin.register_forward_hook(lambda mod, inp, out: xs.append(inp[0].detach().double().reshape(-1, lin.in_features)))
    with torch.no_grad():
        for w in windows:
            model(w.unsqueeze(0))
    handle.remove()
    x = torch.cat(xs)
    return x.T @ x / x.shape[0]


def test_update_solves_with_the_shrunk_hessian():
    """Block 0 sees the dense inputs: its update equals a solve with the test's own shrunk H (magnitude masks do not
    depend on H), and differs from the unshrunk run."""
    tok = tiny_tokenizer()
    base = tiny_model("llama")
    dense_q = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    h = _block0_q_hessian(base, tok)
    alpha = 0.5
    shrunk_h = h * (1 - alpha) + torch.diag(h.diagonal()) * alpha
    shrunk, plain = copy.deepcopy(base), copy.deepcopy(base)
    report = prune(shrunk, tok, hessian_shrink=alpha, **OPTS)
    prune(plain, tok, **OPTS)
    got = shrunk.model.layers[0].self_attn.q_proj.weight.detach()
    pruned = got == 0
    want = reconstruct(dense_q, pruned, shrunk_h.float(), solver="direct", damp=0.01).weight
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    other = plain.model.layers[0].self_attn.q_proj.weight.detach()
    assert torch.equal(other == 0, pruned) and (other - got).abs().max() > 1e-3
    assert report["options"]["hessian_shrink"] == alpha


def test_dense_objective_with_shrink_runs():
    report = prune(tiny_model("llama"), tiny_tokenizer(), objective="dense", hessian_shrink=0.3, **OPTS)
    assert all(x["objective"] <= x["mask_objective"] * (1 + 1e-6) for x in report["layers"])


@pytest.mark.parametrize("options, match", [
    (dict(hessian_shrink=1.0), r"--hessian_shrink must be a number in \[0, 1\)"),
    (dict(hessian_shrink=-0.1), r"--hessian_shrink must be a number in \[0, 1\)"),
    (dict(hessian_shrink=0.2, damp="auto"), "--hessian_shrink 0.2 with --damp auto"),
])
def test_validation(options, match):
    with pytest.raises(ValueError, match=match):
        PruneConfig(**options).validate()


def test_cli_flag():
    assert cli.build_parser().parse_args(["--hessian_shrink", "0.1"]).hessian_shrink == 0.1
    assert cli.build_parser().parse_args([]).hessian_shrink == 0.0
