"""AlphaPruning (Lu et al., 2024, arXiv 2410.10912): layer ratios from heavy-tailed spectra.

Per linear, ``alpha`` is the power-law exponent of the empirical spectral
density of ``WᵀW`` (eigenvalues = squared singular values of ``W``), fitted as
the reference's ``alpha_peak`` metric (its ``net_esd_estimator`` with
``fix_fingers='xmin_peak'``):

* Hill estimator for every candidate ``xmin = λ_i`` (eigenvalues ascending):
  ``α_i = 1 + n_i / (Σ_{k≥i} log λ_k - n_i log λ_i)``, ``n_i = N - i``;
* Kolmogorov–Smirnov distance ``D_i = max_k |1 - (λ_{i+k}/λ_i)^{1-α_i} - k/n_i|``
  (left at 1 when ``α_i ≤ 1``), and ``α`` = the ``α_i`` of the smallest ``D_i``;
* candidates are limited by the peak of a 100-bin histogram of ``log10 λ``
  (``peak`` = the left edge of the fullest bin) to ``log10(0.95·peak) ≤ λ_i ≤ 1.5·peak``
  — the reference compares the *log* of the lower bound with raw eigenvalues,
  which in practice removes the lower bound; kept as is to give its numbers.

The xmin scan is vectorised (all candidates at once, chunked to a memory cap).
``alpha`` is averaged per block (``--mapping_type block_wise``, the default) or
kept per linear (``layer_wise``), mapped linearly to ``[1-ε, 1+ε]`` (higher α →
more pruning) and scaled so that the parameter-weighted mean ratio is the
target: ratios lie in about ``target · [1-ε, 1+ε]`` (the reference's mapping).
Unlike the reference, no layer gets more than 0.95: where the mapping would
exceed it (e.g. 70% with ε = 0.3), those layers are capped and the scale is
raised so that the weighted mean stays the target. Weights only: no calibration data.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..options import OptionParser, declared_defaults
from .base import AllocationContext, linears_by_block, ratio_span

log = logging.getLogger(__name__)

EPSILON = 0.3
MAPPING_TYPES = ("block_wise", "layer_wise")
BINS = 100
MAX_LAYER_RATIO = 0.95
_CHUNK_ELEMENTS = 1 << 24


def addoption(parser: OptionParser) -> None:
    """AlphaPruning's options: ``--epsilon`` and ``--mapping_type``."""
    group = parser.getgroup("alphapruning", "AlphaPruning (--allocation alphapruning)")
    group.addoption("epsilon", type=float, default=EPSILON,
                    help="AlphaPruning: ratios span about target·(1 ± epsilon)",
                    check=lambda v: 0.0 <= v < 1.0, requirement="must be in [0, 1)")
    group.addoption("mapping_type", default="block_wise", choices=MAPPING_TYPES,
                    help="AlphaPruning: block_wise (mean alpha per block) or layer_wise")


