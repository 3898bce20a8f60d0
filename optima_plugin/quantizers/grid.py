"""The symmetric integer grid shared by the quantizers: scales per row and group, rounding.

``weight`` is ``r x d``; a group is ``group_size`` consecutive input columns of one row
(``group_size = d``: one scale per row). ``qmax = 2**(bits-1) - 1``; integers lie in
``[-qmax-1, qmax]``; an all-zero group gets scale 0 (and stays 0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def qmax(bits: int) -> int:
    """The largest positive integer of a signed ``bits``-bit grid."""
    return 2 ** (bits - 1) - 1


def grouped(weight: Tensor, group_size: int) -> Tensor:
    """``r x g x group_size`` view of ``weight`` (``r x d``), the last group zero-padded."""
    r, d = weight.shape
    g = math.ceil(d / group_size)
    if g * group_size != d:
        weight = torch.nn.functional.pad(weight, (0, g * group_size - d))
    return weight.reshape(r, g, group_size)


def expand(scale: Tensor, group_size: int, d: int) -> Tensor:
    """``r x d`` per-entry scales from ``r x g`` group scales."""
    return scale.repeat_interleave(group_size, dim=1)[:, :d]


def absmax_scale(weight: Tensor, bits: int, group_size: int) -> Tensor:
    """``r x g`` float32 scales ``max |w| / qmax`` over each group."""
    return grouped(weight.float(), group_size).abs().amax(dim=2) / qmax(bits)


def round_to_grid(weight: Tensor, scale: Tensor, bits: int) -> Tensor:
    """``scale * clamp(round(weight / scale))`` in float32 (float64 if ``weight`` is); ``scale`` broadcastable
    to ``weight``; 0 where scale is 0."""
    w = weight if weight.dtype == torch.float64 else weight.float()
    scale = scale.to(w.dtype)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(w / safe), -qmax(bits) - 1, qmax(bits))
    return torch.where(scale > 0, q * safe, torch.zeros_like(q))


def quantize_grouped(weight: Tensor, scale: Tensor, bits: int, group_size: int) -> Tensor:
    """``weight`` (``r x d``) rounded to the grid of the ``r x g`` ``scale``; float32."""
    return round_to_grid(weight, expand(scale, group_size, weight.shape[1]), bits)
