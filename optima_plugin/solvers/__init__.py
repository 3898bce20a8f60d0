"""Batched solvers for the layer-wise reconstruction QP (see ``problem.py``)."""

from . import adam, direct, pcg, pdhg, sparsegpt  # noqa: F401  (register solvers)
from .base import SOLVERS, SolverOutput, get_solver, register_solver
from .problem import Problem, damp_hessian, prepare
from .reconstruct import Reconstruction, reconstruct

__all__ = [
    "SOLVERS",
    "Problem",
    "Reconstruction",
    "SolverOutput",
    "damp_hessian",
    "get_solver",
    "prepare",
    "reconstruct",
    "register_solver",
]
