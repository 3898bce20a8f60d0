"""--hessian_shrink: the correlations between inputs (off-diagonal of H) scaled by 1 - alpha before the update."""

from __future__ import annotations

import copy

import pytest
import torch

from optima_plugin import cli
from optima_plugin.api import prune
from optima_plugin.config import PruneConfig
from optima_plugin.validate import resolve
from optima_plugin.data import get_calibration
from optima_plugin.hessian import default_hessian_shrink, shrink_to_diagonal
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
    prune(plain, tok, hessian_shrink=0.0, **OPTS)
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
    (dict(hessian_shrink=1.0), r"--hessian_shrink must be auto or a number in \[0, 1\)"),
    (dict(hessian_shrink=-0.1), r"--hessian_shrink must be auto or a number in \[0, 1\)"),
    (dict(hessian_shrink=0.2, damp="auto"), "--hessian_shrink 0.2 with --damp auto"),
])
def test_validation(options, match):
    with pytest.raises(ValueError, match=match):
        resolve(PruneConfig(**options))


def test_cli_flag():
    assert cli.build_parser().parse_args(["--hessian_shrink", "0.1"]).hessian_shrink == 0.1
    assert cli.build_parser().parse_args(["--hessian_shrink", "auto"]).hessian_shrink == "auto"
    assert cli.build_parser().parse_args([]).hessian_shrink == "auto"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--hessian_shrink", "lots"])


@pytest.mark.parametrize("options, resolved", [
    (dict(), "auto"),  # the OPTIMA update (the default update): per layer, from its sparsity
    (dict(weight_update="none"), 0.0),  # the selectors' own results stay as their authors wrote them
    (dict(weight_update="native", prune_method="sparsegpt"), 0.0),
    (dict(damp="auto"), 0.0),  # auto chooses on unshrunk held-out Hessians
    (dict(damp=0.1), "auto"),
    (dict(hessian_shrink=0.0), 0.0),  # given: kept, 0 included
    (dict(hessian_shrink="0.2"), 0.2),
    (dict(hessian_shrink=0.1, weight_update="none"), 0.1),
])
def test_default_resolves_per_update(options, resolved):
    assert resolve(PruneConfig(**options)).hessian_shrink == resolved


@pytest.mark.parametrize("ratio, alpha", [(0.0, 0.3), (0.5, 0.3), (0.6, 0.15), (0.65, 0.075), (0.7, 0.0), (0.9, 0.0)])
def test_auto_shrinks_by_sparsity(ratio, alpha):
    """0.3 up to 50% pruned, none from 70%, linear in between (the README's measurements)."""
    assert default_hessian_shrink(ratio) == pytest.approx(alpha, abs=1e-12)


@pytest.mark.parametrize("sparsity, alpha", [(0.5, 0.3), (0.7, 0.0)])
def test_the_default_run_is_the_run_with_its_layers_shrink(sparsity, alpha):
    """Unset, a prune with the OPTIMA update solves each layer with H shrunk by its sparsity's alpha: bitwise the
    run that asks for that alpha, not one that asks for another; the report records the alpha per layer."""
    tok = tiny_tokenizer()
    base = tiny_model("llama")
    runs = {}
    other = 0.3 - alpha  # 0 at 50%, 0.3 at 70%
    for name, extra in (("default", {}), ("same", dict(hessian_shrink=alpha)), ("other", dict(hessian_shrink=other))):
        model = copy.deepcopy(base)
        report = prune(model, tok, **dict(OPTS, sparsity_ratio=sparsity), **extra)
        runs[name] = (model.model.layers[1].mlp.down_proj.weight.detach().clone(), report)
    assert torch.equal(runs["default"][0], runs["same"][0])
    assert (runs["default"][0] - runs["other"][0]).abs().max() > 1e-4
    assert runs["default"][1]["options"]["hessian_shrink"] == "auto"
    assert {x["update"]["hessian_shrink"] for x in runs["default"][1]["layers"]} == {alpha}


def test_the_host_resolves_the_same_default():
    """optima-host: unset, --weight_update optima shrinks by each mask's sparsity (tests/test_host.py checks the
    updates against its own shrunk H), the hosts' own weights (none/native) by 0; the flag parses, is validated."""
    from optima_plugin.host.install import HostOptions
    from optima_plugin.host.launcher import host_options, split_argv

    assert HostOptions().validate().hessian_shrink == "auto"
    assert HostOptions(weight_update="none").validate().hessian_shrink == 0.0
    assert host_options(split_argv(["--hessian_shrink", "0.1", "main.py"])[0]).hessian_shrink == 0.1
    assert host_options(split_argv(["main.py", "--weight_update", "native"])[0]).hessian_shrink == 0.0
    with pytest.raises(ValueError, match=r"--hessian_shrink must be auto or a number in \[0, 1\)"):
        HostOptions(hessian_shrink=1.0).validate()
