"""The dense statistics pass of activation-aware layer allocators (OWL).

Calibration inputs go through the *dense* blocks once, before pruning: block-0
inputs are captured, then each block is onloaded, run once over all windows with
forward hooks that sum ``x_j²`` per input column of each of its linears, and its
outputs become the next block's inputs in the same pass (the shared
:class:`~optima_plugin.pipeline.BlockPipeline`, an ``outputs=True`` statistics
pass). Under torchrun each rank passes its share of the windows and the sums are
all-reduced, so every rank gets the single-process norms. Cost: one dense forward of the calibration set through the decoder blocks (no Hessians, ``O(tokens · d)`` per hook), about a
third of the pruning passes' forward work; memory: the ``(n, seqlen, hidden)``
block inputs once more, freed before pruning starts.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..pipeline import BlockPipeline
from .base import AllocationContext, linears_by_block

log = logging.getLogger(__name__)


class ColumnNorms:
    """Running mean of ``x_j²`` per input column (the Hessian's diagonal, without the Hessian)."""

    def __init__(self) -> None:
        self.sum: Tensor | None = None
        self.tokens = 0

    def hook(self, module: nn.Module, inputs: tuple, output) -> None:
        x = inputs[0].detach()
        x = x.reshape(-1, x.shape[-1]).float()
        s = x.pow(2).sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.tokens += x.shape[0]

    def all_reduce(self, dist, d: int) -> None:
        """Sum the sums and token counts of every rank (each passed its share of the windows)."""
        self.sum = dist.sum_(self.sum if self.sum is not None else torch.zeros(d))
        self.tokens = int(dist.sum_(torch.tensor([float(self.tokens)], dtype=torch.float64)))

    @property
    def mean(self) -> Tensor:
        """``(d,)`` float32 mean squared input per column."""
        if self.sum is None:
            raise RuntimeError("no inputs were seen by this linear")
        return self.sum / max(self.tokens, 1)


def dense_input_norms(context: AllocationContext) -> dict[str, Tensor]:
    """``{full name: (d,) float32 mean x_j² on CPU}`` for every linear of the context.

    Runs the calibration tokens through the dense model (see the module docstring
    for the cost). ``ValueError`` when the context has no tokens.
    """
    if context.tokens is None:
        raise ValueError("this allocator needs calibration tokens (AllocationContext.tokens); "
                         "run it through prune() or pass tokens")
    storage = torch.device("cpu") if context.offload else torch.device(context.device)
    pipe = BlockPipeline(context.adapter, device=context.device, batch_size=context.option("batch_size"),
                         storage=storage, stream=context.stream, dist=context.dist)
    pipe.capture(context.tokens)
    norms: dict[str, Tensor] = {}
    groups = linears_by_block(context)
    last = max((i for i, g in enumerate(groups) if g), default=-1)

    def on_block(i: int, block: nn.Module) -> None:  # the pass also advances the inputs (outputs=True)
        accs = pipe.statistics(i, block, groups[i], ColumnNorms, outputs=True)
        norms.update({name: acc.mean.cpu() for name, acc in accs.items()})

    pipe.run(tqdm(range(last + 1), desc="dense statistics", unit="block", disable=not context.progress), on_block,
             propagate=False)
    return norms
