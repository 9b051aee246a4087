"""Solver settings as small typed configs: each solver takes its own options and nothing else.

``surgery.rewrite(..., solver=FastConfig(ridge=1e-3))`` or ``solver=ReferenceConfig(steps=4000)``; the
strings ``"fast"`` and ``"reference"`` stand for the defaults, and :func:`solver_config` builds a config
from a name and loose options (the keywords ``rewrite`` and the CLI take), refusing an option that does not
belong to that solver. ``solve`` runs it; ``hparams`` is what an edit file records of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from surgery.errors import SurgeryError

from .fast import MAX_ITER, solve_fast
from .problem import EditProblem
from .reference import solve_reference

__all__ = ["FastConfig", "ReferenceConfig", "SolverConfig", "SOLVERS", "solver_config"]


@dataclass(frozen=True)
class FastConfig:
    """The fast solver: per-output-channel Gauss-Newton (``surgery.solvers.fast``); blocks that mix output
    channels, or layers not linear in their weight, go to the joint solver (recorded as ``"joint"``).

    Attributes:
        ridge: adds ``ridge * ||lam||^2`` to the objective: a weaker, smaller edit.
        max_iter: the most Gauss-Newton iterations of each run.
    """

    name: ClassVar[str] = "fast"
    ridge: float = 0.0
    max_iter: int = MAX_ITER

    def __post_init__(self) -> None:
        if not (isinstance(self.ridge, (int, float)) and 0 <= self.ridge < math.inf):
            raise SurgeryError(f"ridge must be a finite number >= 0, got {self.ridge!r}")
        if not (isinstance(self.max_iter, int) and self.max_iter >= 1):
            raise SurgeryError(f"max_iter must be an integer >= 1, got {self.max_iter!r}")

    @property
    def problem_ridge(self) -> float:
        """The ridge the problem's objective carries."""
        return float(self.ridge)

    def solve(self, problem: EditProblem) -> tuple[torch.Tensor, dict]:
        """``(lam, info)``; ``info["solver"]`` names the solver that ran (``"fast"`` or ``"joint"``)."""
        lam, info = solve_fast(problem, max_iter=self.max_iter)
        info.setdefault("solver", self.name)
        return lam, info

    def hparams(self) -> dict[str, Any]:
        return {"ridge": float(self.ridge), "max_iter": self.max_iter}


@dataclass(frozen=True)
class ReferenceConfig:
    """The reference solver, as the paper ran it: Adam on the full weight, projected back onto the rank-one
    update every 10 steps (``surgery.solvers.reference``); ``lr`` and ``steps`` regularize it.

    Attributes:
        steps: Adam steps (20,000 for the paper's real-world cases).
        lr: Adam's learning rate.
        restrict_rank: ``False`` optimizes the whole weight (the paper's ablation; a dense edit).
        progress: a progress bar.
    """

    name: ClassVar[str] = "reference"
    steps: int = 20_000
    lr: float = 1e-4
    restrict_rank: bool = True
    progress: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise SurgeryError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf):
            raise SurgeryError(f"lr must be a finite number > 0, got {self.lr!r}")

    @property
    def problem_ridge(self) -> float:
        return 0.0

    def solve(self, problem: EditProblem) -> tuple[torch.Tensor, dict]:
        """``(lam, info)``, or ``(dense delta, info)`` without the rank restriction."""
        result, info = solve_reference(
            problem, steps=self.steps, lr=self.lr, restrict_rank=self.restrict_rank, progress=self.progress
        )
        info.setdefault("solver", self.name)
        return result, info

    def hparams(self) -> dict[str, Any]:
        return {"steps": self.steps, "lr": float(self.lr), "restrict_rank": self.restrict_rank}


SolverConfig = FastConfig | ReferenceConfig
SOLVERS: dict[str, type[FastConfig] | type[ReferenceConfig]] = {"fast": FastConfig, "reference": ReferenceConfig}


def solver_config(solver: str | SolverConfig = "fast", **options: Any) -> SolverConfig:
    """The config of ``solver`` (a name or a config) with ``options`` set; options left ``None`` are not set.

    ``steps`` given to the fast solver sets ``max_iter`` (its meaning there before configs existed).

    Raises:
        SurgeryError: an unknown solver, an option the solver does not have, or options beside a config
            (set them on the config instead).
    """
    given = {k: v for k, v in options.items() if v is not None}
    if isinstance(solver, (FastConfig, ReferenceConfig)):
        if given:
            raise SurgeryError(
                f"{', '.join(sorted(given))} given beside solver={solver!r}: set them on the config, e.g. "
                f"solver={type(solver).__name__}({next(iter(sorted(given)))}=...)"
            )
        return solver
    if solver not in SOLVERS:
        raise SurgeryError(
            f"solver must be one of {tuple(SOLVERS)} or a FastConfig / ReferenceConfig, got {solver!r}"
        )
    cls = SOLVERS[solver]
    if cls is FastConfig and "steps" in given:
        if "max_iter" in given:
            raise SurgeryError("give the fast solver steps or max_iter, not both (they are the same setting)")
        given["max_iter"] = given.pop("steps")
    own = {f.name for f in fields(cls)}
    stray = sorted(set(given) - own)
    if stray:
        others = [name for name, c in SOLVERS.items() if set(stray) <= {f.name for f in fields(c)}]
        hint = f"; it belongs to solver={others[0]!r}" if others else ""
        raise SurgeryError(
            f"{', '.join(stray)} is not an option of the {solver} solver (its options: {', '.join(sorted(own))}){hint}"
        )
    return cls(**given)

