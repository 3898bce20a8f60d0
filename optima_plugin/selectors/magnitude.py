"""Magnitude pruning: the smallest |W| go (Wanda's ``prune_magnitude``)."""

from __future__ import annotations

import torch

from ..sparsity import Pattern, nm_mask, row_mask
from .base import Ratio, Selection, check_ratio


class MagnitudeSelector:
    name = "magnitude"
    needs_hessian = False

    def score(self, weight, hessian):
        """``r x d`` float32 ``|W|`` (lower is pruned first; ``hessian`` unused)."""
        return weight.detach().abs().float()

    def select(self, weight, hessian, ratio: Ratio, pattern: Pattern) -> Selection:
        score = weight.detach().abs().float()
        if pattern.structured:
            return Selection(nm_mask(score, pattern))
        check_ratio(ratio)
        if torch.is_tensor(ratio):  # per-row ratios
            return Selection(row_mask(score, ratio))
        # One threshold over the whole layer, as the hosts do.
        k = int(score.numel() * ratio)
        pruned = torch.zeros_like(score, dtype=torch.bool)
        if k > 0:
            idx = torch.topk(score.flatten(), k, largest=False).indices
            pruned.view(-1)[idx] = True
        return Selection(pruned)
