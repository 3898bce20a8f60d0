"""Sparsity allocators: how much of each linear layer (and of each of its rows) to prune.

A layer allocator has a ``name`` and ``layer_ratios(context) -> {linear name: ratio}``;
linears it leaves out get the target ratio. Built in: ``uniform``, ``owl``
(:mod:`.owl`), ``alphapruning`` (:mod:`.alphapruning`). A row allocator
(``--use_trim``: ``trim``, :mod:`.trim`) then splits each layer's ratio over the
layer's rows. See :mod:`.base` for the interfaces.
"""

from __future__ import annotations

import logging
from pathlib import Path

from . import alphapruning, owl, trim
from .alphapruning import AlphaPruningAllocator
from .base import AllocationContext, LayerAllocator, RowAllocation, RowAllocator, linears_by_block, row_summary
from .owl import OwlAllocator
from .ratio_file import check_suffix, load_layer_ratios, save_layer_ratios
from .trim import TrimRowAllocator

log = logging.getLogger(__name__)


class UniformAllocator:
    name = "uniform"

    def layer_ratios(self, context: AllocationContext) -> dict:
        return {name: context.target for name in context.linears}


#: how far a ratio file's mean may be from --sparsity_ratio (OWL/AlphaPruning files keep it to ~1e-6)
RATIO_FILE_TOLERANCE = 0.01


def weighted_mean(ratios: dict, linears: dict) -> float:
    """The mean of ``{name: ratio}`` weighted by each linear's number of weights (the overall sparsity)."""
    sizes = {name: linears[name].weight.numel() for name in ratios}
    return sum(ratios[n] * sizes[n] for n in ratios) / max(1, sum(sizes.values()))


def resolve_layer_ratios(allocator, context: AllocationContext) -> dict:
    """``{linear full name: ratio}`` for every linear of ``context``.

    Loads them from ``config.load_layer_ratio`` when set (the allocator is not
    run), else asks ``allocator``; fills linears it leaves out with the target;
    checks every ratio is in [0, 1); saves to ``config.save_layer_ratio`` when set.
    """
    load = context.option("load_layer_ratio")
    if load:
        ratios = load_layer_ratios(load, context)
        mean = weighted_mean(ratios, context.linears)
        if abs(mean - context.target) > RATIO_FILE_TOLERANCE:
            raise ValueError(f"--load_layer_ratio {load}: the ratios' mean sparsity (weighted by layer size) is "
                             f"{mean:.4f} but --sparsity_ratio is {context.target:g}"
                             + ("; does the file hold densities? use 1 - values" if abs(1 - mean - context.target)
                                <= RATIO_FILE_TOLERANCE else ""))
        log.info("layer ratios loaded from %s (the %s allocator is not run)", load, allocator.name)
    else:
        ratios = allocator.layer_ratios(context)
    ratios = {name: float(ratios.get(name, context.target)) for name in context.linears}
    bad = [(n, r) for n, r in ratios.items() if not 0.0 <= r < 1.0]
    if bad:
        raise ValueError(f"layer ratio {bad[0][1]:.4f} of {bad[0][0]} is outside [0, 1) "
                         f"({len(bad)} such layers); check the allocator's options or --load_layer_ratio")
    save = context.option("save_layer_ratio")
    if context.dist is not None and not context.dist.is_main():
        save = None  # under torchrun every rank holds the same ratios; rank 0 writes them
    if save:
        save_layer_ratios(save, ratios, allocation=allocator.name, target=context.target)
    return ratios


BUILTIN_ALLOCATORS = [UniformAllocator(), OwlAllocator(), AlphaPruningAllocator()]
BUILTIN_ROW_ALLOCATORS = [TrimRowAllocator()]

__all__ = ["AllocationContext", "AlphaPruningAllocator", "BUILTIN_ALLOCATORS", "BUILTIN_ROW_ALLOCATORS",
           "LayerAllocator", "OwlAllocator", "RowAllocation", "RowAllocator", "TrimRowAllocator",
           "UniformAllocator", "linears_by_block", "resolve_layer_ratios", "row_summary"]


#: The hosts' (TRIM/OWL/AlphaPruning) combined method names: selector + allocation.
HOST_METHODS = {
    "wanda_owl": ("wanda", "owl"),
    "wanda_alpha": ("wanda", "alphapruning"),
    "magnitude_owl": ("magnitude", "owl"),
    "magnitude_alpha": ("magnitude", "alphapruning"),
}


def validate_config(config) -> dict:
    """Host method aliases (``wanda_owl`` = wanda + OWL, ...), allocation with the pattern, ratio file names.

    Returns the selector and allocation an alias stands for (``{}`` without one)."""
    derived = {}
    method, allocation = config.prune_method, config.allocation
    if method in HOST_METHODS:
        selector, implied = HOST_METHODS[method]
        if allocation not in ("uniform", implied):
            raise ValueError(f"--prune_method {method} means --allocation {implied}; "
                             f"drop --allocation {allocation} or use --prune_method {selector}")
        derived = {"prune_method": selector, "allocation": implied}
        allocation = implied
    pattern = config.pattern
    if pattern.structured and (config.use_trim or allocation != "uniform" or config.load_layer_ratio):
        what = "--use_trim" if config.use_trim else (
            f"--allocation {allocation}" if allocation != "uniform" else "--load_layer_ratio")
        raise ValueError(f"{what} gives layers or rows different sparsities, but --sparsity_type "
                         f"{config.sparsity_type} fixes every row at {pattern.ratio:g}; use unstructured")
    for flag in ("save_layer_ratio", "load_layer_ratio"):
        if getattr(config, flag):
            check_suffix(getattr(config, flag), f"--{flag}")
    if config.load_layer_ratio and not Path(config.load_layer_ratio).is_file():
        raise ValueError(f"--load_layer_ratio {config.load_layer_ratio}: no such file")
    return derived
