"""Keep the better result: an update's weights, or the result they are checked against.

The engine (update vs the mask-only weights), the host seam (the plugin's answer vs the host's own weights) and
the solvers' driver (a solver's weights vs the mask-only ones) all ask the same question: given a candidate's
reconstruction objective and the baseline's, which is kept, and what is the kept result's error ratio (its
objective over the mask-only weights' one)? :func:`keep_better` answers it once, with the conventions each caller
had (a tie keeps the candidate; see its arguments).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional


class Kept(NamedTuple):
    """What :func:`keep_better` kept.

    Attributes:
        accepted: True when the candidate was kept (False: the baseline).
        objective: the kept result's objective.
        error_ratio: ``objective / mask_objective`` (see :func:`error_ratio` when the mask-only one is not > 0).
    """

    accepted: bool
    objective: float
    error_ratio: float


def error_ratio(objective: float, mask_objective: float, *, positive_loss: bool = False) -> float:
    """``objective / mask_objective``; when the mask alone loses nothing (``mask_objective`` not > 0): 0 if the
    objective is 0 too, else 1. ``positive_loss``: only a positive objective gives 1 (a negative one, the
    rounding of a zero one, or NaN give 0: the solvers' driver's convention; the engine and the seam give 1)."""
    if mask_objective > 0:
        return objective / mask_objective
    loss = objective > 0 if positive_loss else objective != 0
    return 1.0 if loss else 0.0


def keep_better(objective: float, mask_objective: float, *, baseline: Optional[float],
                require_finite: bool = False, positive_loss: bool = False) -> Kept:
    """Keep the candidate (``objective``) unless it is worse than ``baseline``.

    Args:
        objective: the candidate's objective.
        mask_objective: the mask-only weights' objective (the error ratio's denominator).
        baseline: the objective of the result kept instead of a worse candidate (the engine and the solvers:
            ``mask_objective``; the seam: the host's weights'); None: nothing to compare with, the candidate
            is kept.
        require_finite: a non-finite candidate is rejected too (the solvers' driver); otherwise only
            ``objective > baseline`` rejects it (a NaN candidate is kept, a tie keeps the candidate).
        positive_loss: :func:`error_ratio`'s convention.
    """
    rejected = baseline is not None and (objective > baseline or (require_finite and not math.isfinite(objective)))
    kept = baseline if rejected else objective
    return Kept(not rejected, kept, error_ratio(kept, mask_objective, positive_loss=positive_loss))
