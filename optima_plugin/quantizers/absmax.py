"""AbsMax: round to nearest on the grid whose largest integer meets each group's largest |w|."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .base import QuantOptions, Quantized, QuantState
from .grid import absmax_scale, quantize_grouped


class AbsMaxQuantizer:
    name = "absmax"
    needs_hessian = False

    def quantize(self, weight: Tensor, pruned: Tensor, hessian: Optional[Tensor], options: QuantOptions) -> Quantized:
        group = options.group(weight.shape[1])
        scale = absmax_scale(weight, options.bits, group)
        new = quantize_grouped(weight, scale, options.bits, group).masked_fill(pruned, 0.0)
        return Quantized(new.to(weight.dtype), QuantState(options.bits, group, scale))
