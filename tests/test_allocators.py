"""Sparsity allocation: OWL and AlphaPruning layer ratios, TRIM row ratios, per-row selectors, ratio files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import activation_hessian, random_weight
from optima_plugin import cli, prune, reconstruct
from optima_plugin.allocators import AllocationContext, linears_by_block
from optima_plugin.allocators.alphapruning import AlphaPruningAllocator, alphapruning_ratios, esd_alpha
from optima_plugin.allocators.owl import OwlAllocator, outlier_ratio, owl_ratios
from optima_plugin.allocators.trim import OutputModel, QMETRICS, project_mean, round_rows, trim_row_ratios
from optima_plugin.engine import prunable_linears
from optima_plugin.models import get_adapter
from optima_plugin.selectors import MagnitudeSelector, SparseGPTSelector, ThanosSelector, WandaSelector
from optima_plugin.sparsity import Pattern, row_mask
from optima_plugin.testing import tiny_model, tiny_tokenizer

FAST = dict(nsamples=4, seqlen=64, calibration_dataset="pydoc")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def layer():
    """A synthetic 96 x 256 layer with an activation-like Hessian (two SparseGPT/Thanos blocks)."""
    return random_weight(96, 256, seed=3), activation_hessian(256, seed=3).float()


# -- per-row ratios in the selectors ------------------------------------------------


@pytest.mark.parametrize("selector", [MagnitudeSelector(), WandaSelector(), SparseGPTSelector(), ThanosSelector()],
                         ids=lambda s: s.name)
def test_selectors_honour_per_row_ratios(selector, layer):
    weight, hessian = layer
    ratios = torch.linspace(0.0, 0.9, weight.shape[0], dtype=torch.float64)[torch.randperm(weight.shape[0])]
    sel = selector.select(weight, hessian, ratios, Pattern())
    expected = torch.floor(ratios * weight.shape[1] + 1e-9).long()
    assert torch.equal(sel.pruned.sum(1), expected)
    if sel.weight is not None:
        assert bool((sel.weight[sel.pruned] == 0).all())
    # a constant per-row tensor gives the same counts as row_mask on the selector's score
    score = selector.score(weight, hessian)
    assert score.shape == weight.shape
    assert torch.equal(row_mask(score, ratios).sum(1), expected)


# -- OWL --------------------------------------------------------------------------------


def test_outlier_ratio_pools_the_block():
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(8, 16, generator=g) ** 6, torch.rand(4, 16, generator=g) ** 6 * 10]
    flat = torch.cat([s.flatten() for s in scores])
    assert outlier_ratio(scores, 3.0) == pytest.approx(float((flat > 3.0 * flat.mean()).float().mean()))
    assert outlier_ratio(scores, 3.0) != pytest.approx(outlier_ratio(scores[:1], 3.0))


def test_owl_ratios_mean_span_and_order():
    d = torch.tensor([0.010, 0.030, 0.020, 0.015], dtype=torch.float64)
    r = owl_ratios(d, 0.7, 0.08)
    assert float(r.mean()) == pytest.approx(0.7, abs=1e-12)
    assert float(r.max() - r.min()) == pytest.approx(0.16, abs=1e-12)  # [0, 2·Lamda] span
    assert int(torch.argmin(r)) == 1 and int(torch.argmax(r)) == 0  # more outliers, less pruning
    assert torch.equal(owl_ratios(torch.full((3,), 0.02), 0.6, 0.08), torch.full((3,), 0.6, dtype=torch.float64))


def test_owl_in_a_run(tokenizer):
    model = tiny_model("llama")
    report = prune(model, tokenizer, sparsity_ratio=0.6, allocation="owl", Lamda=0.1, weight_update="none",
                   progress=False, **FAST)
    by_block: dict = {}
    for x in report["layers"]:
        by_block.setdefault(x["block"], set()).add(x["ratio"])
    assert all(len(v) == 1 for v in by_block.values())  # one ratio per block
    block_ratios = [next(iter(v)) for v in by_block.values()]
    assert sum(block_ratios) / len(block_ratios) == pytest.approx(0.6, abs=1e-12)  # unweighted block mean
    assert max(block_ratios) - min(block_ratios) == pytest.approx(0.2, abs=1e-9)
    for x in report["layers"]:  # each layer is pruned to its own ratio (floor per row)
        assert x["sparsity"] == pytest.approx(x["ratio"], abs=1.0 / 64 + 1e-9)


def test_owl_refuses_out_of_range(tokenizer):
    with pytest.raises(ValueError, match="lower --Lamda"):
        prune(tiny_model("llama"), tokenizer, sparsity_ratio=0.95, allocation="owl", Lamda=0.2, progress=False, **FAST)


def test_ratio_span_names_the_allocator_and_the_option_to_lower():
    from optima_plugin.allocators.base import ratio_span

    assert ratio_span(torch.tensor([0.2, 0.7]), "OWL block sparsities", 0.5, "--Lamda", 0.1) == (
        pytest.approx(0.2), pytest.approx(0.7))
    for bad in ([-0.1, 0.5], [0.5, 1.0]):
        with pytest.raises(ValueError, match=r"AlphaPruning sparsities span \[.*outside \[0, 1\) at "
                                             r"--sparsity_ratio 0.5 and --epsilon 0.3; lower --epsilon"):
            ratio_span(torch.tensor(bad), "AlphaPruning sparsities", 0.5, "--epsilon", 0.3)


# -- AlphaPruning ------------------------------------------------------------------------


def _reference_alpha_peak(matrix: torch.Tensor, bins: int = 100) -> float:
    """The AlphaPruning reference's per-candidate loop (net_esd_estimator, xmin_peak), as published."""
    eigs = torch.sort(torch.linalg.svdvals(matrix.float()).square()).values
    n_all = len(eigs)
    logs = torch.log(eigs)
    alphas, ds = torch.zeros(n_all - 1), torch.ones(n_all - 1)
    h = torch.log10(eigs)
    counts = torch.histc(h, bins, min=float(h.min()), max=float(h.max()))
    edges = torch.linspace(float(h.min()), float(h.max()), bins + 1)
    peak = 10 ** edges[torch.argmax(counts)]
    lo, hi = torch.log10(0.95 * peak), 1.5 * peak
    for i, xmin in enumerate(eigs[:-1]):
        if xmin < lo:
            continue
        if xmin > hi:
            break
        n = float(n_all - i)
        alpha = 1 + n / (torch.sum(logs[i:]) - n * logs[i])
        alphas[i] = alpha
        if alpha > 1:
            ds[i] = torch.max(torch.abs(1 - (eigs[i:] / xmin) ** (-alpha + 1) - torch.arange(n) / n))
    return float(alphas[torch.argmin(ds)])


