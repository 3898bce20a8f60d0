"""Nothing computed that is not needed (issue 27 item 2): ``--sparsity_ratio 0`` runs no selection and no
weight update; the compression stage still quantizes the dense weights with the layer's own ``H``."""

from __future__ import annotations

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
