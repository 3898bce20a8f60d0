"""Nothing computed that is not needed (issue 27 item 2): ``--sparsity_ratio 0`` runs no selection and no
weight update; the compression stage still quantizes the dense weights with the layer's own ``H``."""

from __future__ import annotations

import pytest
import torch

from optima_plugin import prune
from optima_plugin.plugins import lookup
from optima_plugin.quantizers import QuantOptions, quant_state
from optima_plugin.testing import tiny_model, tiny_tokenizer

FAST = dict(nsamples=4, seqlen=64, calibration_dataset="pydoc", progress=False)


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def test_ratio_zero_quantize_only_selects_and_updates_nothing(monkeypatch):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    dense = {n: lin.weight.detach().clone() for n, lin in _linears(model).items()}
    selector, updater, quantizer = (lookup("selectors", "sparsegpt", ""), lookup("updaters", "optima", ""),
                                    lookup("quantizers", "gptq", ""))
    calls = {"select": 0, "update": 0}
    seen = []  # (weight given to the quantizer, its pruned mask, its H)
    select, update, quantize = selector.select, updater.update, quantizer.quantize

    def counted_select(*a, **k):
        calls["select"] += 1
        return select(*a, **k)

    def counted_update(*a, **k):
        calls["update"] += 1
        return update(*a, **k)

    def recorded_quantize(weight, pruned, hessian, options):
        seen.append((weight.clone(), pruned.clone(), hessian.clone(), options))
        return quantize(weight, pruned, hessian, options)

    monkeypatch.setattr(selector, "select", counted_select)
    monkeypatch.setattr(updater, "update", counted_update)
    monkeypatch.setattr(quantizer, "quantize", recorded_quantize)
    report = prune(model, tok, prune_method="sparsegpt", sparsity_ratio=0.0, quantize_weight=True, quantizer="gptq",
                   bitwidth=4, group_size=16, **FAST)
    assert calls == {"select": 0, "update": 0}
    linears = _linears(model)
    assert len(seen) == len(linears) == len(report["layers"])
    for layer, (weight, pruned, hessian, options) in zip(report["layers"], seen):
        name = layer["name"]
        # the quantizer got the dense weights untouched and an all-False mask: what the old path fed it
        # (an update with nothing pruned leaves the weights as they are)
        assert torch.equal(weight, dense[name]) and not pruned.any()
        assert isinstance(options, QuantOptions) and options.bits == 4
        expected = quantize(dense[name], torch.zeros_like(pruned), hessian, options).weight
        assert torch.equal(linears[name].weight.detach(), expected)
        assert quant_state(linears[name]) is not None
        assert layer["accepted"] is True and layer["ratio"] == 0.0 and layer["sparsity"] == 0.0
        assert layer["objective"] == 0.0 and layer["mask_objective"] == 0.0 and layer["error_ratio"] == 0.0
    assert report["summary"]["rejected_updates"] == 0 and report["summary"]["layers"] == len(linears)


@pytest.mark.parametrize("options", [dict(), dict(input_recalc=True), dict(objective="dense"), dict(stream=True)],
                         ids=["default", "input_recalc", "dense", "stream"])
def test_each_input_group_accumulates_one_hessian_shared_by_its_linears(options, monkeypatch, tmp_path):
    from optima_plugin import engine, pipeline
    from optima_plugin.streaming import open_streamed

    tok = tiny_tokenizer()
    model = tiny_model("llama")
    run = dict(FAST, prune_method="wanda", sparsity_ratio=0.5)
    if options.get("stream"):
        source = tmp_path / "src"
        model.save_pretrained(source, max_shard_size="100KB")
        tok.save_pretrained(source)
        model, _ = open_streamed(str(source))
        options = dict(save_model=str(tmp_path / "out"))
    accumulated = []  # the linears whose input a Hessian (or H + cross term) accumulator hooks, pass by pass
    given = {}  # (block, rel) -> the H object the linear was pruned with
    hooked, prune_one = pipeline.hooked, engine._prune_one

    def counting_hooked(modules, make, *args, **kwargs):
        if type(make()).__name__ != "OutputEnergy":  # --objective dense: each linear's output energy is its own
            accumulated.extend(modules)
        return hooked(modules, make, *args, **kwargs)

    def recording_prune_one(run_, pipe, block, rel, hessian, true_terms):
        given[block.index, rel] = hessian
        return prune_one(run_, pipe, block, rel, hessian, true_terms)

    monkeypatch.setattr(pipeline, "hooked", counting_hooked)
    monkeypatch.setattr(engine, "_prune_one", recording_prune_one)
    prune(model, tok, **run, **options)
    blocks = sorted({b for b, _ in given})
    assert len(blocks) == 3
    owners = ["mlp.down_proj", "mlp.gate_proj", "self_attn.o_proj", "self_attn.q_proj"]
    assert sorted(accumulated) == sorted(owners * len(blocks))  # one accumulation per distinct input per block
    for b in blocks:
        q = given[b, "self_attn.q_proj"]
        assert given[b, "self_attn.k_proj"] is q and given[b, "self_attn.v_proj"] is q
        assert given[b, "mlp.up_proj"] is given[b, "mlp.gate_proj"]
        assert given[b, "self_attn.o_proj"] is not q and given[b, "mlp.down_proj"] is not given[b, "mlp.gate_proj"]


@pytest.mark.parametrize("shrink, per_layer", [(0.0, 0), (0.2, 2)])
def test_objectives_are_computed_once_per_layer(shrink, per_layer, monkeypatch):
    """The OPTIMA update measures its own objective and mask objective on the H it solved with; unshrunk, those
    are the headline figures (no r x d x d product more); shrunk, the headline ones on the true H are one
    product each (update and mask alone), never repeated."""
    from optima_plugin import engine

    calls = []
    error = engine.reconstruction_error
    monkeypatch.setattr(engine, "reconstruction_error", lambda *a: calls.append(1) or error(*a))
    report = prune(tiny_model("llama"), tiny_tokenizer(), prune_method="wanda", sparsity_ratio=0.5,
                   weight_update="optima", hessian_shrink=shrink, **FAST)
    assert len(calls) == per_layer * len(report["layers"])
    assert all(x["objective"] is not None and x["mask_objective"] > 0 for x in report["layers"])


def test_masks_from_a_file_still_prune_at_ratio_zero(tmp_path):
    """``--prune_method file`` ignores ``--sparsity_ratio``: at ratio 0 its masks are still applied."""
    path = tmp_path / "masks.safetensors"
    prune(tiny_model("llama"), tiny_tokenizer(), prune_method="wanda", save_masks=str(path), **FAST)
    model = tiny_model("llama")
    report = prune(model, tiny_tokenizer(), prune_method="file", mask_checkpoint=str(path), sparsity_ratio=0.0,
                   **FAST)
    assert all(abs(x["sparsity"] - 0.5) < 0.05 for x in report["layers"])  # the file's 50% masks
    assert all(float((lin.weight == 0).float().mean()) >= 0.45 for lin in _linears(model).values())
