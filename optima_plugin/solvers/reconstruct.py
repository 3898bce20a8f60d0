"""``reconstruct``: the public entry point to every solver.

Around the solver it adds what makes a layer's result trustworthy:

* a damped Hessian that Cholesky rejects escalates damping (:func:`escalate_damp`);
* rows whose norm explodes (``> EXPLODE_FACTOR ×`` the dense row's, or non-finite)
  are re-solved with more damping, then kept mask-only if they still explode;
* a solver that misses its tolerance is warned about, never silent;
* the reported figures are those of the weights returned, in their own dtype;
* rows are solved in chunks that halve on out-of-memory (rows share ``H``).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from ..acceptance import keep_better
from .base import Solver, SolverOutput, get_solver
from .problem import Problem, Warm, escalate_damp, figures, prepare, validate

if TYPE_CHECKING:
    from ..distributed import Distributed

log = logging.getLogger(__name__)

#: A row whose new norm exceeds this multiple of its dense norm is a numerical failure.
#: Exact optima on well-posed layers stay within a few times the dense norm (at most
#: 1.8x on the synthetic activations of the tests, 50-90% unstructured and 2:4, damp 0
#: or 0.01): compensation redistributes the pruned weights' contribution, it does not
#: multiply it. Rows 100x larger come from near-singular kept submatrices (tiny Cholesky
#: pivots with ``damp = 0`` and fewer tokens than inputs: 70,000x seen), fit calibration
#: noise and wreck the layer on any other input; 100 leaves ample headroom for real optima.
EXPLODE_FACTOR = 100.0


@dataclass
class Reconstruction:
    """Result of :func:`reconstruct`.

    Attributes:
        weight: ``r x d``, the input's dtype and device, pruned entries exactly 0.
        objective: ``Σ_rows (ŵ - w)ᵀ H (ŵ - w)`` with the undamped ``H``, for ``weight``
            exactly as returned (after rounding to its dtype).
        mask_objective: the same for the mask-only weights ``w ∘ keep``.
        error_ratio: ``objective / mask_objective`` (1.0 = no compensation).
        kkt_residual: relative stationarity error on kept entries (0 = optimal).
        iterations: solver iterations (the most over row chunks).
        converged: False when the solver missed its tolerance, did not improve, or
            some rows fell back to the mask-only weights.
        solver: the solver's name.
        seconds: wall time of the solve, retries included.
        damp: the relative damp finally used (larger than requested after an escalation).
        fallback: None; ``"damp"`` when damping was escalated (a failed Cholesky or
            exploding rows); ``"mask_only"`` when some rows (``mask_only_rows``) were
            given the mask-only weights.
        mask_only_rows: rows returned with the mask-only weights by a fallback.
        row_chunk: rows solved per solver call (``r`` unless out-of-memory halved it).
    """

    weight: Tensor
    objective: float
    mask_objective: float
    error_ratio: float
    kkt_residual: float
    iterations: int
    converged: bool
    solver: str
    seconds: float
    damp: float = 0.01
    fallback: Optional[str] = None
    mask_only_rows: int = 0
    row_chunk: int = 0

    def stats(self) -> dict:
        """Everything but the weight, as plain Python values (for JSON reports)."""
        return {k: v for k, v in self.__dict__.items() if k != "weight"}


def _warn(message: str) -> None:
    """A ``RuntimeWarning`` and the same line in the log."""
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    log.warning(message)


def exploded_rows(new: Tensor, dense: Tensor) -> Tensor:
    """bool ``(r,)``: rows of ``new`` (``r x d``) that are non-finite, or whose norm exceeds
    ``EXPLODE_FACTOR ×`` that of the same row of ``dense`` (rows of dense norm 0 excepted)."""
    norm, dense_norm = new.norm(dim=1), dense.norm(dim=1)
    return ~torch.isfinite(norm) | ((dense_norm > 0) & (norm > EXPLODE_FACTOR * dense_norm))


def _solve_rows(
    solve: Solver, problem: Problem, chunk: int, *, tol: Optional[float], max_iter: Optional[int]
) -> tuple[SolverOutput, int]:
    """Solve ``problem`` ``chunk`` rows per call, halving ``chunk`` on out-of-memory.

    One call when ``chunk >= r``. Returns the joined output (``r x d`` weights, the
    most iterations, all converged) and the chunk that worked.
    """
    r = problem.weight.shape[0]
    parts: list[SolverOutput] = []
    start = 0
    while start < r or not parts:
        stop = min(r, start + chunk)
        part = problem if (start, stop) == (0, r) else problem.rows(slice(start, stop))
        try:
            parts.append(solve(part, tol=tol, max_iter=max_iter))
            start = stop
            continue
        except torch.OutOfMemoryError as err:
            if stop - start <= 1:
                raise torch.OutOfMemoryError(
                    f"out of memory solving even one row of a {r} x {problem.weight.shape[1]} layer "
                    f"({problem.dtype}): the d x d Hessian and its factors do not fit; free "
                    "accelerator memory, compute in float32, or run the solve on the CPU"
                ) from err
        # out of the except block, the error's frames (and their tensors) are freed
        chunk = max(1, (stop - start) // 2)
        log.warning("out of memory solving %d rows at once; retrying %d rows at a time",
                    stop - start, chunk)
        if problem.weight.is_cuda:
            torch.cuda.empty_cache()
    if len(parts) == 1:
        return parts[0], chunk
    joined = SolverOutput(torch.cat([p.weight for p in parts]), max(p.iterations for p in parts),
                          all(p.converged for p in parts))
    return joined, chunk


def _solve_split(
    solve: Solver, problem: Problem, chunk: int, split: "Distributed", *, tol: Optional[float],
    max_iter: Optional[int]
) -> tuple[SolverOutput, int]:
    """:func:`_solve_rows` on this rank's slice of the rows (:meth:`Distributed.rows`), all-gathered: every
    rank returns the same ``r x d`` weights, the most iterations and whether every rank converged.

    A factorisation that fails on one rank fails on all (so they escalate damping together).
    """
    r = problem.weight.shape[0]
    mine = split.rows(r)
    part, error = None, None
    if mine.stop > mine.start:
        try:
            part, chunk = _solve_rows(solve, problem.rows(mine), min(chunk, mine.stop - mine.start),
                                      tol=tol, max_iter=max_iter)
        except torch.linalg.LinAlgError as err:
            error = err
    if not split.all_true(error is None):
        raise error if error is not None else torch.linalg.LinAlgError("another rank's rows failed to factorise")
    if part is None:  # fewer rows than ranks: nothing to solve here
        part = SolverOutput(problem.weight[:0].clone(), 0, True)
    weight = split.gather_rows(part.weight, r)
    return SolverOutput(weight, split.max_int(part.iterations), split.all_true(part.converged)), chunk


def reconstruct(
    weight: Tensor,
    pruned: Tensor,
    hessian: Tensor,
    *,
    solver: str = "pcg",
    damp: float = 0.01,
    tol: Optional[float] = None,
    max_iter: Optional[int] = None,
    double_precision: bool = False,
    split: Optional["Distributed"] = None,
    warm: Optional[Warm] = None,
) -> Reconstruction:
    """Re-solve the kept weights of a layer so its outputs match the dense layer.

    Args:
        weight: ``r x d`` dense weights, any float dtype and device.
        pruned: bool ``r x d``, True = pruned.
        hessian: ``d x d`` mean of ``x xᵀ`` over calibration tokens.
        solver: one of ``pcg`` (default), ``direct``, ``pdhg``, ``adam``, ``sparsegpt``.
        damp: relative damping; ``λ = damp · mean(diag H)``; escalated (with a warning)
            when the damped Hessian is not positive definite or rows explode.
        tol, max_iter: solver tolerance and iteration cap (solver defaults if None).
        double_precision: compute in float64 instead of float32.
        split: under torchrun (:mod:`optima_plugin.distributed`), every rank solves its slice of
            the rows and the slices are all-gathered; every rank of the job must call with the same
            arguments, and all return the same result.
        warm: a :class:`~optima_plugin.solvers.problem.Warm` start (a selector's own weights and its
            ``Hd⁻¹``): ``pcg`` starts from the weights, any solver reuses the inverse when it was computed
            from this ``hessian`` at this ``damp``; the optimum sought and the stopping test are unchanged.

    Returns:
        A :class:`Reconstruction`. Its weights are never worse (by the undamped
        objective, measured after rounding to ``weight.dtype``) than the mask-only
        weights: when the solver does not improve on them, they are returned with
        ``converged=False`` and a warning.

    Raises:
        torch.linalg.LinAlgError: the Hessian still fails after every escalation.
        torch.OutOfMemoryError: not even one row fits.
    """
    solve = get_solver(solver)
    validate(weight, pruned, hessian)
    chunk = max(1, weight.shape[0])

    def attempt(dmp: float, last: bool) -> tuple[Problem, SolverOutput, Tensor, Tensor]:
        nonlocal chunk
        problem = prepare(weight, pruned, hessian, damp=dmp, double_precision=double_precision, warm=warm)
        if split is not None and split.world_size > 1:
            out, chunk = _solve_split(solve, problem, chunk, split, tol=tol, max_iter=max_iter)
        else:
            out, chunk = _solve_rows(solve, problem, chunk, tol=tol, max_iter=max_iter)
        # the figures are those of the weights returned: round to their dtype first
        new = out.weight.to(weight.dtype).to(problem.dtype).masked_fill(problem.pruned, 0.0)
        bad = exploded_rows(new, problem.weight)
        if bool(bad.any()):
            what = (f"{int(bad.sum())} of {len(bad)} rows non-finite or over {EXPLODE_FACTOR:g}x "
                    f"their dense norm with damp={dmp:g}")
            if not last:
                warnings.warn(f"solver {solver!r}: {what}; re-solving with more damping",
                              RuntimeWarning, stacklevel=4)
                raise torch.linalg.LinAlgError(what)  # escalate_damp logs it and retries
            _warn(f"solver {solver!r}: {what}; keeping the mask-only weights for those rows "
                  "(raise --damp)")
            new = torch.where(bad.unsqueeze(1), problem.mask_only(), new)
        return problem, out, new, bad

    sync = torch.cuda.synchronize if weight.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    (problem, out, new, bad), used = escalate_damp(attempt, damp, what=f"solver {solver!r}")
    sync()
    seconds = time.perf_counter() - t0

    mask_only = problem.mask_only().to(weight.dtype).to(problem.dtype)
    before = figures(problem, mask_only - problem.weight)
    after = figures(problem, new - problem.weight)
    objective, mask_objective = after.objective, before.objective
    mask_rows = int(bad.sum())
    converged = out.converged and mask_rows == 0
    if not out.converged:
        _warn(f"solver {solver!r} did not converge in {out.iterations} iterations "
              f"(tol={'default' if tol is None else f'{tol:g}'}); its weights are kept but are short "
              "of the optimum: raise --max_iter or loosen --tol")
    kept = keep_better(objective, mask_objective, baseline=mask_objective, require_finite=True, positive_loss=True)
    if not kept.accepted:
        _warn(f"solver {solver!r} did not improve on the mask-only weights "
              f"(objective {objective:.4g} vs {mask_objective:.4g}); keeping the mask-only weights")
        new, after, converged, mask_rows = mask_only, before, False, new.shape[0]
    fallback = "mask_only" if mask_rows else ("damp" if used != damp else None)
    return Reconstruction(
        weight=new.to(dtype=weight.dtype, device=weight.device),
        objective=kept.objective,
        mask_objective=mask_objective,
        error_ratio=kept.error_ratio,
        kkt_residual=after.kkt_numerator / before.kkt_numerator if before.kkt_numerator > 0 else 0.0,
        iterations=out.iterations,
        converged=converged,
        solver=solver,
        seconds=seconds,
        damp=used,
        fallback=fallback,
        mask_only_rows=mask_rows,
        row_chunk=chunk,
    )
