"""The layer-wise reconstruction problem shared by every solver.

For a linear layer ``y = W x`` with ``W`` of shape ``r x d`` and a fixed mask
``pruned`` (bool ``r x d``, True = pruned), each row ``w`` solves

    minimize (ŵ - w)ᵀ H (ŵ - w)   subject to   ŵ_j = 0 where pruned

with ``H`` the mean of ``x xᵀ`` over calibration tokens. Solvers work on the
damped Hessian ``H + λI`` (``λ = damp · mean(diag H)``, dead inputs with
``H_jj = 0`` get ``H_jj = 1``); figures are reported with the undamped ``H``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Problem:
    """A validated problem in the solver's compute dtype, on the weight's device.

    Attributes:
        weight: ``r x d`` dense weights to reconstruct.
        pruned: bool ``r x d``, True = pruned.
        hessian: ``d x d`` undamped Hessian (used for reported figures).
        damped: ``d x d`` damped Hessian the solvers minimise with.
    """

    weight: Tensor
    pruned: Tensor
    hessian: Tensor
    damped: Tensor

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


def prepare(
    weight: Tensor, pruned: Tensor, hessian: Tensor, *, damp: float, double_precision: bool
) -> Problem:
    """Validate and convert inputs to the compute dtype on ``weight.device``."""
    validate(weight, pruned, hessian)
    dtype = torch.float64 if double_precision else torch.float32
    w = weight.detach().to(dtype=dtype, copy=True)
    h = hessian.detach().to(device=w.device, dtype=dtype)
    h = 0.5 * (h + h.T)  # tolerate accumulation asymmetry
    m = pruned.to(w.device)
    return Problem(weight=w, pruned=m, hessian=h, damped=damp_hessian(h, damp))


def inverse_spd(matrix: Tensor) -> Tensor:
    """Inverse of a symmetric positive definite ``d x d`` matrix via Cholesky."""
    chol, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise torch.linalg.LinAlgError(
            "damped Hessian is not positive definite; increase damp"
        )
    return torch.cholesky_inverse(chol)


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
    objective = float((prod * delta).sum())
    shift = problem.damped.diagonal() - problem.hessian.diagonal()
    stationarity = (prod + delta * shift).masked_fill(problem.pruned, 0.0)
    return Figures(objective, float(stationarity.norm()))


def reconstruction_error(weight: Tensor, new_weight: Tensor, hessian: Tensor) -> float:
    """``Σ_rows (ŵ - w)ᵀ H (ŵ - w)`` in float32 (float64 if ``hessian`` is), any input dtypes."""
    dtype = torch.float64 if hessian.dtype == torch.float64 else torch.float32
    delta = new_weight.to(dtype) - weight.to(dtype)
    return float(objective_per_row(hessian.to(device=delta.device, dtype=dtype), delta).sum())
