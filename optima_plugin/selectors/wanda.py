"""Wanda: score ``|W_ij| · ‖x_j‖``, compared within each output row (N:M within groups)."""

from __future__ import annotations

from ..sparsity import Pattern, nm_mask, row_mask
from .base import Ratio, Selection, check_ratio


def wanda_scores(weight, hessian):
    """``r x d`` Wanda scores; ``diag(hessian)`` is the mean squared input norm per column."""
    return weight.detach().abs().float() * hessian.diagonal().clamp_min(0).sqrt().to(weight.device).float()


def mask_from_scores(score, ratio: Ratio, pattern: Pattern) -> Selection:
    """Wanda's comparison groups: the lowest ``score`` entries of each row (N:M: of each group of M inputs)."""
    if pattern.structured:
        return Selection(nm_mask(score, pattern))
    check_ratio(ratio)
    return Selection(row_mask(score, ratio))


class WandaSelector:
    name = "wanda"
    needs_hessian = True

    def score(self, weight, hessian):
        """``r x d`` float32 Wanda scores (lower is pruned first)."""
        return wanda_scores(weight, hessian)

    def select(self, weight, hessian, ratio: Ratio, pattern: Pattern) -> Selection:
        return mask_from_scores(wanda_scores(weight, hessian), ratio, pattern)
