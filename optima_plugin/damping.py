"""``--damp auto``: each linear's relative damp chosen on calibration windows held out from its Hessian.

Damping the OPTIMA update interpolates between the exact fit of the calibration tokens (``λ → 0``)
and the mask alone (``λ → ∞``: ``Δ → 0``), so it is the natural knob against overfitting them. With
``--damp auto``:

* the statistics pass streams two Hessians per distinct linear input (:class:`HeldOutAccumulator`):
  ``H_fit`` over the fit windows and ``H_val`` over the held-out ones, every ``HOLDOUT_EVERY``-th
  calibration window (global indices ``0, k, 2k, ...``: deterministic, the same under torchrun);
* per linear, the layer's QP is solved with ``H_fit`` for every relative damp of ``DAMP_GRID``
  (:func:`~optima_plugin.solvers.reconstruct`, the run's solver, damping escalated as usual), and
  each answer ``ŵ`` is scored by its validation objective ``Σ_rows (ŵ - w)ᵀ H_val (ŵ - w)``; the
  mask-only weights (the ``λ = ∞`` limit) are scored too (:func:`choose_damp`);
* the final weights are solved with the full ``H`` (the token-weighted mean of ``H_fit`` and
  ``H_val``, :attr:`HeldOutHessian.full`) and the chosen damp, or are the mask-only weights when
  those scored best (:func:`reconstruct_auto`).

``DAMP_GRID`` spans decades from ``1e-3`` to ``10``: ``λ = damp · mean(diag H)``, so ``1e-3`` is
a shift below the noise of a float32 Hessian's small eigenvalues (next to the exact fit, which
Cholesky may reject on a rank-deficient ``H_fit``), ``1e-2`` is the fixed default (so ``auto`` can
reproduce it), and ``10`` shrinks every direction whose curvature is below ten times the average
input energy by ``≥ 10×``: next to the mask alone, which is the further candidate. The validation
objective is smooth in ``log λ``, so one point per decade finds its valley; each candidate is one
more solve of the layer with the run's solver (five more: 6-9x the solve time of a fixed damp with
``pcg`` on 576 x 576 and 576 x 1536 layers, CPU; small damps take more PCG iterations). The statistics
pass costs the same: each token goes to one of the two accumulators.

Everything else that damps a Hessian (SparseGPT's and Thanos' own updates, GPTQ, the low-rank
adapters) uses the fixed ``AUTO_FALLBACK`` (0.01, their default) under ``--damp auto``
(:func:`fixed_damp`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from .hessian import HessianAccumulator
from .solvers.problem import reconstruction_error
from .solvers.reconstruct import Reconstruction, reconstruct

log = logging.getLogger(__name__)

#: the ``--damp`` value that selects the damp per layer
AUTO = "auto"
#: relative damps tried per layer (see the module docstring for the choice)
DAMP_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
#: one calibration window in this many (global indices 0, k, 2k, ...) is held out for validation
HOLDOUT_EVERY = 4
#: the damp of everything but the OPTIMA update (selectors' own updates, GPTQ, low rank) under ``auto``
AUTO_FALLBACK = 0.01

Damp = Union[float, str]


def parse_damp(text: str) -> Damp:
    """``--damp``'s argparse type: a number or the word ``auto``; ``ValueError`` otherwise (argparse names the flag).

    The range (finite, ``>= 0``) is checked by :func:`validate_config` (through :func:`optima_plugin.validate.resolve`).
    """
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number >= 0 or 'auto', got {text!r}") from None



def is_auto(damp: Any) -> bool:
    """Whether ``damp`` is ``"auto"``."""
    return isinstance(damp, str) and damp == AUTO


def check_damp(damp: Any, flag: str = "--damp") -> None:
    """``ValueError`` naming ``flag`` unless ``damp`` is ``"auto"`` or a finite number ``>= 0``."""
    if is_auto(damp):
        return
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not (math.isfinite(damp) and damp >= 0):
        raise ValueError(f"{flag} must be a finite number >= 0 or 'auto', got {damp!r}")


def fixed_damp(damp: Damp) -> float:
    """``damp`` as a number: ``AUTO_FALLBACK`` for ``"auto"`` (for the steps that do not choose their own)."""
    return AUTO_FALLBACK if is_auto(damp) else float(damp)


def held_out(windows: Tensor, every: int = HOLDOUT_EVERY) -> Tensor:
    """bool, shaped like ``windows`` (global window indices): True for the held-out (validation) windows."""
    return windows % every == 0


@dataclass
class HeldOutHessian:
    """A linear's input Hessian split by calibration window.

    Attributes:
        fit: ``d x d`` mean of ``x xᵀ`` over the fit windows' tokens.
        val: ``d x d`` the same over the held-out windows' tokens.
        fit_tokens, val_tokens: the token counts of each (all ranks together under torchrun).
    """

    fit: Tensor
    val: Tensor
    fit_tokens: int
    val_tokens: int

    @cached_property
    def full(self) -> Tensor:
        """``d x d`` ``H`` over all tokens: the token-weighted mean of :attr:`fit` and :attr:`val`."""
        n = self.fit_tokens + self.val_tokens
        return self.fit * (self.fit_tokens / n) + self.val * (self.val_tokens / n)


class HeldOutAccumulator:
    """Two running means of ``x xᵀ`` (:class:`~optima_plugin.hessian.HessianAccumulator`): fit and held out.

    The pipeline calls :meth:`chunk` before each forward with the windows it holds; the forward hook then
    sends each window's tokens (its rows of the input, windows in order) to one accumulator or the other.

    Args:
        dtype: accumulation dtype.
        every: one window in ``every`` is held out (:func:`held_out`).
        first_window: global index of this process's first window (its share's start under torchrun).
        sink: attention-sink handling of both Hessians (:class:`~optima_plugin.hessian.SinkTokens`; None: keep).
    """

    def __init__(self, dtype: torch.dtype = torch.float32, every: int = HOLDOUT_EVERY, first_window: int = 0,
                 sink=None) -> None:
        self.fit = HessianAccumulator(dtype, sink)
        self.val = HessianAccumulator(dtype, sink)
        self.every = every
        self.first_window = first_window
        self._start: Optional[int] = None
        self._count = 0

    def chunk(self, start: int, count: int) -> None:
        """The next forward holds windows ``start .. start + count - 1`` (indices into this process's windows)."""
        self._start, self._count = self.first_window + start, count

    def add(self, x: Tensor) -> None:
        """Add the inputs ``(..., d)`` of the current chunk: its windows' tokens, window after window."""
        if self._start is None:
            raise RuntimeError("HeldOutAccumulator.add before chunk(): the pipeline must say which windows a "
                               "forward holds")
        flat = x.detach().reshape(-1, x.shape[-1])
        n, k = flat.shape[0], self._count
        if n % k:
            raise ValueError(f"{n} input tokens cannot be split into the chunk's {k} calibration windows: --damp "
                             "auto needs linears that see every token of their window (give a number to --damp)")
        per_window = flat.reshape(k, n // k, -1)
        val = held_out(torch.arange(self._start, self._start + k, device=x.device), self.every)
        self.fit.add(per_window[~val])
        self.val.add(per_window[val])

    def hook(self, module, inputs: tuple, output) -> None:
        """``register_forward_hook`` callback: accumulate the module's first input."""
        self.add(inputs[0])

    def result(self, shape: tuple, dist=None) -> HeldOutHessian:
        """The :class:`HeldOutHessian` (``shape``: ``(d, d)``); under torchrun (``dist``) each half is the
        token-weighted mean over the ranks (:meth:`~optima_plugin.distributed.Distributed.mean`), the same on
        every rank. A half that saw no tokens is zeros."""
        halves = []
        for acc in (self.fit, self.val):
            h, n = acc.hessian, acc.tokens
            if dist is not None:
                h, n = dist.mean(h, n, shape, self.fit.dtype)
            halves.append((h if h is not None else torch.zeros(shape, dtype=self.fit.dtype), n))
        (fit, nf), (val, nv) = halves
        if nf == 0 or nv == 0:
            raise ValueError(f"--damp auto: {nf} fit and {nv} held-out calibration tokens; it needs both "
                             f"(one window in {self.every} is held out): use --nsamples 2 or more")
        return HeldOutHessian(fit, val.to(fit.device), nf, nv)


@dataclass
class DampChoice:
    """The outcome of :func:`choose_damp` for one layer.

    Attributes:
        damp: the chosen relative damp; None when the mask-only weights (``λ = ∞``) scored best.
        candidates: per grid damp, ascending: ``damp``, ``used`` (after an escalation), ``validation``
            (``Σ (ŵ - w)ᵀ H_val (ŵ - w)``) and ``ratio`` (over the mask-only weights' validation objective;
            None when that is 0 and the candidate's is not).
        mask_validation: the mask-only weights' validation objective.
        seconds: wall time of the candidate solves and their scoring.
    """

    damp: Optional[float]
    candidates: list = field(default_factory=list)
    mask_validation: float = 0.0
    seconds: float = 0.0

    def stats(self) -> dict:
        """JSON-ready: ``chosen`` (a damp or ``"mask_only"``), ``candidates``, ``mask_validation``, ``seconds``."""
        return {"chosen": self.damp if self.damp is not None else "mask_only", "candidates": self.candidates,
                "mask_validation": self.mask_validation, "select_seconds": self.seconds}


def _ratio(value: float, base: float) -> Optional[float]:
    """``value / base``; 1 for 0 / 0, None (JSON null) when only ``base`` is 0."""
    if base > 0:
        return value / base
    return 1.0 if value == base else None


def choose_damp(
    weight: Tensor, pruned: Tensor, held: HeldOutHessian, *, grid: Sequence[float] = DAMP_GRID,
    solver: str = "pcg", tol: Optional[float] = None, max_iter: Optional[int] = None,
    double_precision: bool = False, split: Any = None,
) -> DampChoice:
    """The relative damp of ``grid`` whose solve with ``H_fit`` has the lowest validation objective.

    Args:
        weight: ``r x d`` dense weights.
        pruned: bool ``r x d``, True = pruned.
        held: the layer's fit and held-out Hessians.
        grid: relative damps to try (each a :func:`~optima_plugin.solvers.reconstruct` with ``held.fit``).
        solver, tol, max_iter, double_precision, split: as for :func:`~optima_plugin.solvers.reconstruct`.

    Returns:
        A :class:`DampChoice`; ``damp`` None when the mask-only weights score best. Ties go to the larger
        damp (the mask alone last). Under torchrun the choice is rank 0's (the scores agree up to rounding).
    """
    t0 = time.perf_counter()
    mask_only = weight.masked_fill(pruned, 0)
    mask_val = reconstruction_error(weight, mask_only, held.val)
    candidates = []
    for damp in sorted(grid):
        res = reconstruct(weight, pruned, held.fit, solver=solver, damp=damp, tol=tol, max_iter=max_iter,
                          double_precision=double_precision, split=split)
        val = reconstruction_error(weight, res.weight, held.val)
        candidates.append({"damp": damp, "used": res.damp, "validation": val, "ratio": _ratio(val, mask_val)})
    scores = [c["validation"] for c in candidates] + [mask_val]
    best = 0
    for i, s in enumerate(scores):
        if s <= scores[best]:  # ties: the larger damp, the mask alone last
            best = i
    if split is not None and getattr(split, "world_size", 1) > 1:
        best = int(split.broadcast(torch.tensor([best], dtype=torch.int64)).item())
    chosen = candidates[best]["damp"] if best < len(candidates) else None
    return DampChoice(chosen, candidates, mask_val, time.perf_counter() - t0)


def reconstruct_auto(
    weight: Tensor, pruned: Tensor, held: HeldOutHessian, *, grid: Sequence[float] = DAMP_GRID,
    solver: str = "pcg", tol: Optional[float] = None, max_iter: Optional[int] = None,
    double_precision: bool = False, split: Any = None,
) -> tuple[Reconstruction, DampChoice]:
    """:func:`choose_damp`, then the layer solved with ``held.full`` and the chosen damp.

    Returns ``(reconstruction, choice)``. When the mask alone scored best, the reconstruction holds the
    mask-only weights (``error_ratio`` 1, ``damp`` ``inf``, no solve). The reconstruction's figures use
    ``held.full``.
    """
    choice = choose_damp(weight, pruned, held, grid=grid, solver=solver, tol=tol, max_iter=max_iter,
                         double_precision=double_precision, split=split)
    if choice.damp is not None:
        res = reconstruct(weight, pruned, held.full, solver=solver, damp=choice.damp, tol=tol, max_iter=max_iter,
                          double_precision=double_precision, split=split)
    else:
        mask_only = weight.masked_fill(pruned, 0)
        objective = reconstruction_error(weight, mask_only, held.full)
        res = Reconstruction(weight=mask_only, objective=objective, mask_objective=objective,
                             error_ratio=1.0 if objective > 0 else 0.0, kkt_residual=0.0, iterations=0,
                             converged=True, solver=solver, seconds=0.0, damp=math.inf, row_chunk=weight.shape[0])
    log.info("damp auto: chose %s (validation objective over the mask alone's: %s)",
             "the mask alone" if choice.damp is None else f"{choice.damp:g}",
             ", ".join(f"{c['damp']:g}: " + ("n/a" if c["ratio"] is None else f"{c['ratio']:.4g}")
                       for c in choice.candidates))
    return res, choice


def layer_inputs(hessian: Union[Tensor, HeldOutHessian], options):
    """``(H, options)`` for one linear: a :class:`HeldOutHessian` becomes its full ``H`` and rides in
    ``options.holdout`` (a copy of the run's :class:`~optima_plugin.updaters.UpdateOptions`); a tensor
    passes through unchanged."""
    if isinstance(hessian, HeldOutHessian):
        return hessian.full, replace(options, holdout=hessian)
    return hessian, options


def validate_config(config: Any) -> None:
    """``--damp``: a finite number >= 0, or ``auto`` (which holds out calibration windows: two or more)."""
    check_damp(config.damp, "--damp")
    if is_auto(config.damp) and config.nsamples < 2:
        raise ValueError(f"--damp auto holds out one calibration window in {HOLDOUT_EVERY} to choose each layer's "
                         f"damp and fits on the others: it needs --nsamples 2 or more (got {config.nsamples}), "
                         "or give --damp a number")