@pytest.mark.parametrize("shape, heavy", [((64, 48), False), ((48, 96), True), ((120, 120), True)])
def test_esd_alpha_matches_reference(shape, heavy):
    g = torch.Generator().manual_seed(shape[0])
    w = torch.randn(*shape, generator=g)
    if heavy:
        w = w / torch.rand(*shape, generator=g).clamp_min(0.05) ** 0.5  # heavier tails
    assert esd_alpha(w) == pytest.approx(_reference_alpha_peak(w), rel=1e-4)


def test_alphapruning_ratios_weighted_mean_and_cap():
    alphas = torch.tensor([2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    params = torch.tensor([100.0, 300.0, 100.0, 50.0], dtype=torch.float64)
    r = alphapruning_ratios(alphas, params, 0.5, 0.3)
    assert float((r * params).sum() / params.sum()) == pytest.approx(0.5, abs=1e-12)
    assert bool((r[1:] > r[:-1]).all())  # higher alpha, more pruning
    assert float(r.max() / r.min()) == pytest.approx(1.3 / 0.7)  # the [1-ε, 1+ε] map, scaled
    capped = alphapruning_ratios(alphas, params, 0.8, 0.3)  # 0.8 · 1.3 > 0.95: cap and rescale
    assert float(capped.max()) == pytest.approx(0.95)
    assert float((capped * params).sum() / params.sum()) == pytest.approx(0.8, abs=1e-9)


@pytest.mark.parametrize("mapping", ["block_wise", "layer_wise"])
def test_alphapruning_in_a_run(mapping, tokenizer):
    model = tiny_model("qwen2")
    report = prune(model, tokenizer, sparsity_ratio=0.6, allocation="alphapruning", mapping_type=mapping,
                   weight_update="none", progress=False, **FAST)
    layers = report["layers"]
    params = [x["shape"][0] * x["shape"][1] for x in layers]
    mean = sum(p * x["ratio"] for p, x in zip(params, layers)) / sum(params)
    assert mean == pytest.approx(0.6, abs=1e-12)  # parameter-weighted mean
    ratios = {x["ratio"] for x in layers}
    assert len(ratios) == (3 if mapping == "block_wise" else len(layers))
    assert all(0.6 * 0.7 / 1.3 - 1e-9 <= r < 0.95 for r in ratios)


# -- TRIM ----------------------------------------------------------------------------------


def test_output_model_equals_explicit_activations():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 40, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 40, dtype=torch.float64)
    w = torch.randn(12, 40, generator=g, dtype=torch.float64)
    pruned = torch.rand(12, 40, generator=g) < 0.6
    stats = OutputModel(w, x.T @ x / 500).stats(pruned)
    y, yhat = x @ w.T, x @ w.masked_fill(pruned, 0).T  # tokens x rows
    cos_rows = (y * yhat).sum(0) / (y.norm(dim=0) * yhat.norm(dim=0))
    assert torch.allclose(stats.yh / (stats.yy.sqrt() * stats.hh.sqrt()), cos_rows, atol=1e-10)
    flat = (y * yhat).sum() / (y.norm() * yhat.norm())
    assert QMETRICS["cosim_flat"](stats) == pytest.approx(float(flat), abs=1e-7)
    assert -QMETRICS["mse"](stats) == pytest.approx(float(((y - yhat) ** 2).mean()), rel=1e-9)


def test_project_mean_and_round_rows():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(300, generator=g, dtype=torch.float64) * 1.6 - 0.2
    p = project_mean(x, 0.7)
    assert float(p.mean()) == pytest.approx(0.7, abs=1e-9)
    assert float(p.min()) >= 0 and float(p.max()) <= 0.95
    counts = round_rows(p, 128, 0.7)
    assert int(counts.sum()) == math.floor(0.7 * 300 * 128)
    assert int(counts.max()) <= math.floor(0.95 * 128) and int(counts.min()) >= 0
    assert int((counts - p * 128).abs().max()) <= 1


@pytest.mark.parametrize("qmetric, dimwise", [("cosim_flat", "cosim"), ("mse", "mse"), ("snr", "snr"),
                                              ("psnr", "cosim"), ("cosim_dim", "cosim")])
def test_trim_rows_vary_keep_the_mean_and_improve(qmetric, dimwise, layer):
    weight, hessian = layer
    r, d = weight.shape
    scores = WandaSelector().score(weight, hessian)
    alloc = trim_row_ratios(weight, hessian, scores, 0.7, qmetric=qmetric, qmetric_dimwise=dimwise)
    x = alloc.ratios
    assert x.shape == (r,) and x.dtype == torch.float64
    assert float(x.max() - x.min()) >= 3.0 / d and float(x.std()) > 1e-3  # rows really differ
    assert float(x.min()) >= 0 and float(x.max()) <= 0.95
    assert abs(float(x.mean()) - 0.7) <= 1.0 / (r * d)  # the layer ratio, to one weight
    pruned = WandaSelector().select(weight, hessian, x, Pattern()).pruned
    assert int(pruned.sum()) == math.floor(0.7 * r * d)
    assert alloc.stats["best_metric"] > alloc.stats["baseline_metric"]
    assert QMETRICS[qmetric](OutputModel(weight, hessian).stats(pruned)) == pytest.approx(alloc.stats["best_metric"])


def test_trim_forbid_neg_lr_and_zero_ratio(layer):
    weight, hessian = layer
    neg = -weight.abs() * hessian.diagonal().sqrt()  # a perverse score: prunes the most important first
    alloc = trim_row_ratios(weight, hessian, neg, 0.5, forbid_neg_lr=True)
    assert alloc.stats["learning_rate"] is None or alloc.stats["learning_rate"] > 0
    assert torch.equal(trim_row_ratios(weight, hessian, neg, 0.0).ratios, torch.zeros(weight.shape[0],
                                                                                        dtype=torch.float64))


def test_optima_is_as_exact_on_trim_masks_as_on_uniform_masks(layer):
    weight, hessian = layer
    selector = WandaSelector()
    rows = trim_row_ratios(weight, hessian, selector.score(weight, hessian), 0.6).ratios
    gaps = {}
    for kind, ratio in (("uniform", 0.6), ("trim", rows)):
        pruned = selector.select(weight, hessian, ratio, Pattern()).pruned
        pcg = reconstruct(weight, pruned, hessian, solver="pcg")
        exact = reconstruct(weight.double(), pruned, hessian.double(), solver="direct", double_precision=True)
        assert bool((pcg.weight[pruned] == 0).all())
        gaps[kind] = (pcg.objective - exact.objective) / exact.objective
    assert pcg.error_ratio < 1.0
    assert abs(gaps["trim"]) <= 1e-4 and abs(gaps["uniform"]) <= 1e-4, gaps


def test_trim_in_a_run_with_optima_and_owl(tokenizer):
    model = tiny_model("llama")
    report = prune(model, tokenizer, sparsity_ratio=0.7, use_trim=True, allocation="owl", progress=False, **FAST)
    for x in report["layers"]:
        rows = x["rows"]
        assert set(rows) >= {"min", "max", "mean", "std", "baseline_metric", "best_metric", "learning_rate"}
        r, d = x["shape"]
        assert 0 <= rows["min"] <= rows["max"] <= 0.95
        assert x["sparsity"] == pytest.approx(rows["mean"], abs=1e-12)  # the applied row ratios
        assert x["error_ratio"] < 1.0
    assert sum(x["rows"]["std"] > 0 for x in report["layers"]) >= len(report["layers"]) // 2
    block_ratio = {x["block"]: x["ratio"] for x in report["layers"]}
    assert len(set(round(v, 3) for v in block_ratio.values())) == 3  # OWL ratios underneath
    assert report["allocation"] == {"method": "owl", "rows": "trim", "loaded_from": None}


def test_input_recalc_recomputes_later_hessians(tokenizer):
    base = tiny_model("llama")
    reports = {}
    for recalc in (False, True):
        m = tiny_model("llama")
        m.load_state_dict(base.state_dict())
        reports[recalc] = {x["name"]: x for x in prune(m, tokenizer, sparsity_ratio=0.6, use_trim=True,
                                                       input_recalc=recalc, progress=False, **FAST)["layers"]}
    q, o = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"
    assert reports[True][q]["mask_objective"] == pytest.approx(reports[False][q]["mask_objective"])
    assert reports[True][o]["mask_objective"] != pytest.approx(reports[False][o]["mask_objective"])


# -- options, aliases, ratio files ----------------------------------------------------------


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(use_trim=True, sparsity_type="2:4"), "--use_trim .* fixes every row"),
        (dict(allocation="owl", sparsity_type="2:4"), "--allocation owl"),
        (dict(prune_method="wanda_owl", allocation="alphapruning"), "means --allocation owl"),
        (dict(qmetric="ssim"), "--qmetric must be one of"),
        (dict(qmetric_dimwise="psnr"), "--qmetric_dimwise must be one of cosim, mse, snr"),
        (dict(mapping_type="global"), "--mapping_type"),
        (dict(epsilon=1.5), "--epsilon"),
        (dict(Lamda=-0.1), "--Lamda"),
        (dict(iterations=0), "--iterations"),
        (dict(save_layer_ratio="ratios.txt"), "--save_layer_ratio ratios.txt: use a .json or .npy"),
        (dict(allocation="nope"), "known: alphapruning, owl, uniform"),
    ],
)
def test_bad_allocation_options(options, match, tokenizer):
    with pytest.raises(ValueError, match=match):
        prune(tiny_model("llama"), tokenizer, progress=False, **dict(FAST, **options))


