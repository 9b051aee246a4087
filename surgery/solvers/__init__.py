"""Solvers for the rank-one edit: ``reference`` (Adam on the full weight, as the paper) and ``fast``
(per-output-channel Gauss-Newton, which hands blocks that mix channels to the ``joint`` solver)."""

from .config import SOLVERS, FastConfig, ReferenceConfig, SolverConfig, solver_config
from .fast import FastSolver, solve_fast
from .joint import JointSolver, linear_in_weight, solve_joint
from .problem import EditProblem, Loss, value_weights
from .reference import solve_reference

__all__ = [
    "FastConfig",
    "ReferenceConfig",
    "SolverConfig",
    "SOLVERS",
    "solver_config",
    "EditProblem",
    "Loss",
    "value_weights",
    "FastSolver",
    "solve_fast",
    "JointSolver",
    "solve_joint",
    "linear_in_weight",
    "solve_reference",
]
