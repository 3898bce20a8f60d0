"""OWL: outlier-weighted layerwise sparsity (Yin et al., 2023, arXiv 2310.05175).

Per decoder block, the outlier ratio ``D`` is the share of Wanda scores
``|W_ij| · ‖x_j‖`` above ``Hyper_m`` times their mean, pooled over all the
block's pruned linears (as the OWL reference does: one concatenated score
vector per block). Blocks with more outliers keep more weights:

    density_b = (D_b - min D) / (max D - min D) · 2·Lamda  - mean(...) + (1 - target)
    ratio_b   = 1 - density_b        (one ratio for all linears of block b)

so the *unweighted* mean of the block ratios is the target, and ratios lie in
``[target - 2·Lamda, target + 2·Lamda]``. The input norms come from one dense
pass of the calibration set (:mod:`.statistics`); the weights are not touched.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from ..options import OptionParser, declared_defaults
from .base import AllocationContext, linears_by_block, ratio_span
from .statistics import dense_input_norms

log = logging.getLogger(__name__)

LAMDA = 0.08
HYPER_M = 5.0


def addoption(parser: OptionParser) -> None:
    """OWL's options: ``--Lamda`` and ``--Hyper_m``."""
    group = parser.getgroup("owl", "OWL (--allocation owl)")
    group.addoption("Lamda", type=float, default=LAMDA, help="OWL: block ratios span target ± 2·Lamda",
                    check=lambda v: 0.0 <= v < 0.5, requirement="must be in [0, 0.5)")
    group.addoption("Hyper_m", type=float, default=HYPER_M,
                    help="OWL: outlier = Wanda score above Hyper_m × the block mean",
                    check=lambda v: v > 0, requirement="must be > 0")


def outlier_ratio(scores: list[Tensor], hyper_m: float) -> float:
    """Fraction of the pooled entries of ``scores`` (any shapes) above ``hyper_m`` × their pooled mean."""
    total = sum(s.numel() for s in scores)
    if total == 0:
        return 0.0
    mean = sum(float(s.double().sum()) for s in scores) / total
    return sum(int((s > mean * hyper_m).sum()) for s in scores) / total


def owl_ratios(outliers: Tensor, target: float, lamda: float) -> Tensor:
    """``(B,)`` float64 block ratios from ``(B,)`` outlier ratios (see the module docstring).

    Equal outlier ratios (or one block) give the target everywhere.
    """
    d = outliers.double()
    span = float(d.max() - d.min()) if d.numel() else 0.0
    if span == 0.0:
        return torch.full_like(d, target)
    density = (d - d.min()) / span * (2 * lamda)
    density = density - density.mean() + (1 - target)
    return 1 - density


class OwlAllocator:
    name = "owl"

    def layer_ratios(self, context: AllocationContext) -> dict:
        """One ratio per block for all its linears; runs the dense statistics pass."""
        lamda = context.option("Lamda", declared_defaults(addoption))
        hyper_m = context.option("Hyper_m", declared_defaults(addoption))
        norms = dense_input_norms(context)
        blocks = [g for g in linears_by_block(context) if g]
        outliers = []
        for group in context.block_weights():
            scores = [weight.abs().float().cpu() * norms[name].clamp_min(0).sqrt() for name, weight in group.items()]
            outliers.append(outlier_ratio(scores, hyper_m))
        outliers_t = torch.tensor(outliers, dtype=torch.float64)
        ratios = owl_ratios(outliers_t, context.target, lamda)
        lo, hi = ratio_span(ratios, "OWL block sparsities", context.target, "--Lamda", lamda)
        log.info("OWL (Lamda %g, Hyper_m %g): outlier ratios %.4f..%.4f -> block sparsities %.4f..%.4f",
                 lamda, hyper_m, float(outliers_t.min()), float(outliers_t.max()), lo, hi)
        return {name: float(r) for group, r in zip(blocks, ratios) for name in group}
