"""What a mask selector is: a named object that turns a layer's weights and
calibration statistics into a pruning mask (and optionally its own update)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Protocol, Union

import torch
from torch import Tensor, nn

from ..solvers.problem import Warm
from ..sparsity import Pattern

#: One ratio for the whole layer, or an ``(r,)`` tensor of per-row ratios (TRIM).
Ratio = Union[float, Tensor]


@dataclass
class Selection:
    """A selector's answer for one linear layer.

    Attributes:
        pruned: bool ``r x d``, True = pruned.
        weight: the selector's own updated ``r x d`` weights (pruned entries 0)
            for selectors with a native update (SparseGPT, Thanos); None for
            mask-only selectors (magnitude, Wanda).
        stats: JSON-ready figures for the report, e.g. ``damp`` (the relative damping
            the selector finally used) and ``damp_escalated`` for SparseGPT and Thanos.
        factor: the ``Hd⁻¹`` the selector computed, with the Hessian and damp it came from
            (SparseGPT, Thanos), so that the ``optima`` update need not factorise ``Hd`` again;
            None otherwise.
    """

    pruned: Tensor
    weight: Optional[Tensor] = None
    stats: dict = field(default_factory=dict)
    factor: Optional[Warm] = field(default=None, repr=False)


@dataclass
class BlockCalibration:
    """What a selector's optional ``prepare_block`` is given for one decoder block, before any of the block's
    linears is pruned.

    Attributes:
        index: the block's index.
        block: the dense block, onloaded on the run's device.
        linears: ``{full name: nn.Linear}`` of the block's linears to prune (``model.layers.0.mlp.up_proj``).
        forward: ``forward(batch)`` iterates over the block's outputs ``(b, seqlen, hidden)`` for this process's
            calibration windows, ``b <= batch`` windows per forward, in order, computed under the caller's
            autograd mode (wrap it in ``torch.enable_grad()`` to backpropagate); its inputs are those the
            Hessians are taken on (the pruned model's). Forwards only: the pipeline's inputs do not change.
        config: the run's :class:`~optima_plugin.config.PruneConfig`.
        dist: under torchrun, the job's :class:`~optima_plugin.distributed.Distributed` (each process saw only
            its share of the windows: all-reduce what is summed over them, e.g. ``dist.sum_``); else None.
    """

    index: int
    block: nn.Module
    linears: dict
    forward: Callable[[int], Iterator[Tensor]]
    config: Any = None
    dist: Any = None


class MaskSelector(Protocol):
    """A mask selector plugin.

    Attributes:
        name: registry name (``--prune_method``).
        needs_hessian: whether :meth:`select` reads ``hessian`` (False for magnitude).
    """

    name: str
    needs_hessian: bool

    def select(
        self, weight: Tensor, hessian: Optional[Tensor], ratio: Ratio, pattern: Pattern
    ) -> Selection:
        """Choose the mask for one layer.

        Args:
            weight: ``r x d`` dense weights (any float dtype; work in float32).
            hessian: ``d x d`` float32/float64 mean of ``x xᵀ`` over calibration
                tokens (its diagonal is the mean squared input norm per column);
                None when ``needs_hessian`` is False and no statistics were taken.
            ratio: the fraction to prune (ignored for N:M patterns, which fix it),
                or an ``(r,)`` float tensor: row ``i`` prunes ``floor(ratio_i · d)`` weights.
            pattern: unstructured or N:M.
        """
        ...

    # Optional: ``needs_name = True``: :meth:`select` is also given ``name=`` (the linear's full module
    # name, ``model.layers.0.self_attn.q_proj``), for selectors that look masks up by layer (``file``).
    #
    # Optional: ``ignores_ratio = True``: :meth:`select` prunes whatever ``ratio`` says (``file``), so a layer
    # at ratio 0 is still selected (others: a ratio-0 unstructured layer skips selection and update).
    #
    # Optional: ``prepare(config, linears, prefix)``: called once per run after the model is loaded and
    # before calibration, with the :class:`~optima_plugin.config.PruneConfig`, ``{name: nn.Linear}`` of
    # the linears to prune and the blocks' path (``model.layers``); raise ``ValueError`` there for
    # anything that would fail later (a missing file, a layer it cannot handle).
    #
    # Optional: ``prepare_block(context: BlockCalibration) -> dict``: called per decoder block, after the block
    # is onloaded and before its statistics pass and any of its linears is pruned, for per-block data (e.g.
    # ``wanda++``: gradients of the block's output norm); returns ``{full name: data}``, and each linear's
    # :meth:`select` is then also given ``block_data=`` its entry (None when absent). The engine drops the
    # data after the block. Selectors with it are refused by ``optima-host --mask_selector`` (no block there).
    #
    # Optional: ``score(weight, hessian) -> Tensor`` (``r x d`` float32, lower is
    # pruned first), the static ranking that row allocators (TRIM) try per-row
    # ratios with; see :func:`selector_scores`.


def selector_scores(selector, weight: Tensor, hessian: Optional[Tensor]) -> Tensor:
    """The selector's static ``r x d`` float32 importance scores (lower is pruned first).

    Selectors may define ``score(weight, hessian)``; row allocators (TRIM) rank
    each row's weights with it to try per-row ratios without re-running
    :meth:`MaskSelector.select`. ``ValueError`` when the selector has none.
    """
    score = getattr(selector, "score", None)
    if score is None:
        raise ValueError(
            f"--use_trim needs the selector's scores, but --prune_method {selector.name} has no "
            "score(weight, hessian) method; add one or use wanda, magnitude, sparsegpt or thanos"
        )
    return score(weight, hessian)


def check_ratio(ratio: Ratio) -> None:
    """``ValueError`` unless every ratio is in [0, 1)."""
    r = torch.as_tensor(ratio, dtype=torch.float64)
    if bool(((r < 0) | (r >= 1)).any()):
        raise ValueError(f"--sparsity_ratio must be in [0, 1), got {ratio if r.numel() == 1 else 'per-row ratios outside it'}")
