"""The layer-wise reconstruction problem shared by every solver.

For a linear layer ``y = W x`` with ``W`` of shape ``r x d`` and a fixed mask
``pruned`` (bool ``r x d``, True = pruned), each row ``w`` solves

    minimize (ŵ - w)ᵀ H (ŵ - w)   subject to   ŵ_j = 0 where pruned

with ``H`` the mean of ``x xᵀ`` over calibration tokens. Solvers work on the
damped Hessian ``H + λI`` (``λ = damp · mean(diag H)``, dead inputs with
``H_jj = 0`` get ``H_jj = 1``); figures are reported with the undamped ``H``.

A damped Hessian that Cholesky rejects (``damp = 0`` with fewer calibration
tokens than inputs, say) is not an error: :func:`escalate_damp` retries with
more damping (``× DAMP_GROWTH``, at least ``DAMP_FLOOR``) up to
``DAMP_RETRIES`` times, logging each step, and reports the damp it used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, TypeVar

import torch
from torch import Tensor

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Relative damp tried first when ``damp = 0`` (or a smaller one) fails: about float32's
#: machine epsilon (1.2e-7) times ten, the smallest shift that reliably moves a float32
#: Cholesky pivot off rounding noise; each further retry multiplies by ``DAMP_GROWTH``.
DAMP_FLOOR = 1e-6
DAMP_GROWTH = 10.0
#: Escalations before giving up (0.01 ends at 100, 0 at 1e-3).
DAMP_RETRIES = 4


@dataclass(frozen=True)
class Problem:
    """A validated problem in the solver's compute dtype, on the weight's device.

    Attributes:
        weight: ``r x d`` dense weights to reconstruct.
        pruned: bool ``r x d``, True = pruned.
        hessian: ``d x d`` undamped Hessian as given, not symmetrised (used for the reported
            figures only, so that they equal :func:`reconstruction_error`'s).
        damped: ``d x d`` damped Hessian the solvers minimise with.
        damp: the relative damp ``damped`` was built with.
        cache: factorisations of ``damped``, shared by every row subset of the problem.
        start: optional ``r x d`` weights (pruned entries 0) a solver may start from (a warm start, e.g. a
            selector's own update); the solution it must reach is the same.
    """

    weight: Tensor
    pruned: Tensor
    hessian: Tensor
    damped: Tensor
    damp: float = 0.0
    cache: dict = field(default_factory=dict, repr=False, compare=False)
    start: Optional[Tensor] = field(default=None, repr=False, compare=False)

    @property
    def keep(self) -> Tensor:
        return ~self.pruned

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def mask_only(self) -> Tensor:
        """``r x d`` weights with pruned entries zeroed and nothing compensated."""
        return self.weight.masked_fill(self.pruned, 0.0)

    def pruned_part(self) -> Tensor:
        """``r x d`` ``w ∘ pruned``: what the mask removes from each row."""
        return self.weight.masked_fill(~self.pruned, 0.0)

    def memo(self, key: str, compute: Callable[[], Tensor]) -> Tensor:
        """``compute()`` once per problem (and its row subsets), e.g. a factor of ``damped``."""
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def inverse(self) -> Tensor:
        """``d x d`` ``Hd⁻¹`` via Cholesky; raises ``LinAlgError`` if ``Hd`` is not positive definite."""
        return self.memo("inverse", lambda: inverse_spd(self.damped))

    def rows(self, index: slice) -> "Problem":
        """The sub-problem of rows ``index``, sharing ``H``, ``Hd`` and their cached factors."""
        start = None if self.start is None else self.start[index]
        return replace(self, weight=self.weight[index], pruned=self.pruned[index], start=start)


def validate(weight: Tensor, pruned: Tensor, hessian: Tensor) -> None:
    """Raise ``TypeError``/``ValueError`` with a clear message for bad input."""
    for name, t in (("weight", weight), ("pruned", pruned), ("hessian", hessian)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (rows x inputs), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if pruned.dtype != torch.bool:
        raise TypeError(f"pruned must be a bool mask (True = pruned), got {pruned.dtype}")
    if pruned.shape != weight.shape:
        raise ValueError(
            f"pruned has shape {tuple(pruned.shape)} but weight has shape {tuple(weight.shape)}"
        )
    d = weight.shape[1]
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian must be square (d x d), got shape {tuple(hessian.shape)}")
    if hessian.shape[0] != d:
        raise ValueError(
            f"hessian is {hessian.shape[0]} x {hessian.shape[1]} but weight has {d} inputs (columns)"
        )
    if not hessian.is_floating_point():
        raise TypeError(f"hessian must be a floating-point tensor, got {hessian.dtype}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or infinite values")
    if not torch.isfinite(hessian).all():
        raise ValueError("hessian contains NaN or infinite values")


def damp_hessian(hessian: Tensor, damp: float) -> Tensor:
    """Return ``H + λI`` with dead inputs (``H_jj = 0``) set to 1 first.

    ``λ = damp · mean(diag H)`` over the live inputs. ``hessian`` is not modified.
    """
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    damped = hessian.clone()
    diag = damped.diagonal()
    dead = diag <= 0
    damped[dead, :] = 0.0
    damped[:, dead] = 0.0
    diag[dead] = 1.0
    live = diag[~dead]
    lam = damp * (live.mean() if live.numel() else torch.ones((), dtype=diag.dtype, device=diag.device))
    diag += lam
    return damped


def escalated(damp: float) -> float:
    """The next relative damp after ``damp`` failed: ``× DAMP_GROWTH``, at least ``DAMP_FLOOR``."""
    return max(damp * DAMP_GROWTH, DAMP_FLOOR)


def escalate_damp(attempt: Callable[[float, bool], T], damp: float, *, what: str) -> tuple[T, float]:
    """Run ``attempt(damp, last)``, retrying with more damping while it raises ``LinAlgError``.

    The one escalation mechanism of the package. Each retry uses ``escalated(damp)``
    and logs a warning naming the old and new damp; ``last`` is True on the final
    try (``DAMP_RETRIES`` escalations), whose failure raises ``LinAlgError``.

    Returns:
        ``(attempt's result, the relative damp it succeeded with)``.
    """
    current = damp
    for retry in range(DAMP_RETRIES + 1):
        last = retry == DAMP_RETRIES
        try:
            return attempt(current, last), current
        except torch.linalg.LinAlgError as err:
            if last:
                raise torch.linalg.LinAlgError(
                    f"{what}: still failing with damp={current:g} after {DAMP_RETRIES} escalations "
                    f"from damp={damp:g} ({err}). A Hessian that needs more is usually not a valid "
                    "mean of x xᵀ: check the calibration activations (overflow in half precision, a "
                    "broken accumulation), or pass a larger --damp explicitly."
                ) from err
            new = escalated(current)
            log.warning("%s: %s; escalating damp %g -> %g (retry %d of %d)",
                        what, err, current, new, retry + 1, DAMP_RETRIES)
            current = new
    raise AssertionError("unreachable")


def solver_damped(hessian: Tensor, damp: float) -> Tensor:
    """The damped Hessian the solvers minimise with: ``H`` symmetrised (accumulation leaves rounding-level
    asymmetry; an exactly symmetric ``H`` is unchanged), then :func:`damp_hessian`."""
    return damp_hessian(0.5 * (hessian + hessian.T), damp)


@dataclass(frozen=True)
class Warm:
    """What a solve may start from (:func:`reconstruct`'s ``warm``): neither changes the solution it must reach.

    Attributes:
        weight: ``r x d`` weights with pruned entries 0 (a selector's own update), or None.
        inverse: ``d x d`` ``(solver_damped(hessian, damp))⁻¹`` computed by the selector, or None.
        hessian: the Hessian ``inverse`` was computed from (the very tensor: reused only for it).
        damp: the relative damp ``inverse`` was computed with (reused only at that damp).
    """

    weight: Optional[Tensor] = None
    inverse: Optional[Tensor] = None
    hessian: Optional[Tensor] = None
    damp: Optional[float] = None


def prepare(
    weight: Tensor, pruned: Tensor, hessian: Tensor, *, damp: float, double_precision: bool,
    warm: Optional[Warm] = None
) -> Problem:
    """Validate and convert inputs to the compute dtype on ``weight.device``.

    ``warm``: its weights become the problem's ``start``; its inverse is the problem's ``Hd⁻¹`` when it was
    computed from this very ``hessian`` at this ``damp`` in the compute dtype (else it is computed again).
    """
    validate(weight, pruned, hessian)
    dtype = torch.float64 if double_precision else torch.float32
    w = weight.detach().to(dtype=dtype, copy=True)
    h = hessian.detach().to(device=w.device, dtype=dtype)
    m = pruned.to(w.device)
    start = None
    if warm is not None and warm.weight is not None and warm.weight.shape == w.shape:
        start = warm.weight.detach().to(device=w.device, dtype=dtype).masked_fill(m, 0.0)
    # the solvers' damped H tolerates accumulation asymmetry; the figures use H as given
    problem = Problem(weight=w, pruned=m, hessian=h, damped=solver_damped(h, damp), damp=damp, start=start)
    if (warm is not None and warm.inverse is not None and warm.hessian is hessian and warm.damp == damp
            and warm.inverse.dtype == dtype and warm.inverse.device == w.device):
        problem.cache["inverse"] = warm.inverse
    return problem


def cholesky_checked(matrix: Tensor, what: str = "damped Hessian", *, upper: bool = False) -> Tensor:
    """Cholesky factor of ``matrix`` (``... x k x k``, batched allowed), lower unless ``upper``.

    Raises ``torch.linalg.LinAlgError`` naming ``what`` when any matrix is not
    positive definite (callers escalate damping through :func:`escalate_damp`).
    """
    chol, info = torch.linalg.cholesky_ex(matrix, upper=upper)
    if bool((info != 0).any()):
        raise torch.linalg.LinAlgError(
            f"{what} is not positive definite (Cholesky failed at pivot {int(info.max())})"
        )
    return chol


def inverse_spd(matrix: Tensor) -> Tensor:
    """Inverse of a symmetric positive definite ``d x d`` matrix via Cholesky."""
    return torch.cholesky_inverse(cholesky_checked(matrix))


def obs_factor(damped: Tensor) -> Tensor:
    """``d x d`` upper Cholesky factor ``U`` of ``Hd⁻¹ = Uᵀ U`` (SparseGPT's ``Hinv``)."""
    return cholesky_checked(inverse_spd(damped), "inverse of the damped Hessian", upper=True)


def objective_per_row(hessian: Tensor, delta: Tensor) -> Tensor:
    """``(r,)`` values of ``δᵀ H δ`` for each row of ``delta`` (``r x d``)."""
    return ((delta @ hessian) * delta).sum(dim=1)


@dataclass
class Figures:
    """The figures every solver reports (see DESIGN §1)."""

    objective: float
    kkt_numerator: float


def figures(problem: Problem, delta: Tensor) -> Figures:
    """Undamped objective ``Σ δᵀHδ`` and ``‖keep ∘ (δ Hd)‖_F`` with one GEMM.

    ``δ Hd = δ H + δ ∘ (Hd - H)_diag`` because damping only touches the diagonal.
    """
    prod = delta @ problem.hessian
    objective = float((prod * delta).sum(dim=1).sum())  # summed as reconstruction_error sums it: the same float
    shift = problem.damped.diagonal() - problem.hessian.diagonal()
    stationarity = (prod + delta * shift).masked_fill(problem.pruned, 0.0)
    return Figures(objective, float(stationarity.norm()))


def reconstruction_error(weight: Tensor, new_weight: Tensor, hessian: Tensor) -> float:
    """``Σ_rows (ŵ - w)ᵀ H (ŵ - w)`` in float32 (float64 if ``hessian`` is), any input dtypes."""
    dtype = torch.float64 if hessian.dtype == torch.float64 else torch.float32
    delta = new_weight.to(dtype) - weight.to(dtype)
    return float(objective_per_row(hessian.to(device=delta.device, dtype=dtype), delta).sum())
