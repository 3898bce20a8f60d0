"""``--objective dense``: the target transform against a float64 KKT oracle, the paired statistics, end to end."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import one_window_at_a_time

from optima_plugin import hookimpl, pipeline, prune
from optima_plugin.config import PruneConfig
from optima_plugin.validate import resolve
from optima_plugin.data import get_calibration
from optima_plugin.models import block_linears, get_adapter, input_groups
from optima_plugin.objective import CrossAccumulator, DenseTerms, OutputEnergy, Phase, dense_objective, dense_target
from optima_plugin.pipeline import BlockPipeline
from optima_plugin.plugins import get_plugin_manager
from optima_plugin.solvers import reconstruct
from optima_plugin.testing import tiny_model, tiny_tokenizer

FAST = dict(nsamples=4, seqlen=64, calibration_dataset="pydoc", progress=False)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _activations(n: int, d: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X_p, X_d)``, ``n x d`` float64 tokens: correlated, scaled inputs and ``X_p = X_d + noise``."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    x_d = (torch.randn(n, d, generator=g, dtype=torch.float64) @ mix) * torch.exp(
        torch.randn(d, generator=g, dtype=torch.float64))
    x_p = x_d + noise * torch.randn(n, d, generator=g, dtype=torch.float64) * x_d.std(dim=0)
    return x_p, x_d


def _mask(weight: torch.Tensor, pattern: str, seed: int) -> torch.Tensor:
    """bool ``r x d``, True = pruned: random 50% per row, or 2 of every 4."""
    g = torch.Generator().manual_seed(seed)
    r, d = weight.shape
    scores = torch.rand(r, d, generator=g)
    if pattern == "2:4":
        groups = scores.reshape(r, d // 4, 4)
        idx = groups.argsort(dim=2)[:, :, :2]
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True).reshape(r, d)
    return scores < scores.median(dim=1, keepdim=True).values


def _oracle(weight, pruned, x_p, x_d, damp):
    """Per row, the KKT solve on the kept support: ``ŵ_S = (H + λI)_SS⁻¹ ((G + λI) w)_S`` in float64."""
    n = x_p.shape[0]
    h = x_p.T @ x_p / n
    g = x_p.T @ x_d / n
    lam = damp * torch.diagonal(h).mean()
    eye = torch.eye(h.shape[0], dtype=torch.float64)
    hd, rhs = h + lam * eye, (g + lam * eye) @ weight.T  # columns: (G + λI) w
    out = torch.zeros_like(weight)
    for i in range(weight.shape[0]):
        keep = ~pruned[i]
        out[i, keep] = torch.linalg.solve(hd[keep][:, keep], rhs[keep, i])
    return out


def _terms(weight, x_p, x_d) -> DenseTerms:
    n = x_p.shape[0]
    return DenseTerms(x_p.T @ x_p / n, x_p.T @ x_d / n, ((x_d @ weight.T) ** 2).mean(dim=0), n)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("damp", [0.0, 0.01])
@pytest.mark.parametrize("solver", ["direct", "pcg"])
def test_dense_objective_solution_matches_a_float64_kkt_oracle(pattern, damp, solver):
    r, d, n = 12, 32, 400
    x_p, x_d = _activations(n, d, noise=0.3, seed=1)
    weight = torch.randn(r, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64) / d**0.5
    pruned = _mask(weight, pattern, seed=3)
    terms = _terms(weight, x_p, x_d)
    target, used = dense_target(weight, terms.hessian, terms.cross, damp)
    assert used == damp
    res = reconstruct(target, pruned, terms.hessian, solver=solver, damp=used, double_precision=True,
                      tol=1e-12 if solver == "pcg" else None, max_iter=2000 if solver == "pcg" else None)
    want = _oracle(weight, pruned, x_p, x_d, damp)
    tight = solver == "direct"  # pcg stops at a relative residual
    torch.testing.assert_close(res.weight, want, rtol=1e-7 if tight else 1e-4, atol=1e-9 if tight else 1e-6)
    # the figure is the direct ‖W X_d − Ŵ X_p‖² / N
    direct = float(((x_d @ weight.T - x_p @ res.weight.T) ** 2).sum() / n)
    assert dense_objective(weight, res.weight, terms) == pytest.approx(direct, rel=1e-9)
    mask_only = weight.masked_fill(pruned, 0)
    assert dense_objective(weight, res.weight, terms) < dense_objective(weight, mask_only, terms)
    if damp == 0.0:  # the unpenalised optimum: no other weights on the support do better
        nudged = res.weight + 1e-3 * torch.randn_like(res.weight).masked_fill(pruned, 0)
        assert dense_objective(weight, res.weight, terms) < dense_objective(weight, nudged, terms)


@pytest.mark.parametrize("damp", [0.0, 0.01])
def test_identical_inputs_give_the_pruned_objectives_weights(damp):
    r, d, n = 10, 24, 300
    x, _ = _activations(n, d, noise=0.0, seed=4)
    weight = torch.randn(r, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64) / d**0.5
    pruned = _mask(weight, "unstructured", seed=6)
    terms = _terms(weight, x, x)
    target, _ = dense_target(weight, terms.hessian, terms.cross, damp)
    torch.testing.assert_close(target, weight, rtol=1e-9, atol=1e-10)
    dense = reconstruct(target, pruned, terms.hessian, solver="direct", damp=damp, double_precision=True)
    plain = reconstruct(weight, pruned, terms.hessian, solver="direct", damp=damp, double_precision=True)
    torch.testing.assert_close(dense.weight, plain.weight, rtol=1e-8, atol=1e-10)


def test_a_dead_input_keeps_its_dense_weight_in_the_target():
    x_p, x_d = _activations(200, 8, noise=0.2, seed=7)
    x_p[:, 3] = 0.0  # never active on the pruned path
    weight = torch.randn(4, 8, dtype=torch.float64)
    terms = _terms(weight, x_p, x_d)
    target, _ = dense_target(weight, terms.hessian, terms.cross, 0.01)
    torch.testing.assert_close(target[:, 3], weight[:, 3])


def test_cross_accumulator_equals_the_one_shot_product_over_chunks_and_hooks():
    x_p, x_d = _activations(90, 16, noise=0.5, seed=8)
    acc = CrossAccumulator(torch.float64)
    for start in (0, 7, 40):  # uneven chunks
        stop = {0: 7, 7: 40, 40: 90}[start]
        acc.add(x_p[start:stop], x_d[start:stop])
    torch.testing.assert_close(acc.cross, x_p.T @ x_d / 90, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.hessian, x_p.T @ x_p / 90, rtol=1e-12, atol=1e-12)
    assert acc.tokens == 90

    # as hooks: the dense run of a chunk, then the pruned path's run of the same chunk
    lin = torch.nn.Linear(16, 5, dtype=torch.float64)
    phase = Phase()
    pair, energy = CrossAccumulator(torch.float64, phase), OutputEnergy(torch.float64, phase)
    handles = [lin.register_forward_hook(pair.hook), lin.register_forward_hook(energy.hook)]
    for start in range(0, 90, 30):
        phase.dense = True
        lin(x_d[start : start + 30].reshape(3, 10, 16))
        phase.dense = False
        lin(x_p[start : start + 30].reshape(3, 10, 16))
    for h in handles:
        h.remove()
    torch.testing.assert_close(pair.cross, x_p.T @ x_d / 90, rtol=1e-12, atol=1e-12)
    want = ((x_d @ lin.weight.detach().T) ** 2).mean(dim=0)  # no bias
    torch.testing.assert_close(energy.energy, want, rtol=1e-12, atol=1e-12)


def test_dense_statistics_restart_after_out_of_memory_and_the_dense_copy_advances_the_dense_inputs(tokenizer,
                                                                                                  monkeypatch):
    tokens = get_calibration("pydoc", tokenizer, 4, 32, 0)
    model = tiny_model("llama")
    pipe = BlockPipeline(get_adapter(model), device=torch.device("cpu"), batch_size=2, track_dense=True)
    pipe.capture(tokens)
    assert torch.equal(pipe.dense_inputs, pipe.inputs)
    pipe.inputs += 0.1 * torch.randn_like(pipe.inputs)  # a pruned path that differs
    real = pipeline.run_block

    small_device = one_window_at_a_time(real)

    with pipe.onloaded(0) as block:
        todo = block_linears(block)
        dense_block = copy.deepcopy(block)
        with torch.no_grad():
            want_out = real(block, pipe.dense_inputs.clone(), pipe.kwargs[0])
        want_h = pipe.hessians(0, block, todo, input_groups(block), torch.float64)
        monkeypatch.setattr(pipeline, "run_block", small_device)
        terms = pipe.dense_statistics(0, block, dense_block, todo, input_groups(block), torch.float64)
        monkeypatch.setattr(pipeline, "run_block", real)
        pipe.propagate(0, dense_block, dense=True)
    assert pipe.oom_backoff == [{"block": 0, "pass": "dense_statistics", "batch": 1}]
    torch.testing.assert_close(pipe.dense_inputs, want_out)
    for rel in todo:
        assert terms[rel].tokens == tokens.numel()
        torch.testing.assert_close(terms[rel].hessian, want_h[rel])
        assert terms[rel].energy.shape == (todo[rel].out_features,)
    assert not torch.allclose(terms["mlp.up_proj"].cross, terms["mlp.up_proj"].hessian)


def test_later_linears_pair_their_pruned_block_inputs_with_the_dense_copys(tokenizer):
    """o_proj's x_p comes from the block whose q/k/v are pruned already, its x_d from the dense copy: with the
    same block inputs on both paths, H is the pruned block's Hessian and G pairs it with the dense one's inputs
    (with x_p taken from the dense block instead, a later linear would correct the error q/k/v corrected)."""
    tokens = get_calibration("pydoc", tokenizer, 2, 32, 0)
    pipe = BlockPipeline(get_adapter(tiny_model("llama")), device=torch.device("cpu"), track_dense=True)
    pipe.capture(tokens)
    with pipe.onloaded(0) as block:
        dense_block = copy.deepcopy(block)
        groups, todo = input_groups(block), block_linears(block)
        with torch.no_grad():
            for rel in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                w = todo[rel].weight
                w.masked_fill_(w.abs() < w.abs().median(), 0)
        o = {"self_attn.o_proj": todo["self_attn.o_proj"]}
        terms = pipe.dense_statistics(0, block, dense_block, o, groups, torch.float64)["self_attn.o_proj"]
        pruned_h = pipe.hessians(0, block, o, groups, torch.float64)["self_attn.o_proj"]
        dense_h = pipe.hessians(0, dense_block, {"self_attn.o_proj": dense_block.self_attn.o_proj}, groups,
                                torch.float64)["self_attn.o_proj"]
    torch.testing.assert_close(terms.hessian, pruned_h)
    assert not torch.allclose(pruned_h, dense_h, rtol=1e-3)
    assert not torch.allclose(terms.cross, pruned_h, rtol=1e-3)


# -- end to end ----------------------------------------------------------------------------


def _linear_inputs(model, tokens, block_index):
    """``{rel: (N, d) float64 inputs}`` of block ``block_index``'s linears in a full forward of ``model``."""
    block = get_adapter(model).blocks[block_index]
    seen, handles = {}, []
    for rel, lin in block_linears(block).items():
        handles.append(lin.register_forward_hook(
            lambda m, inp, out, rel=rel: seen.setdefault(rel, []).append(inp[0].detach().double()
                                                                         .reshape(-1, inp[0].shape[-1]))))
    try:
        with torch.no_grad():
            model(input_ids=tokens, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {rel: torch.cat(x) for rel, x in seen.items()}


def test_end_to_end_dense_objective_is_measured_and_improves_on_every_accepted_layer(tokenizer):
    base = tiny_model("llama")
    dense_model, pruned_model = copy.deepcopy(base), copy.deepcopy(base)
    # the objectives are checked against the raw inputs' statistics: H and G not shrunk
    report = prune(dense_model, tokenizer, prune_method="wanda", sparsity_ratio=0.5, objective="dense",
                   hessian_shrink=0.0, **FAST)
    prune(pruned_model, tokenizer, prune_method="wanda", sparsity_ratio=0.5, objective="pruned", hessian_shrink=0.0,
          **FAST)
    assert report["options"]["objective"] == "dense"
    rows = {x["name"]: x for x in report["layers"]}
    tokens = get_calibration("pydoc", tokenizer, FAST["nsamples"], FAST["seqlen"], 0)
    blocks = get_adapter(base).blocks
    checked = 0
    for i in range(len(blocks)):
        x_d = _linear_inputs(base, tokens, i)
        order = list(block_linears(blocks[i]))
        for rel, lin in block_linears(get_adapter(dense_model).blocks[i]).items():
            # the pruned path of a linear: the blocks before its block pruned, and in its block the linears of
            # the input groups before its own (q/k/v before o_proj, all but down_proj before it)
            group = next(g for g in input_groups(blocks[i]) if rel in g)
            earlier = order[:min(order.index(g) for g in group)]
            hybrid = copy.deepcopy(base)
            for j in range(i):
                get_adapter(hybrid).blocks[j].load_state_dict(get_adapter(dense_model).blocks[j].state_dict())
            for e in earlier:
                block_linears(get_adapter(hybrid).blocks[i])[e].weight.data.copy_(
                    block_linears(get_adapter(dense_model).blocks[i])[e].weight.data)
            x_p = _linear_inputs(hybrid, tokens, i)
            row = rows[f"model.layers.{i}.{rel}"]
            assert row["update"]["objective_kind"] == "dense"
            w = block_linears(blocks[i])[rel].weight.detach().double()
            new = lin.weight.detach().double()
            mask_only = w.masked_fill(new == 0, 0)
            n = x_p[rel].shape[0]

            def f(v):
                return float(((x_d[rel] @ w.T - x_p[rel] @ v.T) ** 2).sum() / n)

            assert row["objective"] == pytest.approx(f(new), rel=1e-3, abs=1e-7), row["name"]
            assert row["mask_objective"] == pytest.approx(f(mask_only), rel=1e-3, abs=1e-7), row["name"]
            assert row["update"]["dense_energy"] == pytest.approx(float((x_d[rel] @ w.T).square().sum() / n),
                                                                  rel=1e-4)
            if row["accepted"]:
                assert f(new) <= f(mask_only) * (1 + 1e-6), row["name"]
                checked += 1
    assert checked >= 15
    # block 0's q/k/v and gate/up... see the same inputs on both paths only where nothing before them is pruned:
    # q/k/v of block 0 (T = W up to rounding: the float32 pcg solves agree to 6e-4 of the largest weight);
    # every linear after them differs by 2e-2 or more
    params_d, params_p = dense_model.state_dict(), pruned_model.state_dict()
    for n in (n for n in params_p if n.endswith("proj.weight")):
        diff = float((params_d[n] - params_p[n]).abs().max() / params_p[n].abs().max())
        first = n.startswith("model.layers.0.self_attn.") and n.split(".")[-2] in ("q_proj", "k_proj", "v_proj")
        assert diff < 5e-3 if first else diff > 2e-2, (n, diff)


class _Crash:
    @hookimpl
    def optima_block_done(self, index, num_blocks, seconds):
        if index == 1:
            raise RuntimeError("power cut")


def test_a_crashed_dense_objective_run_resumes_bit_identical(tmp_path, tokenizer):
    base = tiny_model("llama")
    options = dict(FAST, objective="dense", sparsity_type="2:4")
    reference = copy.deepcopy(base)
    prune(reference, tokenizer, **options)
    ckpt = tmp_path / "ckpt"
    pm = get_plugin_manager()
    crash = _Crash()
    pm.register(crash)
    try:
        with pytest.raises(RuntimeError, match="power cut"):
            prune(copy.deepcopy(base), tokenizer, checkpoint_dir=str(ckpt), **options)
    finally:
        pm.unregister(crash)
    resumed = copy.deepcopy(base)
    assert prune(resumed, tokenizer, checkpoint_dir=str(ckpt), **options)["resumed_from_block"] == 2
    for (name, a), (_, b) in zip(resumed.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("options, match", [
    (dict(objective="dense", weight_update="none"), "--objective dense .* --weight_update none"),
    (dict(objective="dense", weight_update="native"), "--objective dense .* --weight_update native"),
    (dict(objective="dense", input_recalc=True), "--objective dense .* --input_recalc"),
    (dict(objective="dense", sink_tokens="exclude"), "--sink_tokens exclude .* --objective dense"),
    (dict(objective="dense", damp="auto"), "--damp auto .* --objective dense"),
    (dict(objective="output"), "--objective must be one of pruned, dense"),
])
def test_bad_objective_options(options, match):
    with pytest.raises(ValueError, match=match):
        resolve(PruneConfig(**options))
    resolve(PruneConfig(**{**options, "objective": "pruned"}))  # the same options with the default objective


def test_cli_flag_reaches_the_config():
    from optima_plugin.cli import build_parser

    assert build_parser().parse_args(["--objective", "dense"]).objective == "dense"
    assert build_parser().parse_args([]).objective == "pruned"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--objective", "other"])
