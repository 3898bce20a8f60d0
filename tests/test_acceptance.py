"""The one "keep the better result" rule (issue 25 item 5): each caller's tie, NaN and zero conventions."""

import math

import pytest

from optima_plugin.acceptance import error_ratio, keep_better

NAN = float("nan")


@pytest.mark.parametrize("objective, mask, positive_loss, expected", [
    (1.0, 4.0, False, 0.25), (1.0, 4.0, True, 0.25),
    (0.0, 0.0, False, 0.0), (0.0, 0.0, True, 0.0),      # nothing lost by the mask nor the update
    (2.0, 0.0, False, 1.0), (2.0, 0.0, True, 1.0),      # the mask lost nothing, the update did
    (-1e-9, 0.0, False, 1.0), (-1e-9, 0.0, True, 0.0),  # a rounded zero: the engine's 1, the solvers' 0
    (NAN, 0.0, False, 1.0), (NAN, 0.0, True, 0.0),
    (1.0, NAN, False, 1.0), (0.0, NAN, True, 0.0),
])
def test_error_ratio_conventions(objective, mask, positive_loss, expected):
    assert error_ratio(objective, mask, positive_loss=positive_loss) == expected


def test_keep_better_engine_and_solver_rules():
    # better or tied: the candidate is kept, its ratio over the mask-only objective
    for require_finite in (False, True):
        assert keep_better(1.0, 2.0, baseline=2.0, require_finite=require_finite) == (True, 1.0, 0.5)
        assert keep_better(2.0, 2.0, baseline=2.0, require_finite=require_finite) == (True, 2.0, 1.0)
        kept = keep_better(3.0, 2.0, baseline=2.0, require_finite=require_finite)  # worse: the baseline
        assert (kept.accepted, kept.objective, kept.error_ratio) == (False, 2.0, 1.0)
    # a NaN candidate: kept by the engine's rule (only "greater" rejects), rejected by the solvers' driver
    engine = keep_better(NAN, 2.0, baseline=2.0)
    assert engine.accepted and math.isnan(engine.objective) and math.isnan(engine.error_ratio)
    assert keep_better(NAN, 2.0, baseline=2.0, require_finite=True) == (False, 2.0, 1.0)
    assert keep_better(math.inf, 2.0, baseline=2.0, require_finite=True) == (False, 2.0, 1.0)


def test_keep_better_seam_rule():
    # the baseline is the host's weights; the ratio stays over the mask-only objective
    kept = keep_better(3.0, 4.0, baseline=2.0)
    assert (kept.accepted, kept.objective, kept.error_ratio) == (False, 2.0, 0.5)
    assert keep_better(1.0, 4.0, baseline=2.0) == (True, 1.0, 0.25)
    assert keep_better(9.0, 4.0, baseline=None) == (True, 9.0, 2.25)  # a --mask_selector: nothing to compare
