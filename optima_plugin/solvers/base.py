"""What every solver returns, and the solver registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

from torch import Tensor

from .problem import Problem


@dataclass
class SolverOutput:
    """Raw solver result, before the shared figures are computed.

    Attributes:
        weight: ``r x d`` in the problem's compute dtype; pruned entries are 0.
        iterations: iterations (or sequential steps) the solver ran.
        converged: whether the solver met its own tolerance.
    """

    weight: Tensor
    iterations: int
    converged: bool


class Solver(Protocol):
    def __call__(
        self, problem: Problem, *, tol: Optional[float], max_iter: Optional[int]
    ) -> SolverOutput: ...


SOLVERS: dict[str, Callable[..., SolverOutput]] = {}


def register_solver(name: str) -> Callable[[Solver], Solver]:
    """Decorator adding a solver function to :data:`SOLVERS` under ``name``."""

    def deco(fn: Solver) -> Solver:
        SOLVERS[name] = fn
        return fn

    return deco


def get_solver(name: str) -> Solver:
    """Look up a solver, listing the known names when ``name`` is unknown."""
    try:
        return SOLVERS[name]
    except KeyError:
        known = ", ".join(sorted(SOLVERS))
        raise ValueError(f"unknown solver {name!r}; known solvers: {known}") from None
