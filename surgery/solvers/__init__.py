"""Solvers for the rank-one edit: ``reference`` (Adam on the full weight, as the paper) and ``fast``."""

from .fast import FastSolver, solve_fast
from .problem import EditProblem, Loss, value_weights
from .reference import solve_reference

__all__ = ["EditProblem", "Loss", "value_weights", "FastSolver", "solve_fast", "solve_reference"]
