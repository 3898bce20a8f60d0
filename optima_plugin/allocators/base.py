"""What a sparsity allocator is and what it may look at.

Two kinds of allocators:

* layer allocators (``--allocation``: uniform, OWL, AlphaPruning) answer
  ``layer_ratios(context) -> {linear full name: ratio}`` once, before pruning;
* row allocators (``--use_trim``) answer ``row_ratios(weight, hessian, ratio,
  selector, config)`` per linear during pruning, turning the layer's ratio into
  ``(r,)`` per-row ratios that the selector then honours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterator, Mapping, Optional, Protocol

import torch
from torch import Tensor, nn

from ..config import PruneConfig
from ..models import block_linears
from ..pipeline import onloaded_block


@dataclass
class AllocationContext:
    """What a layer allocator may look at.

    Attributes:
        model: the model (dense, on CPU or its device).
        adapter: its :class:`~optima_plugin.models.ModelAdapter`.
        target: the requested mean sparsity.
        linears: ``{full name: nn.Linear}`` that will be pruned, in block order.
        config: the run's :class:`~optima_plugin.config.PruneConfig` (allocator
            options such as ``Lamda``, ``epsilon``: see :meth:`option`); None outside a run.
        tokens: ``(n, seqlen)`` calibration token ids, for allocators that need
            activations (OWL); None when not loaded.
        device: where block computations run.
        offload: whether blocks live on CPU and are onloaded one at a time.
        progress: whether to show progress bars.
        stream: the :class:`~optima_plugin.streaming.StreamedModel` when the blocks are on
            disk (their weights on the meta device): read them through :meth:`weights` or a
            :class:`~optima_plugin.pipeline.BlockPipeline` given this stream.
        dist: under torchrun, the job's :class:`~optima_plugin.distributed.Distributed`
            (``tokens`` are then all the windows; a statistics pass takes this rank's share
            and all-reduces its sums, so every rank allocates the same ratios); None otherwise.
    """

    model: nn.Module
    adapter: Any
    target: float
    linears: dict
    config: Any = None
    tokens: Optional[Tensor] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    offload: bool = False
    progress: bool = False
    stream: Any = None
    dist: Any = None

    def block_weights(self) -> Iterator[dict[str, Tensor]]:
        """``{full name: weight}`` of the linears to prune, one dict per block that has any, in block
        order; a streamed model's block is read from disk for its turn and freed after it."""
        for index, group in enumerate(linears_by_block(self)):
            if not group:
                continue
            with onloaded_block(self.adapter, index, None, stream=self.stream):
                yield {name: lin.weight.detach() for name, lin in group.items()}

    def weights(self) -> Iterator[tuple[str, Tensor]]:
        """``(full name, weight)`` of every linear to prune, in block order (see :meth:`block_weights`)."""
        for group in self.block_weights():
            yield from group.items()

    def option(self, name: str, defaults: Mapping[str, Any] = MappingProxyType({})) -> Any:
        """The option ``name`` (core or plugin-declared) of the config; without a config, its default:
        a core field's, or the one in ``defaults`` (the calling allocator's declared options).

        ``LookupError`` for a name that is neither a core option nor declared by a plugin.
        """
        if self.config is not None:
            return self.config.option(name)
        if name in defaults:
            return defaults[name]
        return PruneConfig().option(name)


class LayerAllocator(Protocol):
    """A layer allocator plugin (``--allocation``); linears it leaves out get the target."""

    name: str

    def layer_ratios(self, context: AllocationContext) -> dict:
        ...


@dataclass
class RowAllocation:
    """A row allocator's answer for one linear.

    Attributes:
        ratios: ``(r,)`` float64 per-row ratios in [0, 1), on the weight's device.
        stats: JSON-ready figures for the report (metric before/after, ...).
    """

    ratios: Tensor
    stats: dict = field(default_factory=dict)


class RowAllocator(Protocol):
    """A row allocator plugin (``--use_trim``)."""

    name: str

    def row_ratios(self, weight: Tensor, hessian: Tensor, ratio: float, selector: Any,
                   config: Any) -> RowAllocation:
        """Per-row ratios of one ``r x d`` layer whose mean is (about) ``ratio``."""
        ...


def linears_by_block(context: AllocationContext) -> list[dict[str, nn.Linear]]:
    """The context's linears grouped by decoder block: ``[{full name: linear}]``, one dict per block
    (empty for blocks with nothing to prune), in block order."""
    owner = {id(lin): name for name, lin in context.linears.items()}
    out = []
    for block in context.adapter.blocks:
        out.append({owner[id(lin)]: lin for lin in block_linears(block).values() if id(lin) in owner})
    return out


def ratio_span(ratios: Tensor, what: str, target: float, flag: str, value: float) -> tuple[float, float]:
    """``(min, max)`` of an allocator's ``ratios``; ``ValueError`` when they leave [0, 1), naming the allocator
    (``what``: e.g. "OWL block sparsities") and the option (``flag``, ``value``) to lower."""
    lo, hi = float(ratios.min()), float(ratios.max())
    if lo < 0 or hi >= 1:
        raise ValueError(f"{what} span [{lo:.3f}, {hi:.3f}], outside [0, 1) at --sparsity_ratio {target} and "
                         f"{flag} {value}; lower {flag}")
    return lo, hi


def row_summary(ratios: Tensor) -> dict:
    """``{min, max, mean, std}`` of ``(r,)`` per-row ratios, as floats (for the report)."""
    r = ratios.detach().double()
    return {"min": float(r.min()), "max": float(r.max()), "mean": float(r.mean()),
            "std": float(r.std(unbiased=False))}
