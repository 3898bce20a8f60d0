"""A registered mask selector in place of the host's mask, at the host's allocation.

``optima-host --mask_selector NAME``: the host decides how many weights each row
of each linear loses (uniform, OWL, AlphaPruning, TRIM rows, N:M); the selector
decides which.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..sparsity import Pattern

#: Group sizes tried when recognising an N:M mask.
NM_GROUPS = (4, 8, 16)


def infer_pattern(pruned: Tensor) -> Pattern:
    """The N:M pattern ``pruned`` (bool ``r x d``) follows, or unstructured.

    N:M means every group of ``m`` consecutive inputs of every row has exactly
    ``n`` pruned entries (``0 < n < m``); the smallest such ``m`` is returned.
    """
    r, d = pruned.shape
    for m in NM_GROUPS:
        if d % m:
            continue
        per_group = pruned.reshape(r, d // m, m).sum(-1)
        n = int(per_group.flatten()[0])
        if 0 < n < m and bool((per_group == n).all()):
            return Pattern(n, m)
    return Pattern()


def host_ratio(pruned: Tensor) -> "float | Tensor":
    """The host's ratio: one float when every row lost as many weights, else ``(r,)`` float64 per-row ratios."""
    counts = pruned.sum(1)
    d = pruned.shape[1]
    if bool((counts == counts[0]).all()):
        return float(counts[0]) / d
    return counts.double() / d


def reselect(selector, dense: Tensor, hessian: Optional[Tensor], host_pruned: Tensor) -> Tensor:
    """The mask ``selector`` picks for ``dense`` with the host's per-row counts and pattern (bool, True = pruned)."""
    pattern = infer_pattern(host_pruned)
    ratio = pattern.ratio if pattern.structured else host_ratio(host_pruned)
    if torch.is_tensor(ratio):
        ratio = ratio.to(dense.device)
    work = dense.float() if dense.dtype not in (torch.float32, torch.float64) else dense
    selection = selector.select(work, hessian, ratio, pattern)
    pruned = selection.pruned.to(device=dense.device, dtype=torch.bool)
    if pruned.shape != dense.shape:
        raise ValueError(f"--mask_selector {selector.name} returned a {tuple(pruned.shape)} mask for a "
                         f"{tuple(dense.shape)} weight; a selector must return one bool entry per weight")
    return pruned
