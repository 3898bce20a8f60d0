"""``row_magnitude``: the smallest |W| of each output row go (Wanda's row grouping, no activations).

Unlike the built-in ``magnitude`` (one threshold over the whole layer), every row
loses the same share of its weights, or its own share when given per-row ratios
(TRIM, or ``optima-host --mask_selector`` following the host's per-row counts).
"""

from __future__ import annotations

from optima_plugin import hookimpl
from optima_plugin.selectors.base import Selection, check_ratio
from optima_plugin.sparsity import nm_mask, row_mask


class RowMagnitudeSelector:
    name = "row_magnitude"
    needs_hessian = False

    def score(self, weight, hessian):
        """``r x d`` float32 ``|W|`` (lower is pruned first; ``hessian`` unused)."""
        return weight.detach().abs().float()

    def select(self, weight, hessian, ratio, pattern) -> Selection:
        """Prune the lowest ``|W|`` of each row (of each group of ``m`` for N:M)."""
        score = self.score(weight, hessian)
        if pattern.structured:
            return Selection(nm_mask(score, pattern))
        check_ratio(ratio)
        return Selection(row_mask(score, ratio))


class Plugin:
    """Contributes the selector to optima_plugin's registry."""

    @hookimpl
    def optima_selectors(self):
        return [RowMagnitudeSelector()]


#: What the entry point names: an instance (pluggy registers the entry point's object as is).
plugin = Plugin()
