"""Attention-sink tokens in the streamed Hessians: --sink_tokens keep / exclude / cap and their figures."""

from __future__ import annotations

import copy

import pytest
import torch

from optima_plugin import prune
from optima_plugin.config import PruneConfig
from optima_plugin.validate import resolve
from optima_plugin.data import get_calibration
from optima_plugin.hessian import HessianAccumulator, SinkTokens
from optima_plugin.models import block_linears, get_adapter, input_groups
from optima_plugin.pipeline import BlockPipeline
from optima_plugin.testing import tiny_model, tiny_tokenizer

B, S, D = 3, 10, 8
#: (window, position) of the planted massive tokens: one at the sink position, two elsewhere
PLANTED = [(0, 0), (1, 4), (2, 7)]


def _planted(seed: int = 0) -> torch.Tensor:
    """``(B, S, D)`` float64 activations of unit scale with three tokens 60x larger."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, D, generator=g, dtype=torch.float64)
    for w, p in PLANTED:
        x[w, p] *= 60.0
    return x


def _mean_outer(rows: torch.Tensor) -> torch.Tensor:
    """The test's own ``mean x xᵀ`` in float64 (a plain sum of outer products)."""
    return sum(torch.outer(r, r) for r in rows) / rows.shape[0]


def _lower_median(values: torch.Tensor) -> float:
    v = sorted(values.tolist())
    return v[(len(v) - 1) // 2]


def _accumulate(mode, x, chunks=((0, 2), (2, 3)), **kw):
    acc = HessianAccumulator(torch.float64, SinkTokens(mode, **kw))
    for a, b in chunks:  # two forwards: the figures and H add up over them
        acc.add(x[a:b])
    return acc


def test_exclude_drops_the_first_position_and_the_planted_tokens_only():
    x = _planted()
    # the planted tokens are far above 100x their window's median, no other token is near it
    for w in range(B):
        sq = x[w].square().sum(-1)
        med = _lower_median(sq)
        assert {p for p in range(S) if sq[p] > 100 * med} == {p for v, p in PLANTED if v == w}
    acc = _accumulate("exclude", x)
    drop = {(w, 0) for w in range(B)} | set(PLANTED)
    kept = torch.stack([x[w, p] for w in range(B) for p in range(S) if (w, p) not in drop])
    assert acc.tokens == B * S - len(drop) == kept.shape[0]
    torch.testing.assert_close(acc.hessian, _mean_outer(kept), rtol=1e-12, atol=1e-12)
    # two positions excluded: positions 0 and 1 of every window and still the planted ones
    acc2 = _accumulate("exclude", x, positions=2)
    drop2 = drop | {(w, 1) for w in range(B)}
    kept2 = torch.stack([x[w, p] for w in range(B) for p in range(S) if (w, p) not in drop2])
    torch.testing.assert_close(acc2.hessian, _mean_outer(kept2), rtol=1e-12, atol=1e-12)


def test_figures_give_the_fraction_of_tokens_and_of_the_trace():
    x = _planted()
    drop = {(w, 0) for w in range(B)} | set(PLANTED)
    total = sum(float(x[w, p].square().sum()) for w in range(B) for p in range(S))
    held = sum(float(x[w, p].square().sum()) for w, p in drop)
    for mode in ("keep", "exclude", "cap"):
        stats = _accumulate(mode, x).sink_stats()
        assert stats["sink_tokens"] == mode
        assert (stats["tokens"], stats["flagged"], stats["by_position"], stats["by_norm"]) == (30, 5, 3, 2)
        assert stats["token_fraction"] == pytest.approx(5 / 30)
        assert stats["trace_fraction"] == pytest.approx(held / total, rel=1e-12)
        assert stats["trace_fraction"] > 0.9  # three tokens of 3600x the energy hold most of the trace
    assert _accumulate("cap", x).sink_stats()["capped"] == 3  # the small first tokens of windows 1, 2 stay
    assert HessianAccumulator(torch.float64).sink_stats() is None


def test_cap_rescales_the_massive_tokens_to_the_threshold_norm():
    x = _planted()
    factor = 100.0
    want = x.clone()
    for w, p in PLANTED:
        threshold = (factor * _lower_median(x[w].square().sum(-1))) ** 0.5
        want[w, p] = x[w, p] / x[w, p].norm() * threshold
        assert threshold < x[w, p].norm()
    acc = _accumulate("cap", x, factor=factor)
    assert acc.tokens == B * S
    torch.testing.assert_close(acc.hessian, _mean_outer(want.reshape(-1, D)), rtol=1e-12, atol=1e-12)
    # a smaller factor caps more: the planted tokens land on the new, lower threshold
    low = _accumulate("cap", x, factor=20.0)
    assert torch.trace(low.hessian) < torch.trace(acc.hessian)


def test_keep_is_todays_hessian_bit_for_bit():
    x = _planted().float()
    today = HessianAccumulator()
    keep = HessianAccumulator(sink=SinkTokens("keep"))
    for a, b in ((0, 1), (1, 3)):
        today.add(x[a:b])
        keep.add(x[a:b])
    assert torch.equal(today.hessian, keep.hessian) and today.tokens == keep.tokens == B * S


def test_a_two_dimensional_input_has_no_positions_only_the_norm_rule():
    x = _planted()
    flat = x.reshape(-1, D)  # as OPT's fc1/fc2 see their input: (batch * seqlen, d)
    acc = HessianAccumulator(torch.float64, SinkTokens("exclude"))
    acc.add(flat)
    kept = torch.stack([flat[i] for i in range(flat.shape[0]) if (i // S, i % S) not in PLANTED])
    torch.testing.assert_close(acc.hessian, _mean_outer(kept), rtol=1e-12, atol=1e-12)
    stats = acc.sink_stats()
    assert (stats["by_position"], stats["by_norm"]) == (0, 3)


@pytest.mark.parametrize("options,match", [
    (dict(sink_tokens="drop"), "--sink_tokens must be one of keep, exclude, cap"),
    (dict(sink_positions=-1), "--sink_positions must be an integer >= 0"),
    (dict(sink_positions=64, seqlen=64), "--sink_positions 64 would flag every token"),
    (dict(sink_factor=0.5), "--sink_factor must be a finite number >= 1"),
    (dict(sink_factor=float("inf")), "--sink_factor must be a finite number >= 1"),
])
def test_bad_sink_options_fail_validation(options, match):
    with pytest.raises(ValueError, match=match):
        resolve(PruneConfig(nsamples=4, **options))


def test_the_pipeline_passes_the_setting_and_keep_changes_nothing():
    model = tiny_model("llama")
    tokens = get_calibration("pydoc", tiny_tokenizer(), 4, 32, 0)
    got = {}
    for sink in (None, SinkTokens("keep"), SinkTokens("exclude")):
        pipe = BlockPipeline(get_adapter(model), device=torch.device("cpu"), batch_size=2, sink=sink)
        pipe.capture(tokens)
        with pipe.onloaded(0) as block:
            todo = block_linears(block)
            got[sink.mode if sink else None] = (pipe.hessians(0, block, todo, input_groups(block), torch.float32),
                                                pipe.hessian_stats)
    assert got[None][1] == {}
    for rel, h in got[None][0].items():
        assert torch.equal(h, got["keep"][0][rel])
        assert not torch.equal(h, got["exclude"][0][rel])
        stats = got["exclude"][1][rel]
        assert stats["tokens"] == tokens.numel() and stats["by_position"] == tokens.shape[0]
        assert got["keep"][1][rel]["flagged"] == stats["flagged"]


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_prune_model_runs_and_reports_with_each_mode(arch):
    tok = tiny_tokenizer()
    base = tiny_model(arch)
    weights = {}
    for mode in ("keep", "exclude", "cap"):
        model = copy.deepcopy(base)
        report = prune(model, tok, nsamples=4, seqlen=32, calibration_dataset="pydoc", sink_tokens=mode,
                       sink_factor=4.0, progress=False)
        assert report["options"]["sink_tokens"] == mode
        for layer in report["layers"]:
            stats = layer["hessian_stats"]
            assert stats["sink_tokens"] == mode and stats["tokens"] == 4 * 32, layer["name"]
            two_d = arch == "opt" and layer["name"].endswith(("fc1", "fc2"))  # (batch * seqlen, d) inputs
            assert stats["by_position"] == (0 if two_d else 4), layer["name"]
            assert stats["token_fraction"] < 1 and stats["trace_fraction"] < 1
            assert two_d or (stats["token_fraction"] >= 4 / 128 and stats["trace_fraction"] > 0)
            assert layer["error_ratio"] is not None and layer["error_ratio"] <= 1.0
        weights[mode] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for other in ("exclude", "cap"):
        assert any(not torch.equal(weights["keep"][n], weights[other][n]) for n in weights["keep"])


def test_no_norm_rule_where_the_median_token_is_zero():
    x = torch.zeros(1, S, D, dtype=torch.float64)
    x[0, 0, 0], x[0, 3, 1] = 5.0, 2.0  # most tokens are zero: the median is 0, no threshold to cap at
    keep, cap, exclude = (_accumulate(mode, x, chunks=((0, 1),)) for mode in ("keep", "cap", "exclude"))
    assert torch.equal(cap.hessian, keep.hessian) and cap.sink_stats()["capped"] == 0
    kept = x[0, 1:]
    torch.testing.assert_close(exclude.hessian, _mean_outer(kept), rtol=1e-12, atol=1e-12)
    assert exclude.sink_stats()["by_norm"] == 0 and exclude.sink_stats()["trace_fraction"] == pytest.approx(25 / 29)
