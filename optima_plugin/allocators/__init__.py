"""Sparsity allocators: how much of each linear layer to prune.

An allocator has a ``name`` and ``layer_ratios(context) -> {linear name: ratio}``;
linears it leaves out get the target ratio. Uniform is built in; OWL,
AlphaPruning and TRIM come as further allocators.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class AllocationContext:
    """What an allocator may look at.

    Attributes:
        model: the model (dense, on CPU or its device).
        adapter: its :class:`~optima_plugin.models.ModelAdapter`.
        target: the requested mean sparsity.
        linears: ``{full name: nn.Linear}`` that will be pruned, in block order.
    """

    model: nn.Module
    adapter: object
    target: float
    linears: dict


class UniformAllocator:
    name = "uniform"

    def layer_ratios(self, context: AllocationContext) -> dict:
        return {name: context.target for name in context.linears}


BUILTIN_ALLOCATORS = [UniformAllocator()]