def test_cli_refuses_trim_with_nm(tmp_path, capsys):
    path = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    capsys.readouterr()
    assert cli.main(["--model", str(path), "--use_trim", "--sparsity_type", "2:4", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--use_trim" in err[0] and "unstructured" in err[0]


def test_host_alias_sets_selector_and_allocation(tokenizer):
    report = prune(tiny_model("llama"), tokenizer, prune_method="magnitude_alpha", sparsity_ratio=0.5,
                   weight_update="none", progress=False, **FAST)
    assert (report["options"]["prune_method"], report["options"]["allocation"]) == ("magnitude", "alphapruning")
    assert len({x["ratio"] for x in report["layers"]}) == 3


@pytest.mark.parametrize("suffix", [".json", ".npy"])
def test_save_and_load_layer_ratio_round_trip(suffix, tmp_path, tokenizer):
    path = str(tmp_path / f"ratios{suffix}")
    first = prune(tiny_model("llama"), tokenizer, sparsity_ratio=0.6, allocation="owl", save_layer_ratio=path,
                  weight_update="none", progress=False, **FAST)
    saved = {x["name"]: x["ratio"] for x in first["layers"]}
    if suffix == ".json":
        assert json.loads((tmp_path / "ratios.json").read_text())["ratios"] == saved
    again = prune(tiny_model("llama"), tokenizer, sparsity_ratio=0.6, load_layer_ratio=path, weight_update="none",
                  progress=False, **FAST)
    assert {x["name"]: x["ratio"] for x in again["layers"]} == saved
    assert again["allocation"]["loaded_from"] == path
    for a, b in zip(first["layers"], again["layers"]):
        assert a["sparsity"] == b["sparsity"]


def test_load_layer_ratio_per_block_npy_and_mismatch(tmp_path, tokenizer):
    per_block = tmp_path / "blocks.npy"
    np.save(per_block, np.array([0.3, 0.5, 0.7]))
    report = prune(tiny_model("llama"), tokenizer, load_layer_ratio=str(per_block), weight_update="none",
                   progress=False, **FAST)
    assert {x["block"]: x["ratio"] for x in report["layers"]} == {0: 0.3, 1: 0.5, 2: 0.7}
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="holds 2 ratios; expected 21 .* or 3"):
        prune(tiny_model("llama"), tokenizer, load_layer_ratio=str(wrong), progress=False, **FAST)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"ratios": {"model.layers.0.mlp.up_proj": 0.5}}))
    with pytest.raises(ValueError, match="20 missing"):
        prune(tiny_model("llama"), tokenizer, load_layer_ratio=str(other), progress=False, **FAST)


