"""What a quantizer returns, and what a quantized linear carries afterwards.

Quantization here is *fake* quantization: the weights stay float tensors whose every
entry is exactly ``scale[row, group] * q`` with ``q`` an integer of ``bits`` bits,
symmetric (``-2**(bits-1) <= q <= 2**(bits-1) - 1``), no zero point. Pruned entries
are ``q = 0``. A quantized :class:`torch.nn.Linear` carries a :class:`QuantState`
as the attribute :data:`QUANT_ATTR` (not in its ``state_dict``), so that a saver
(``--save_format compressed-tensors``) writes the integers and scales exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

#: the attribute of a quantized linear holding its :class:`QuantState`
QUANT_ATTR = "optima_quant"


@dataclass
class QuantState:
    """How a linear's weight is quantized.

    ``scale``: float32 ``r x g`` (``g = ceil(d / group_size)``), one scale per row and
    group of ``group_size`` consecutive input columns (``group_size = d``: one per row).
    ``input_scale``: None, or float32 ``(d,)`` with ``--scale_important_weights``: the weight
    is then ``q * scale / input_scale`` (per input column; a server must fold ``1 / input_scale``
    into the layer's input).
    """

    bits: int
    group_size: int
    scale: Tensor
    input_scale: Optional[Tensor] = None

    def integers(self, weight: Tensor) -> Tensor:
        """The int8 ``r x d`` integers ``q`` of ``weight`` (``weight = q * scale [/ input_scale]``, rounded)."""
        r, d = weight.shape
        scale = self.scale.float().repeat_interleave(self.group_size, dim=1)[:, :d]
        if self.input_scale is not None:
            weight = weight.float() * self.input_scale.float().to(weight.device)
        q = torch.where(scale > 0, weight.float() / scale.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        return q.round().clamp(-(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1).to(torch.int8)


@dataclass
class QuantOptions:
    """A quantizer's settings: ``bits`` (2..8), ``group_size`` (input columns per scale; 0 = one scale
    per row), ``act_order`` (GPTQ: columns by decreasing ``H_jj``) and the Hessian's relative ``damp``."""

    bits: int = 4
    group_size: int = 0
    act_order: bool = False
    damp: float = 0.01

    def group(self, columns: int) -> int:
        """The group size for a layer of ``columns`` inputs (``group_size = 0`` or wider: all of them)."""
        return columns if self.group_size <= 0 else min(self.group_size, columns)


@dataclass
class Quantized:
    """A quantizer's answer: ``weight`` (``r x d``, the input's dtype, pruned entries 0, every entry
    ``scale * q``), its :class:`QuantState` and the quantizer's figures."""

    weight: Tensor
    state: QuantState
    stats: dict = field(default_factory=dict)


def quant_state(module: nn.Module) -> Optional[QuantState]:
    """The :class:`QuantState` of a quantized linear, or None."""
    return getattr(module, QUANT_ATTR, None)
