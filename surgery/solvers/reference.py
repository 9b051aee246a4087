"""The reference solver: what the paper's authors ran.

Adam on the full weight, projected back onto ``W + lam (x) u`` every ``project_every`` steps and after
the last one. Slow, and early-stopped: its result depends on ``lr`` and ``steps``, which act as
regularization.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from surgery.errors import SurgeryError

from .problem import EditProblem

__all__ = ["solve_reference"]

logger = logging.getLogger(__name__)


def solve_reference(
    problem: EditProblem,
    *,
    steps: int = 20_000,
    lr: float = 1e-4,
    restrict_rank: bool = True,
    project_every: int = 10,
    progress: bool = False,
    callback: Callable[[int], None] | None = None,
    callback_every: int = 1000,
) -> tuple[torch.Tensor, dict]:
    """Run Adam on the full weight.

    ``callback(steps_taken)`` is called after every ``callback_every`` steps (to log, or to time other
    work side by side with the run); the time it takes is not counted in ``info["seconds"]``.

    Returns:
        ``(lam, info)`` when ``restrict_rank``; otherwise ``(dense_delta, info)``. ``info`` holds the
        final objective (``ridge`` is not part of the reference objective), steps, seconds and the
        objective's ``trajectory`` ``[(steps taken, objective), ...]``.
    """
    if steps < 1:
        raise SurgeryError(f"steps must be >= 1, got {steps}")
    if callback_every < 1:
        raise SurgeryError(f"callback_every must be >= 1, got {callback_every}")
    w0 = problem.weight0
    weight = w0.clone().requires_grad_(True)
    opt = torch.optim.Adam([weight], lr=lr)
    start = time.perf_counter()
    lam = None
    # (steps taken, objective) at 1-2-5 multiples of project_every, read right after a projection:
    # what the weight on W + lam (x) u scores as the run goes on
    marks = {m * d * project_every for m in (1, 2, 5) for d in (10**e for e in range(9))}
    trajectory: list[tuple[int, float]] = []
    outside = 0.0  # seconds spent in the callback
    for step in tqdm(range(steps), desc=f"reference {problem.layer.name}", disable=not progress):
        opt.zero_grad(set_to_none=True)
        loss = problem.loss_of_weight(weight)
        if step == 0 or step in marks:
            trajectory.append((step, float(loss.detach())))
        loss.backward()
        opt.step()
        last = step == steps - 1
        if restrict_rank and ((step + 1) % project_every == 0 or last):
            with torch.no_grad():
                lam = problem.projection(weight)
                weight.copy_(problem.weight_for(lam))
        if callback is not None and (step + 1) % callback_every == 0:
            begun = time.perf_counter()
            callback(step + 1)
            outside += time.perf_counter() - begun
    with torch.no_grad():
        final = float(problem.loss_of_weight(weight))
    trajectory.append((steps, final))
    info = {"objective": final, "steps": steps, "seconds": time.perf_counter() - start - outside, "trajectory": trajectory}
    logger.info("reference solver on %s: objective %.6g after %d steps", problem.layer.name, final, steps)
    if restrict_rank:
        assert lam is not None
        return lam.detach(), info
    return (weight.detach() - w0), info
