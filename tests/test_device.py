"""GPU readiness without a GPU: every tensor a layer's solve creates is on the layer's device.

Each case prunes one linear (:func:`optima_plugin.engine._prune_linear`, as ``_prune_one`` calls it) whose
weights and statistics are :class:`devicecheck.FakeCuda` tensors under :class:`devicecheck.DeviceCheck`: a
tensor made without ``device=`` (a plain CPU tensor) that meets the layer's tensors fails the case.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from devicecheck import DeviceCheck, FakeCuda, fake

CASES = [
    dict(prune_method="magnitude", solver="pcg"),
    dict(prune_method="wanda", solver="direct"),
    dict(prune_method="wanda", solver="pdhg"),
    dict(prune_method="wanda", solver="adam", max_iter=20),
    dict(prune_method="sparsegpt", weight_update="native"),
    dict(prune_method="thanos", weight_update="native"),
    dict(prune_method="wanda", weight_update="none"),
    dict(prune_method="sparsegpt", sparsity_type="2:4", solver="pcg"),
    dict(prune_method="wanda", use_trim=True),
    dict(prune_method="wanda", refine_mask="swap", refine_iters=2),
    dict(prune_method="wanda", refine_mask="admm", refine_iters=2),
    dict(prune_method="wanda", damp="auto", nsamples=8),
    dict(prune_method="wanda", hessian_shrink=0.3),
    dict(prune_method="wanda", double_precision=True),
    dict(prune_method="wanda", quantize_weight=True, quantizer="gptq", group_size=8),
    dict(prune_method="wanda", quantize_weight=True, quantizer="absmax", lora_rank=0.25),
    dict(prune_method="wanda", lora_rank=0.25, lowrank="slim"),
    dict(prune_method="wanda", quantize_weight=True, quantizer="slim", scale_important_weights=True),
    dict(prune_method="sparsegpt", quantize_weight=True, act_order=True, lora_rank=0.25, quantize_lora=True,
         lora_tile_size=16),
    dict(prune_method="wanda", objective="dense", hessian_shrink=0.3),
]


def _layer(options: dict):
    """``(name, linear, stats, work)`` of one 24 x 32 linear, its weights and statistics FakeCuda tensors."""
    from optima_plugin import engine
    from optima_plugin.compress import Compression
    from optima_plugin.damping import HeldOutHessian, layer_inputs
    from optima_plugin.objective import DenseTerms
    from optima_plugin.hessian import layer_shrink, shrink_to_diagonal
    from optima_plugin.plugins import lookup
    from optima_plugin.updaters import UpdateOptions
    from optima_plugin.validate import resolve

    config = resolve(**options)
    torch.manual_seed(0)
    d, r, n = 32, 24, 256
    x = torch.randn(n, d) @ (torch.eye(d) + torch.randn(d, d) / 4)
    lin = nn.Linear(d, r, bias=False)
    weight = fake(torch.randn(r, d) / 8)
    del lin.weight
    lin.weight = weight  # a plain attribute: a Parameter cannot be a FakeCuda tensor
    hessian = fake(x.T @ x / n)
    if config.damp == "auto" or str(config.damp) == "auto":
        hessian = HeldOutHessian(fake(x[::2].T @ x[::2] / (n // 2)), fake(x[1::2].T @ x[1::2] / (n // 2)),
                                 n // 2, n // 2)
    work = engine.LinearWork(lookup("selectors", config.prune_method, ""),
                             lookup("updaters", config.weight_update, ""),
                             UpdateOptions(config.solver, config.damp, config.tol, config.max_iter,
                                           config.double_precision),
                             config.pattern, Compression.from_config(config, lookup), config,
                             lookup("row_allocators", config.row_allocation, "") if config.row_allocation else None)
    true_hessian, layer_options = layer_inputs(hessian, work.options)
    shrink = layer_shrink(config.hessian_shrink, config.sparsity_ratio)
    solved = shrink_to_diagonal(true_hessian, shrink)
    terms = solved_terms = None
    if config.objective == "dense":  # the dense model's inputs: the pruned ones plus noise
        xd = x + torch.randn(n, d) / 4
        terms = DenseTerms(true_hessian, fake(x.T @ xd / n), fake((xd @ weight.as_subclass(torch.Tensor).T).square().mean(0)), n)
        solved_terms = replace(terms, hessian=solved, cross=shrink_to_diagonal(terms.cross, shrink)) \
            if shrink else terms
    stats = engine.LayerStats(solved, config.sparsity_ratio, solved_terms, true_hessian if shrink else None,
                              terms if shrink else None)
    return lin, stats, replace(work, options=layer_options)


@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_layer_solve_stays_on_the_layer_device(options):
    from optima_plugin import engine

    with DeviceCheck() as check:
        lin, stats, work = _layer(options)
        engine._prune_linear("layer", 0, lin, stats, work)
    assert not check.mixed, "\n".join(check.mixed[:3])
    assert isinstance(lin.weight, FakeCuda)


def test_devicecheck_catches_a_cpu_tensor():
    """The checker itself: ``torch.eye(d)`` without ``device=`` meeting the layer's weights is found."""
    weight = fake(torch.randn(4, 4))
    with DeviceCheck() as check:
        ok = weight @ torch.eye(4, device=weight.device, dtype=weight.dtype) + torch.tensor(1.0)
        assert not check.mixed and isinstance(ok, FakeCuda) and ok.device.type == "cuda"
        weight @ torch.eye(4)
    assert len(check.mixed) == 1 and "cpu tensor" in check.mixed[0]
