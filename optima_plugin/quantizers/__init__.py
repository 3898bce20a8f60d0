"""Quantizers: fake quantization of a pruned linear's weights (see ``base.py``)."""

from .base import QUANT_ATTR, Quantized, QuantState, quant_state

__all__ = ["QUANT_ATTR", "QuantState", "Quantized", "quant_state"]
