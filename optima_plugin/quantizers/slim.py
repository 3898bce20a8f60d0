"""SLiM-Quant: the clipping cap that minimises quantization plus clipping error.

AbsMax spends the grid on the largest weight; a cap ``α < max |w|`` rounds the bulk of
the weights more finely and clips the few above it. SLiM-Quant picks ``α`` minimising
the expected squared error over the weight-magnitude distribution:
``Σ_{|w| ≤ α} (w - round_α(w))² + Σ_{|w| > α} (|w| - α)²``. Here the distribution is the
empirical one of each group's kept weights, and ``α`` is searched on a grid of
``GRID`` fractions of ``max |w|`` (1 included, so the answer is never worse than AbsMax
on this error). Hessian-free, like the reference's.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .base import QuantOptions, Quantized, QuantState
from .grid import absmax_scale, grouped, quantize_grouped, round_to_grid

#: candidate caps as fractions of each group's max |w|
GRID = torch.linspace(0.3, 1.0, 71)


def clipped_scale(weight: Tensor, pruned: Tensor, bits: int, group: int) -> tuple[Tensor, Tensor]:
    """``(scale, fraction)``, both ``r x g``: each group's error-minimising scale and its cap as a fraction
    of ``max |w|`` (1 for an all-zero group). ``weight`` ``r x d``; ``pruned`` entries are left out."""
    base = absmax_scale(weight, bits, group)  # r x g
    w = grouped(weight.float().masked_fill(pruned, 0.0), group)  # r x g x s
    best_err = torch.full_like(base, float("inf"))
    best = base.clone()
    for frac in GRID.tolist():
        scale = base * frac
        err = (round_to_grid(w, scale.unsqueeze(2), bits) - w).square().sum(dim=2)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, scale, best)
    return best, torch.where(base > 0, best / base.clamp_min(1e-30), torch.ones_like(base))


class SlimQuantizer:
    name = "slim"
    needs_hessian = False

    def quantize(self, weight: Tensor, pruned: Tensor, hessian: Optional[Tensor], options: QuantOptions) -> Quantized:
        group = options.group(weight.shape[1])
        scale, frac = clipped_scale(weight, pruned, options.bits, group)
        new = quantize_grouped(weight, scale, options.bits, group).masked_fill(pruned, 0.0)
        return Quantized(new.to(weight.dtype), QuantState(options.bits, group, scale),
                         {"mean_clip_fraction": float(frac.mean())})
