"""Wanda++'s regional gradient score (Yang et al., 2025, arXiv 2503.04992), selector ``wanda++``.

Per decoder block, on the dense block (before any of its linears is pruned) and its calibration inputs
``X_n`` (one window each, the pruned model's inputs as for Wanda), the regional loss is the L2 norm of the
block's output, ``L_n = ‖f(X_n)‖₂``, and each pruned linear's regional gradient is the root mean square
over the ``N`` windows of its per-window gradients::

    G = sqrt( (1/N) · Σ_n (∂L_n/∂W)² )                          (r x d)
    S_ij = (α · G_ij + ‖X_j‖₂) · |W_ij|                         (α: --rgs_alpha, 100 as in the paper)

``‖X_j‖₂`` is the norm of input column ``j`` over all ``T`` calibration tokens, ``sqrt(T · H_jj)`` with ``H``
the mean ``x xᵀ`` the engine gives every selector. The masks are Wanda's: the lowest scores of each row
(N:M: of each group of ``M`` inputs). The selector ranks ``S / sqrt(T)`` (the same order), so that
``α = 0`` gives exactly Wanda's scores and masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..options import OptionParser, declared_defaults
from ..sparsity import Pattern
from .base import BlockCalibration, Ratio, Selection
from .wanda import mask_from_scores

NAME = "wanda++"
ALPHA = 100.0  # the paper's default


def addoption(parser: OptionParser) -> None:
    """``--rgs_alpha``."""
    group = parser.getgroup(NAME, "Wanda++ regional gradient score (--prune_method wanda++)")
    group.addoption("rgs_alpha", type=float, default=ALPHA,
                    help="wanda++: weight α of the regional gradient G in the score (α·G + ‖X_j‖)·|W|",
                    check=lambda v: math.isfinite(v) and v >= 0, requirement="must be a finite number >= 0")


def validate_config(config) -> None:
    """``wanda++`` with ``--use_trim``: TRIM ranks rows with ``score(weight, hessian)``, which has no block."""
    if config.prune_method == NAME and config.row_allocation:
        raise ValueError("--prune_method wanda++ scores with each block's gradients, which --use_trim's row "
                         "allocation cannot query: drop --use_trim, or use --prune_method wanda with it")


@dataclass
class RegionalGradient:
    """One linear's block data: ``rms`` the ``r x d`` G (float32, float64 under ``--double_precision``),
    ``tokens`` T, ``alpha`` α."""

    rms: Tensor
    tokens: int
    alpha: float


def regional_gradients(context: BlockCalibration, dtype: torch.dtype = torch.float32) -> tuple[dict, int, int]:
    """``({full name: Σ_n (∂L_n/∂W)²}, N windows, T tokens)`` over this process's windows (all-reduced under
    torchrun), one forward and one backward of the dense block per window; ``L_n = ‖f(X_n)‖₂`` in float32,
    the sums in ``dtype`` (float64 under ``--double_precision``).

    Only the pruned linears' weights take gradients during the pass (every parameter's ``requires_grad``
    is restored afterwards); one accumulator per linear, of its weight's shape."""
    weights = {name: lin.weight for name, lin in context.linears.items()}
    squares = {name: torch.zeros(w.shape, dtype=dtype, device=w.device) for name, w in weights.items()}
    params = list(context.block.parameters())
    flags = [p.requires_grad for p in params]
    windows = tokens = 0
    try:
        for p in params:
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        with torch.enable_grad():
            for out in context.forward(1):
                loss = out.float().norm()
                grads = torch.autograd.grad(loss, list(weights.values()))
                for name, g in zip(weights, grads):
                    squares[name].add_(g.to(dtype).square())
                windows += out.shape[0]
                tokens += out.shape[0] * out.shape[1]
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    if context.dist is not None:
        for acc in squares.values():
            context.dist.sum_(acc)
        counts = context.dist.sum_(torch.tensor([windows, tokens], dtype=torch.float64))
        windows, tokens = int(counts[0]), int(counts[1])
    return squares, windows, tokens


def regional_scores(weight: Tensor, hessian: Tensor, data: RegionalGradient) -> Tensor:
    """``r x d`` float32 ``|W|·(sqrt(H_jj) + α·G/sqrt(T))``: the paper's score divided by ``sqrt(T)`` (with
    ``α = 0`` bit for bit :func:`~optima_plugin.selectors.wanda.wanda_scores`)."""
    norms = hessian.diagonal().clamp_min(0).sqrt().to(weight.device).float()
    scale = data.alpha / math.sqrt(data.tokens)
    return weight.detach().abs().float() * (norms + scale * data.rms.to(weight.device).float())


class WandaPlusPlusSelector:
    """Selector ``wanda++``: Wanda's masks of the regional gradient score (see the module docstring)."""

    name = NAME
    needs_hessian = True

    def prepare_block(self, context: BlockCalibration) -> dict:
        """``{full name: RegionalGradient}`` of the block's linears to prune (the dense block's gradients)."""
        alpha = _option(context.config, "rgs_alpha")
        dtype = torch.float64 if getattr(context.config, "double_precision", False) else torch.float32
        squares, windows, tokens = regional_gradients(context, dtype)
        if windows == 0:
            raise ValueError(f"--prune_method wanda++: block {context.index} saw no calibration window")
        return {name: RegionalGradient(acc.div_(windows).sqrt_(), tokens, alpha) for name, acc in squares.items()}

    def select(self, weight: Tensor, hessian: Optional[Tensor], ratio: Ratio, pattern: Pattern, *,
               block_data: Optional[RegionalGradient] = None) -> Selection:
        if block_data is None or hessian is None:
            raise ValueError("--prune_method wanda++ needs its block's regional gradients (prepare_block) and the "
                             "input Hessian: it runs in optima-prune's block loop only")
        return mask_from_scores(regional_scores(weight, hessian, block_data), ratio, pattern)


def _option(config, name: str):
    """``config.option(name)``; the declared default without a config or for one that was not resolved."""
    try:
        return config.option(name)
    except (AttributeError, LookupError):
        return declared_defaults(addoption)[name]
