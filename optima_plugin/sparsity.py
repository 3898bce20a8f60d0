"""Sparsity patterns and the sparsity report of a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern: unstructured (``n = m = None``) or N:M.

    N:M means: in every group of ``m`` consecutive inputs of an output row,
    ``n`` weights are pruned (the hosts' convention: ``2:4`` prunes 2 of 4).
    """

    n: Optional[int] = None
    m: Optional[int] = None

    @property
    def structured(self) -> bool:
        return self.m is not None

    @property
    def ratio(self) -> Optional[float]:
        """The sparsity an N:M pattern implies, None when unstructured."""
        return self.n / self.m if self.structured else None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "unstructured"

    def check_columns(self, columns: int, layer: str = "layer") -> None:
        """Raise ``ValueError`` if ``m`` does not divide the input size."""
        if self.structured and columns % self.m:
            raise ValueError(
                f"--sparsity_type {self}: M={self.m} does not divide the {columns} inputs of {layer}"
            )


def parse_pattern(text: str) -> Pattern:
    """Parse ``"unstructured"`` or ``"N:M"`` (``0 < N < M``) into a :class:`Pattern`."""
    if text == "unstructured":
        return Pattern()
    try:
        n_s, m_s = text.split(":")
        n, m = int(n_s), int(m_s)
    except ValueError:
        raise ValueError(
            f"--sparsity_type must be 'unstructured' or 'N:M' (e.g. 2:4), got {text!r}"
        ) from None
    if not 0 < n < m:
        raise ValueError(f"--sparsity_type {text}: need 0 < N < M (N pruned out of every M)")
    return Pattern(n, m)


def check_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero weights over the model's decoder-block linears.

    Embeddings and the LM head are not counted (they are never pruned).
    """
    zeros = total = 0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not head:
            w = module.weight
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / total if total else 0.0


def nm_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Bool ``r x d`` mask pruning the ``n`` lowest scores in each group of ``m`` inputs."""
    r, d = scores.shape
    groups = scores.reshape(r, d // pattern.m, pattern.m)
    idx = torch.topk(groups, pattern.n, dim=2, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(r, d)


def row_mask(scores: torch.Tensor, ratio: "float | torch.Tensor") -> torch.Tensor:
    """Bool ``r x d`` mask pruning the lowest scores of each row.

    ``ratio`` is one float for all rows or an ``(r,)`` tensor of per-row ratios;
    row ``i`` prunes ``floor(ratio_i · d)`` entries.
    """
    r, d = scores.shape
    return count_mask(scores, row_counts(ratio, r, d, scores.device))


def row_counts(ratio: "float | torch.Tensor", rows: int, columns: int, device=None) -> torch.Tensor:
    """``(rows,)`` long: how many of ``columns`` entries each row prunes, ``floor(ratio · columns)``."""
    ratios = torch.as_tensor(ratio, dtype=torch.float64, device=device).expand(rows)
    return torch.floor(ratios * columns + 1e-9).to(torch.long).clamp(0, columns)


def count_mask(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool ``r x d`` mask pruning the ``counts[i]`` lowest scores of row ``i`` (``counts`` long ``(r,)``)."""
    rank = torch.argsort(torch.argsort(scores, dim=1), dim=1)  # 0 = lowest score
    return rank < counts.to(scores.device).unsqueeze(1)


def block_quota(target: torch.Tensor, done: torch.Tensor, start: int, stop: int, columns: int) -> torch.Tensor:
    """Per-row prune counts for columns ``[start, stop)`` of a left-to-right block sweep.

    Each row prunes its remaining quota ``target - done`` (long ``(r,)``) in
    proportion to the columns left, and the last block takes the rest, so a row
    ends with exactly ``target`` pruned entries (SparseGPT / Thanos with per-row ratios).
    """
    width = stop - start
    if stop >= columns:
        return (target - done).clamp(0, width)
    want = torch.round((target - done).double() * width / (columns - start)).long()
    return want.clamp(0, width)