def test_linears_by_block_respects_skip_attention():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    linears = prunable_linears(adapter, skip_attention=True)
    groups = linears_by_block(AllocationContext(model, adapter, 0.5, linears))
    assert [len(g) for g in groups] == [3, 3, 3]
    assert all("mlp" in n for g in groups for n in g)


# -- the real model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    from optima_plugin.loading import default_model, load_model

    directory, gguf = default_model()
    return load_model(directory, gguf_file=gguf)


@pytest.mark.slow
def test_smollm2_owl_and_alphapruning_are_not_uniform(smollm2):
    from optima_plugin.data import get_calibration

    model, tok = smollm2
    adapter = get_adapter(model)
    linears = {n: lin for n, lin in prunable_linears(adapter, skip_attention=False).items()
               if int(n.split(".")[2]) < 10}  # the first 10 blocks keep the test short
    params = {n: lin.weight.numel() for n, lin in linears.items()}
    tokens = get_calibration("pydoc", tok, 4, 128, 0)
    ctx = AllocationContext(model, adapter, 0.7, linears, tokens=tokens)
    owl = OwlAllocator().layer_ratios(ctx)
    blocks = [next(iter(g)) for g in linears_by_block(ctx) if g]
    block_ratios = np.array([owl[n] for n in blocks])
    assert block_ratios.mean() == pytest.approx(0.7, abs=1e-9)
    assert block_ratios.max() - block_ratios.min() == pytest.approx(0.16, abs=1e-9)  # 2 · Lamda
    alpha = AlphaPruningAllocator().layer_ratios(ctx)
    values = np.array(list(alpha.values()))
    weights = np.array([params[n] for n in alpha])
    assert (values * weights).sum() / weights.sum() == pytest.approx(0.7, abs=1e-9)
    assert values.std() > 0.02 and values.max() <= 0.95