def esd_alpha(weight: Tensor) -> float:
    """The ``alpha_peak`` heavy-tail exponent of ``weight`` (``r x d``, any float dtype)."""
    eigs = torch.linalg.svdvals(weight.detach().float()).square().double().cpu()  # the scan runs on CPU
    eigs = torch.sort(eigs[eigs > 0]).values
    n_all = eigs.numel()
    if n_all < 2:
        return 0.0
    logs = eigs.log()
    # histogram peak of log10 eigenvalues -> candidate window
    h = eigs.log10()
    lo_e, hi_e = float(h.min()), float(h.max())
    if hi_e > lo_e:
        counts = torch.histc(h, BINS, min=lo_e, max=hi_e)
        edges = torch.linspace(lo_e, hi_e, BINS + 1, dtype=torch.float64)
        peak = 10 ** float(edges[int(torch.argmax(counts))])
    else:
        peak = 10**lo_e
    xmin_min = torch.log10(torch.tensor(0.95 * peak, dtype=torch.float64))  # sic, see module docstring
    xmin_max = 1.5 * peak
    cand = eigs[:-1]
    idx = torch.nonzero((cand >= xmin_min) & (cand <= xmin_max)).flatten()
    # eigenvalues are ascending, so this is the reference's continue/break scan window
    alphas = torch.zeros(n_all - 1, dtype=torch.float64)
    ds = torch.ones(n_all - 1, dtype=torch.float64)
    if idx.numel():
        suffix = torch.flip(torch.cumsum(torch.flip(logs, [0]), 0), [0])  # Σ_{k≥i} log λ_k
        chunk = max(1, _CHUNK_ELEMENTS // n_all)
        k = torch.arange(n_all, dtype=torch.float64)
        for c0 in range(0, idx.numel(), chunk):
            i = idx[c0 : c0 + chunk]
            n = (n_all - i).double()
            alpha = 1 + n / (suffix[i] - n * logs[i])
            # KS distance over the tail λ_{i+k}, k = 0..n-1 (padded positions masked out)
            pos = i.unsqueeze(1) + k.long().unsqueeze(0)  # (c, N)
            valid = pos < n_all
            tail = eigs[pos.clamp(max=n_all - 1)]
            model = 1 - (tail / eigs[i].unsqueeze(1)) ** (1 - alpha.unsqueeze(1))
            dist = (model - k.unsqueeze(0) / n.unsqueeze(1)).abs().masked_fill(~valid, 0).amax(1)
            alphas[i] = alpha
            ds[i] = torch.where(alpha > 1, dist, torch.ones_like(dist))
    return float(alphas[torch.argmin(ds)])


def alphapruning_ratios(alphas: Tensor, params: Tensor, target: float, epsilon: float,
                        cap: float = MAX_LAYER_RATIO) -> Tensor:
    """``(L,)`` float64 ratios from per-linear ``alphas`` and parameter counts ``params`` (both ``(L,)``).

    Linear map to ``[1-ε, 1+ε]``, then scaled so ``Σ params·ratio / Σ params = target``
    (the reference). Where that puts a layer above ``cap`` (the reference would
    prune it entirely), the ratios become ``min(scale · mapped, cap)`` with the
    scale that keeps the weighted mean at the target. Equal alphas give the target.
    """
    if not 0.0 <= target <= cap:
        raise ValueError(f"AlphaPruning needs --sparsity_ratio <= {cap}, got {target}")
    a = alphas.double()
    p = params.double()
    span = float(a.max() - a.min()) if a.numel() else 0.0
    if span == 0.0:
        return torch.full_like(a, target)
    mapped = (a - a.min()) / span * (2 * epsilon) + (1 - epsilon)
    ratios = mapped * (target * p.sum() / (p * mapped).sum())
    if float(ratios.max()) <= cap:
        return ratios
    lo, hi = 0.0, cap / float(mapped.min())  # weighted mean of min(scale·mapped, cap) is monotone in scale
    for _ in range(200):
        mid = (lo + hi) / 2
        if float((p * (mid * mapped).clamp(max=cap)).sum() / p.sum()) < target:
            lo = mid
        else:
            hi = mid
    clipped = (hi * mapped).clamp(max=cap)
    log.warning("AlphaPruning: %d layer(s) would exceed a ratio of %.2f at --epsilon %g; capped there and "
                "the others raised to keep the mean (lower --epsilon to avoid)", int((ratios > cap).sum()), cap, epsilon)
    return clipped


class AlphaPruningAllocator:
    name = "alphapruning"

    def layer_ratios(self, context: AllocationContext) -> dict:
        """Per-linear ratios from the weights' spectra (one SVD per linear)."""
        epsilon = context.option("epsilon", declared_defaults(addoption))
        mapping = context.option("mapping_type", declared_defaults(addoption))
        names = list(context.linears)
        alpha = {name: esd_alpha(weight) for name, weight in
                 tqdm(context.weights(), total=len(names), desc="AlphaPruning spectra", unit="layer",
                      disable=not context.progress)}
        if mapping == "block_wise":
            for group in linears_by_block(context):
                if group:
                    mean = sum(alpha[n] for n in group) / len(group)
                    alpha.update({n: mean for n in group})
        alphas = torch.tensor([alpha[n] for n in names], dtype=torch.float64)
        params = torch.tensor([context.linears[n].weight.numel() for n in names], dtype=torch.float64)
        ratios = alphapruning_ratios(alphas, params, context.target, epsilon)
        lo, hi = ratio_span(ratios, "AlphaPruning sparsities", context.target, "--epsilon", epsilon)
        log.info("AlphaPruning (%s, epsilon %g): alpha %.3f..%.3f -> sparsities %.4f..%.4f",
                 mapping, epsilon, float(alphas.min()), float(alphas.max()), lo, hi)
        return {n: float(r) for n, r in zip(names, ratios)}
