"""``--scale_important_weights``: AWQ-style scaling of the most activated input columns before quantizing.

Quantizing ``W' = W diag(s)`` and using ``Ŵ = Q(W') diag(s)⁻¹`` gives the columns with large
activations (``s_j > 1``) a finer grid. With ``s_j = (sqrt(H_jj) / mean)^α`` (AWQ's form, the
activation scale from the Hessian's diagonal), the layer objective of ``Ŵ`` under ``H`` equals
that of ``Q(W')`` under ``H' = diag(s)⁻¹ H diag(s)⁻¹``, which is what the quantizer is given (so
GPTQ compensates in the scaled space). ``α`` is searched on :data:`ALPHAS`, 0 included (plain
quantization), keeping the lowest objective: never worse than without scaling on that objective.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..solvers.problem import objective_per_row
from .base import QuantOptions, Quantized, QuantState

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def column_scales(hessian: Tensor, alpha: float) -> Tensor:
    """``(d,)`` float32 ``(sqrt(H_jj) / mean over live inputs)^alpha``; dead inputs (``H_jj = 0``) get 1."""
    norm = hessian.diagonal().float().clamp_min(0).sqrt()
    live = norm > 0
    base = torch.ones_like(norm)
    if live.any():
        base[live] = norm[live] / norm[live].mean()
    return base.pow(alpha)


def quantize_scaled(quantizer, weight: Tensor, pruned: Tensor, hessian: Optional[Tensor],
                    options: QuantOptions) -> Quantized:
    """``quantizer`` on ``W diag(s)`` for each ``α`` of :data:`ALPHAS`; the lowest ``tr(ΔW H ΔWᵀ)`` wins.

    ``weight``: ``r x d`` (pruned entries 0); ``hessian``: ``d x d``, required. The result's
    :class:`QuantState` carries ``input_scale = s`` (None when ``α = 0`` won); its stats add ``alpha``.
    """
    if hessian is None:
        raise ValueError("--scale_important_weights needs the layer's Hessian")
    h = hessian.float().to(weight.device)
    best, best_obj = None, float("inf")
    for alpha in ALPHAS:
        s = column_scales(h, alpha).to(weight.device)
        scaled = (weight.float() * s).to(weight.dtype)
        result = quantizer.quantize(scaled, pruned, h / s.unsqueeze(0) / s.unsqueeze(1), options)
        new = result.weight.float() / s
        obj = float(objective_per_row(h, new - weight.float()).sum())
        if obj < best_obj:
            state = QuantState(result.state.bits, result.state.group_size, result.state.scale,
                               s if alpha else None)
            best, best_obj = Quantized(new.to(weight.dtype), state, {**result.stats, "alpha": alpha}), obj
    return best
