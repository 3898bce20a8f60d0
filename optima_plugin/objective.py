"""``--objective dense``: match the dense model's outputs, not the pruned path's (asymmetric calibration).

For one linear with dense weights ``W`` (``r x d``), the inputs ``X_p`` it sees in the pruned
model and the inputs ``X_d`` it sees in the dense model (``d x N``, the same tokens), the
update minimises over ``Ŵ`` with the mask's support

    f(Ŵ) = ‖W X_d − Ŵ X_p‖² / N = Σ_rows ŵᵀ H ŵ − 2 ŵᵀ G w + ‖w X_d‖² / N

with ``H = X_p X_pᵀ / N`` (the Hessian the package streams anyway) and the cross term
``G = X_p X_dᵀ / N`` (``d x d``). With the package's damping ``Hd = H + λI`` (dead inputs as
:func:`~optima_plugin.solvers.problem.damp_hessian` treats them) the damped problem
``ŵᵀ Hd ŵ − 2 ŵᵀ (G + λI) w`` is the usual ``Σ (ŵ − t)ᵀ Hd (ŵ − t)`` with the target rows
``T = W (G + λI)ᵀ Hd⁻¹`` (:func:`dense_target`), so every solver runs unchanged on ``T``;
``X_p = X_d`` gives ``T = W``. A dead input ``j`` (``H_jj = 0``) keeps ``t_j = w_j``.

The statistics come from one pass per input group of a block
(:meth:`~optima_plugin.pipeline.BlockPipeline.dense_statistics`), after the groups before it are pruned: a
dense copy of the block runs on the dense inputs, the partly pruned block on the pruned-path inputs,
chunk by chunk. (Taking every ``x_p`` from the still-dense block instead lets ``o_proj`` and ``down_proj``
correct again the error that q/k/v and gate/up corrected already: on SmolLM2-135M at 50% that doubled
correction gave perplexity 217 on held-out pydoc, against 16 for ``--objective pruned``.)
:class:`CrossAccumulator` pairs the two inputs of the same tokens, :class:`OutputEnergy` records
``‖w X_d‖² / N`` per row so that :func:`dense_objective` is absolute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .hessian import HessianAccumulator
from .solvers.problem import cholesky_checked, damp_hessian, escalate_damp

#: ``--objective`` values: ``pruned`` (match the layer's own outputs on the pruned path) or ``dense``.
OBJECTIVES = ("pruned", "dense")


class Phase:
    """Which of the two runs of a chunk the hooks see: the dense inputs (``dense``) or the pruned path's."""

    def __init__(self) -> None:
        self.dense = True


class CrossAccumulator:
    """Running means ``H = mean x_p x_pᵀ`` and ``G = mean x_p x_dᵀ`` over paired tokens of one linear input.

    As a forward hook: in the dense run of a chunk it keeps that chunk's dense inputs ``x_d``;
    in the pruned run of the same chunk it pairs them with ``x_p`` token by token. ``hessian`` and
    ``cross`` are ``d x d`` in ``dtype`` on the inputs' device.
    """

    def __init__(self, dtype: torch.dtype = torch.float32, phase: Optional[Phase] = None) -> None:
        self.dtype = dtype
        self.phase = phase if phase is not None else Phase()
        self._h = HessianAccumulator(dtype)
        self.cross: Optional[Tensor] = None
        self._dense: Optional[Tensor] = None

    @property
    def hessian(self) -> Optional[Tensor]:
        return self._h.hessian

    @property
    def tokens(self) -> int:
        return self._h.tokens

    def add(self, x_p: Tensor, x_d: Tensor) -> None:
        """Add paired batches of inputs ``(..., d)`` (the same tokens, pruned path and dense model)."""
        x_p = x_p.detach().reshape(-1, x_p.shape[-1]).to(self.dtype)
        x_d = x_d.detach().reshape(-1, x_d.shape[-1]).to(device=x_p.device, dtype=self.dtype)
        if x_p.shape != x_d.shape:
            raise ValueError(f"paired inputs differ in shape: pruned path {tuple(x_p.shape)}, "
                             f"dense {tuple(x_d.shape)}")
        k, n = x_p.shape[0], self._h.tokens
        if k == 0:
            return
        if self.cross is None:
            self.cross = torch.zeros(x_p.shape[1], x_p.shape[1], dtype=self.dtype, device=x_p.device)
        self.cross.addmm_(x_p.T, x_d, beta=n / (n + k), alpha=1.0 / (n + k))
        self._h.add(x_p)

    def all_reduce(self, dist, d: int) -> None:
        """Under torchrun: ``H``, ``G`` and the token count become the job's token-weighted means (``dist.mean``)."""
        n = self._h.tokens
        self._h.hessian, _ = dist.mean(self._h.hessian, n, (d, d), self.dtype)
        self.cross, self._h.tokens = dist.mean(self.cross, n, (d, d), self.dtype)

    def hook(self, module: nn.Module, inputs: tuple, output) -> None:
        """``register_forward_hook`` callback: keep ``x_d`` (dense run), or pair it with ``x_p``."""
        if self.phase.dense:
            self._dense = inputs[0].detach()
            return
        if self._dense is None:
            raise RuntimeError("the pruned-path run of a chunk came before its dense run")
        self.add(inputs[0], self._dense)
        self._dense = None


