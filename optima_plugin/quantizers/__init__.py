"""Quantizers: fake quantization of a pruned linear's weights, after its weight update.

A quantizer has ``name``, ``needs_hessian`` and
``quantize(weight, pruned, hessian, options) -> Quantized`` (``weight`` ``r x d`` with pruned
entries 0, ``pruned`` bool ``r x d`` True = pruned, ``hessian`` ``d x d`` or None,
``options`` a :class:`QuantOptions`); the result's pruned entries are 0 and every entry
is ``scale * q`` (see ``base.py``). Plugins add quantizers through the
``optima_quantizers`` hook.

* ``absmax``: round to nearest, scale ``max |w| / qmax`` per row or group;
* ``slim``: round to nearest with SLiM-Quant's error-minimising clipping cap;
* ``gptq``: OPTQ with the layer Hessian, mask-preserving.
"""

from __future__ import annotations

from ..options import OptionParser
from .absmax import AbsMaxQuantizer
from .base import QUANT_ATTR, QuantOptions, Quantized, QuantState, quant_state
from .gptq import GPTQQuantizer
from .scaling import quantize_scaled
from .slim import SlimQuantizer

BUILTIN_QUANTIZERS = [AbsMaxQuantizer(), SlimQuantizer(), GPTQQuantizer()]


def addoption(parser: OptionParser) -> None:
    group = parser.getgroup("quantization", "quantization (--quantize_weight; fake-quantized after the weight update)")
    group.addoption("quantize_weight", type=bool, help="quantize every pruned linear's weights after its update")
    group.addoption("quantizer", type=str, default="gptq",
                    help="absmax, slim (SLiM-Quant's clipping), gptq (OPTQ with the layer Hessian; keeps the mask) "
                    "or a plugin's")
    group.addoption("bitwidth", type=int, default=4, help="bits per weight (symmetric integers)",
                    check=lambda v: 2 <= v <= 8, requirement="must be in 2..8")
    group.addoption("group_size", type=int, default=0,
                    help="input columns per scale (0: one scale per output row)",
                    check=lambda v: v >= 0, requirement="must be >= 0 (0: one scale per row)")
    group.addoption("act_order", type=bool, help="gptq: quantize columns by decreasing Hessian diagonal")
    group.addoption("scale_important_weights", type=bool,
                    help="AWQ-style: scale the most activated input columns up before quantizing, by "
                    "(activation norm)^alpha with alpha searched to minimise the layer objective")


__all__ = ["BUILTIN_QUANTIZERS", "QUANT_ATTR", "AbsMaxQuantizer", "GPTQQuantizer", "QuantOptions", "QuantState",
           "Quantized", "SlimQuantizer", "addoption", "quant_state", "quantize_scaled"]