@pytest.mark.slow
def test_smollm2_trim_cosine_not_worse_than_uniform(smollm2):
    """On real activations (stored here, never by TRIM): TRIM's rows keep the layer output at least as well."""
    from optima_plugin.capture import capture_block_inputs, run_block
    from optima_plugin.data import get_calibration

    model, tok = smollm2
    adapter = get_adapter(model)
    tokens = get_calibration("pydoc", tok, 4, 256, 0)
    inputs, kwargs = capture_block_inputs(adapter, tokens, device="cpu")
    block = adapter.blocks[0]
    seen: dict = {}
    names = ("self_attn.q_proj", "mlp.down_proj")
    handles = [block.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]).double()))
        for n in names]
    with torch.no_grad():
        for i in range(inputs.shape[0]):
            run_block(block, inputs[i : i + 1], kwargs[0])
    for h in handles:
        h.remove()
    selector = WandaSelector()
    for name in names:
        x = torch.cat(seen[name])
        weight = block.get_submodule(name).weight.detach()
        hessian = (x.T @ x / x.shape[0]).float()
        rows = trim_row_ratios(weight, hessian, selector.score(weight, hessian), 0.7).ratios
        cos = {}
        for kind, ratio in (("uniform", 0.7), ("trim", rows)):
            pruned = selector.select(weight, hessian, ratio, Pattern()).pruned
            y, yhat = x @ weight.double().T, x @ weight.double().masked_fill(pruned, 0).T
            cos[kind] = float((y * yhat).sum() / (y.norm() * yhat.norm()))
        assert cos["trim"] >= cos["uniform"], (name, cos)