class OutputEnergy:
    """Per row of one linear, the running mean of ``(w x_d)²`` over the dense run's tokens (no bias).

    ``energy`` is ``(r,)`` in ``dtype``: summed over rows it is ``‖W X_d‖² / N``, the constant of
    :func:`dense_objective`. Computed from ``x_d`` and the weights in ``dtype`` (not from the
    layer's output, which a half-precision model rounds).
    """

    def __init__(self, dtype: torch.dtype = torch.float32, phase: Optional[Phase] = None) -> None:
        self.dtype = dtype
        self.phase = phase if phase is not None else Phase()
        self.energy: Optional[Tensor] = None
        self.tokens = 0

    def add(self, x_d: Tensor, weight: Tensor) -> None:
        """Add dense inputs ``(..., d)`` of a linear with weights ``weight`` (``r x d``)."""
        x = x_d.detach().reshape(-1, x_d.shape[-1]).to(self.dtype)
        k, n = x.shape[0], self.tokens
        if k == 0:
            return
        sq = (x @ weight.detach().to(device=x.device, dtype=self.dtype).T).square_().sum(dim=0)
        self.energy = sq / k if self.energy is None else self.energy * (n / (n + k)) + sq / (n + k)
        self.tokens = n + k

    def all_reduce(self, dist, r: int) -> None:
        """Under torchrun: ``energy`` and the token count become the job's token-weighted means."""
        self.energy, self.tokens = dist.mean(self.energy, self.tokens, (r,), self.dtype)

    def hook(self, module: nn.Module, inputs: tuple, output) -> None:
        """``register_forward_hook`` callback: accumulate in the dense run only."""
        if self.phase.dense:
            self.add(inputs[0], module.weight)


@dataclass
class DenseTerms:
    """The dense objective's statistics of one linear (see the module docstring).

    Attributes:
        hessian: ``d x d`` ``H = X_p X_pᵀ / N`` (pruned-path inputs).
        cross: ``d x d`` ``G = X_p X_dᵀ / N``.
        energy: ``(r,)`` ``‖w X_d‖² / N`` of each row of the dense weights.
        tokens: ``N``.
    """

    hessian: Tensor
    cross: Tensor
    energy: Tensor
    tokens: int


def dense_target(weight: Tensor, hessian: Tensor, cross: Tensor, damp: float) -> tuple[Tensor, float]:
    """The target rows ``T = W (G + D)ᵀ Hd⁻¹`` (``r x d``, ``hessian``'s dtype and device) and the damp used.

    ``Hd = damp_hessian(sym(H), damp)`` exactly as :func:`~optima_plugin.solvers.reconstruct` builds it
    and ``D = diag(Hd) − diag(H)`` (``λ`` on live inputs, ``1 + λ`` on dead ones, whose ``t_j = w_j``).
    A Cholesky failure escalates ``damp`` (:func:`~optima_plugin.solvers.problem.escalate_damp`);
    solve with the returned damp so the target and the solver's ``Hd`` agree.
    """
    dtype, device = hessian.dtype, hessian.device
    h = hessian.detach()
    sym = 0.5 * (h + h.T)
    g = cross.detach().to(device=device, dtype=dtype)
    w = weight.detach().to(device=device, dtype=dtype)

    def attempt(dmp: float, last: bool) -> Tensor:
        damped = damp_hessian(sym, dmp)
        chol = cholesky_checked(damped, "damped Hessian of the dense target")
        shift = damped.diagonal() - sym.diagonal()
        rhs = w @ g.T + w * shift  # rows: (G + D) w
        return torch.cholesky_solve(rhs.T, chol).T.contiguous()

    return escalate_damp(attempt, damp, what="dense target")


def dense_objective(weight: Tensor, new_weight: Tensor, terms: DenseTerms) -> float:
    """``f(Ŵ) = Σ_rows ŵᵀHŵ − 2ŵᵀGw + ‖wX_d‖²/N`` (undamped), ``Ŵ = new_weight``, ``W = weight`` (dense).

    In float32 (float64 if ``terms.hessian`` is), any input dtypes; a float. ``terms`` must be the statistics of
    the same tokens as measured (``‖W X_d − Ŵ X_p‖² / N``, never negative): ``H`` and ``G`` shrunk without the
    constant are no squared error, so the engine reports this on the unshrunk ones.
    """
    dtype = torch.float64 if terms.hessian.dtype == torch.float64 else torch.float32
    h = terms.hessian.to(dtype)
    new = new_weight.to(device=h.device, dtype=dtype)
    w = weight.to(device=h.device, dtype=dtype)
    rows = ((new @ h) * new).sum(dim=1) - 2.0 * ((w @ terms.cross.to(dtype).T) * new).sum(dim=1) \
        + terms.energy.to(device=h.device, dtype=dtype)
    return float(rows.double().sum())


def validate_config(config) -> None:
    """``--objective``: a known name; ``dense`` needs the optima update and no ``--input_recalc``."""
    if config.objective not in OBJECTIVES:
        raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {config.objective!r}")
    if config.objective == "pruned":
        return
    if config.weight_update != "optima":
        raise ValueError(f"--objective dense changes the target of the weight update, which --weight_update "
                         f"{config.weight_update} does not solve for (it would change nothing): use "
                         "--weight_update optima, or drop --objective dense")
    if config.input_recalc:
        raise ValueError("--objective dense needs the dense model's inputs of each linear, taken while its "
                         "block is still dense; --input_recalc recomputes them from a partly pruned block: "
                         "drop one of them")
    if isinstance(config.damp, str):
        raise ValueError(f"--damp {config.damp} chooses each layer's damp on held-out windows of the pruned-path "
                         "Hessian alone; --objective dense needs one damp for its target rows: give --damp a "
                         "number with --objective dense, or drop --objective dense")
    if config.sink_tokens != "keep":
        raise ValueError(f"--sink_tokens {config.sink_tokens} is not applied to the paired dense/pruned statistics "
                         "of --objective dense (the cross term would mix filtered and unfiltered tokens): "
                         "use --sink_tokens keep with --objective dense, or drop --objective dense")
