"""TRIM row-wise ratios (Beck et al., 2025, arXiv 2505.16743; reference ``lib/trim.py``).

Given a layer's ratio ``t``, TRIM gives each output row ``i`` its own ratio
``x_i`` (mean ``t``): starting from uniform ``x = t``, it repeatedly measures how
well each row's output survives pruning (``qmetric_dimwise``, default the
per-row cosine similarity between dense and pruned outputs), and moves
sparsity toward the best-preserved rows::

    q   = qmetric_dimwise(dense, pruned(x))                    (r,)
    x_d = (q - min q) / (max q - min q + 1e-6) · 2·lr;  x_d -= mean(x_d)
    x   = clip(x + x_d, 0, 0.95) - mean + t

keeping the ``x`` with the best layer metric (``qmetric``, default the cosine
similarity of the flattened outputs) over ``iterations`` steps. Learning rates
0.01, 0.02, 0.04, 0.08, 0.12, 0.16 are tried in turn until one does not beat
the previous; if none beats uniform, -0.01, -0.02, -0.04 likewise (unless
``forbid_neg_lr``). A candidate ``x`` prunes the ``floor(x_i·d)`` lowest
selector scores of each row (:func:`~optima_plugin.selectors.base.selector_scores`).

No activations are stored: with ``H = mean x xᵀ`` (the layer's Hessian), the
per-row sums over calibration tokens are quadratic forms,
``‖y_i‖² = w_i H w_iᵀ``, ``‖ŷ_i‖² = ŵ_i H ŵ_iᵀ``, ``y_i·ŷ_i = w_i H ŵ_iᵀ``,
``‖y_i - ŷ_i‖² = (w_i-ŵ_i) H (w_i-ŵ_i)ᵀ`` (all divided by the token count),
so one candidate costs one ``r x d x d`` GEMM, for all rows at once; a layer
costs at most ``1 + iterations · 9`` GEMMs (the learning-rate search usually
stops after 2–4 rates).

Differences from the reference, on purpose:

* statistics over *all* calibration tokens (through ``H``) instead of the last
  token of each window;
* ``psnr`` uses the largest per-row mean square output as the peak instead of
  the largest single output (a per-layer constant, so the choice between
  candidates is the same); per-row PSNR is replaced by per-row ``snr``;
* after ``clip - mean + t`` a candidate that leaves ``[0, 0.95]`` is projected
  back exactly (``clip(x + c)`` with the shift ``c`` that restores the mean), so
  bounds and mean both hold (the reference may step slightly outside);
* the ratios are rounded to whole weights per row by largest remainder, so the
  layer prunes exactly ``⌊t·r·d⌋`` weights (the reference floors each row,
  losing about ``r/2`` weights per layer); candidates are evaluated rounded the
  same way, so the chosen mask is exactly the evaluated one (for Wanda and
  magnitude; SparseGPT and Thanos then choose their masks sequentially with
  these per-row counts);
* ``--input_recalc`` (in the engine) recomputes the whole Hessian of each later
  input group of the block (o_proj, gate/up, down) after the linears before it
  are pruned and updated, and the selector and the weight update use it too,
  where the reference re-collects only TRIM's input vectors.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from ..options import OptionParser, declared_defaults
from ..selectors.base import selector_scores
from .base import RowAllocation

log = logging.getLogger(__name__)

MAX_ROW_RATIO = 0.95
POSITIVE_RATES = (0.01, 0.02, 0.04, 0.08, 0.12, 0.16)
NEGATIVE_RATES = (-0.01, -0.02, -0.04)
ITERATIONS = 10
_EPS = 1e-8


class OutputStats:
    """Per-row sums over calibration tokens (means, via ``H``) for a dense and a pruned weight.

    Attributes (all ``(r,)``, the Hessian's dtype): ``yy`` = ‖y_i‖², ``hh`` = ‖ŷ_i‖²,
    ``yh`` = y_i·ŷ_i, ``err`` = ‖y_i - ŷ_i‖².
    """

    def __init__(self, yy: Tensor, hh: Tensor, yh: Tensor, err: Tensor) -> None:
        self.yy, self.hh, self.yh, self.err = yy, hh, yh, err


def _cosine_rows(s: OutputStats) -> Tensor:
    return (s.yh / ((s.yy.sqrt() + _EPS) * (s.hh.sqrt() + _EPS))).clamp(-1, 1)


def _snr_rows(s: OutputStats) -> Tensor:
    return 10 * torch.log10(s.yy / (s.err + 1e-10) + 1e-30)


#: Layer quality metrics (bigger is better): OutputStats -> float.
QMETRICS: dict[str, Callable[[OutputStats], float]] = {
    "cosim_flat": lambda s: float((s.yh.sum() / ((s.yy.sum().sqrt() + _EPS) * (s.hh.sum().sqrt() + _EPS))).clamp(-1, 1)),
    "cosim_dim": lambda s: float(_cosine_rows(s).mean()),
    "mse": lambda s: -float(s.err.mean()),
    "snr": lambda s: float(10 * torch.log10(s.yy.sum() / (s.err.sum() + 1e-10))),
    "psnr": lambda s: float(10 * torch.log10(s.yy.max() / (s.err.mean() + 1e-10))),
}

#: Per-row quality metrics (bigger is better): OutputStats -> (r,) tensor.
DIMWISE_QMETRICS: dict[str, Callable[[OutputStats], Tensor]] = {
    "cosim": _cosine_rows,
    "mse": lambda s: -s.err,
    "snr": _snr_rows,
}


class OutputModel:
    """Dense outputs of one layer, summarised through its Hessian; scores pruned candidates."""

    def __init__(self, weight: Tensor, hessian: Tensor) -> None:
        self.h = hessian.to(weight.device)
        self.w = weight.detach().to(self.h.dtype)
        self.wh = self.w @ self.h
        self.yy = (self.wh * self.w).sum(1)

    def stats(self, pruned: Tensor) -> OutputStats:
        """:class:`OutputStats` of the mask-only weights ``w ∘ ~pruned`` (one GEMM)."""
        what = self.w.masked_fill(pruned, 0)
        whh = what @ self.h
        delta = self.w - what
        return OutputStats(self.yy, (whh * what).sum(1), (self.wh * what).sum(1),
                           ((self.wh - whh) * delta).sum(1))


def project_mean(x: Tensor, target: float, upper: float = MAX_ROW_RATIO) -> Tensor:
    """``clip(x, 0, upper)`` shifted so its mean is ``target`` (the reference's step), then, if that
    leaves ``[0, upper]``, the exact projection ``clip(x + c, 0, upper)`` with mean ``target``."""
    x = x.clamp(0, upper)
    x = x - x.mean() + target
    if bool(((x < 0) | (x > upper)).any()):
        lo, hi = -1.0 - upper, 1.0 + upper
        for _ in range(100):  # bisection on the monotone mean(clip(x + c))
            c = (lo + hi) / 2
            if float((x + c).clamp(0, upper).mean()) < target:
                lo = c
            else:
                hi = c
        x = (x + (lo + hi) / 2).clamp(0, upper)
    return x


def round_rows(x: Tensor, columns: int, target: float, upper: float = MAX_ROW_RATIO) -> Tensor:
    """``(r,)`` long prune counts from row ratios ``x`` by largest remainder, summing to
    ``⌊target·r·columns⌋`` (rows never above ``upper`` unless already there)."""
    r = x.numel()
    exact = x.double() * columns
    counts = torch.floor(exact + 1e-9).long().clamp(0, columns)
    need = int(math.floor(target * r * columns + 1e-6)) - int(counts.sum())
    if need > 0:
        room = (counts + 1 <= math.floor(upper * columns + 1e-9)) & (counts < columns)
        rem = (exact - counts).masked_fill(~room, -1.0)
        take = torch.topk(rem, min(need, int(room.sum())), sorted=False).indices
        counts[take] += 1
    elif need < 0:
        rem = (exact - counts).masked_fill(counts == 0, 2.0)
        take = torch.topk(rem, min(-need, int((counts > 0).sum())), largest=False, sorted=False).indices
        counts[take] -= 1
    return counts


def trim_row_ratios(
    weight: Tensor,
    hessian: Tensor,
    scores: Tensor,
    ratio: float,
    *,
    qmetric: str = "cosim_flat",
    qmetric_dimwise: str = "cosim",
    iterations: int = ITERATIONS,
    forbid_neg_lr: bool = False,
) -> RowAllocation:
    """TRIM's per-row ratios for one layer (see the module docstring).

    Args:
        weight: ``r x d`` dense weights.
        hessian: ``d x d`` float32/float64 ``mean x xᵀ``; the computation runs in its dtype.
        scores: ``r x d`` selector scores, lower pruned first.
        ratio: the layer's ratio ``t`` in [0, 0.95].
    Returns:
        :class:`RowAllocation`: ``(r,)`` float64 ratios ``k_i / d`` (``k_i`` whole weights,
        ``Σ k_i = ⌊t·r·d⌋``, each in ``[0, 0.95]``) and stats (``baseline_metric``,
        ``best_metric``, ``learning_rate``, ``best_iter``, ``evaluations``).
    """
    if qmetric not in QMETRICS:
        raise ValueError(f"--qmetric must be one of {', '.join(QMETRICS)}, got {qmetric!r}")
    if qmetric_dimwise not in DIMWISE_QMETRICS:
        raise ValueError(f"--qmetric_dimwise must be one of {', '.join(DIMWISE_QMETRICS)}, got {qmetric_dimwise!r}")
    if not 0.0 <= ratio <= MAX_ROW_RATIO:
        raise ValueError(f"TRIM needs a layer ratio in [0, {MAX_ROW_RATIO}], got {ratio}")
    r, d = weight.shape
    if ratio == 0.0:
        return RowAllocation(torch.zeros(r, dtype=torch.float64, device=weight.device), {"skipped": "ratio 0"})
    model = OutputModel(weight, hessian)
    rank = torch.argsort(torch.argsort(scores, dim=1), dim=1).to(weight.device)  # 0 = pruned first
    layer_metric, row_metric = QMETRICS[qmetric], DIMWISE_QMETRICS[qmetric_dimwise]
    evaluations = 0

    def evaluate(x: Tensor) -> tuple[Tensor, OutputStats]:
        nonlocal evaluations
        evaluations += 1
        counts = round_rows(x, d, ratio)
        return counts, model.stats(rank < counts.unsqueeze(1))

    x0 = torch.full((r,), float(ratio), dtype=torch.float64, device=weight.device)
    counts0, stats0 = evaluate(x0)
    baseline = layer_metric(stats0)

    def run(lr: float) -> tuple[Tensor, float, int]:
        x, stats = x0, stats0
        best, best_counts, best_iter = baseline, counts0, 0
        for it in range(iterations):
            q = row_metric(stats).double()
            step = (q - q.min()) / (q.max() - q.min() + 1e-6) * (2 * lr)
            x = project_mean(x + (step - step.mean()).nan_to_num(0.0), ratio)
            counts, stats = evaluate(x)
            score = layer_metric(stats)
            if score > best:
                best, best_counts, best_iter = score, counts, it
        return best_counts, best, best_iter

    best_metric, best_counts, best_lr, best_iter = baseline, counts0, None, 0
    for rates in (POSITIVE_RATES, () if forbid_neg_lr else NEGATIVE_RATES):
        if rates is NEGATIVE_RATES and best_lr is not None:
            break
        previous = float("-inf")
        for lr in rates:
            counts, score, it = run(lr)
            if score > best_metric:
                best_metric, best_counts, best_lr, best_iter = score, counts, lr, it
            if score > previous:
                previous = score
            else:
                break
    stats = {"baseline_metric": baseline, "best_metric": best_metric, "learning_rate": best_lr,
             "best_iter": best_iter, "evaluations": evaluations}
    return RowAllocation(best_counts.double() / d, stats)


def addoption(parser: OptionParser) -> None:
    """TRIM's options: ``--qmetric``, ``--qmetric_dimwise``, ``--iterations``, ``--forbid_neg_lr``."""
    group = parser.getgroup("trim", "TRIM (--use_trim)")
    group.addoption("qmetric", default="cosim_flat", choices=tuple(QMETRICS),
                    help="TRIM layer metric: cosim_flat, cosim_dim, mse, snr, psnr")
    group.addoption("qmetric_dimwise", default="cosim", choices=tuple(DIMWISE_QMETRICS),
                    help="TRIM per-row metric: cosim, mse, snr")
    group.addoption("iterations", type=int, default=ITERATIONS, help="TRIM iterations per learning rate",
                    check=lambda v: v >= 1, requirement="must be a positive integer")
    group.addoption("forbid_neg_lr", type=bool, help="TRIM: do not try negative learning rates")


class TrimRowAllocator:
    name = "trim"

    def row_ratios(self, weight: Tensor, hessian: Optional[Tensor], ratio: float, selector, config) -> RowAllocation:
        """TRIM ratios for one linear, ranked by ``selector``'s scores; options from ``config``
        (a :class:`~optima_plugin.config.PruneConfig`; None: the declared defaults)."""
        if hessian is None:
            raise ValueError("--use_trim needs the layer's Hessian")
        if ratio > MAX_ROW_RATIO:
            log.info("layer ratio %.3f is above TRIM's row cap %.2f: rows stay uniform", ratio, MAX_ROW_RATIO)
            return RowAllocation(torch.full((weight.shape[0],), float(ratio), dtype=torch.float64,
                                            device=weight.device), {"skipped": "ratio above row cap"})
        scores = selector_scores(selector, weight, hessian)
        option = config.option if config is not None else declared_defaults(addoption).__getitem__
        return trim_row_ratios(
            weight, hessian, scores, float(ratio),
            qmetric=option("qmetric"),
            qmetric_dimwise=option("qmetric_dimwise"),
            iterations=option("iterations"),
            forbid_neg_lr=option("forbid_neg_lr"),
        )
