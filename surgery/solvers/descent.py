"""First-order steps on the per-channel objectives, for where Gauss-Newton stalls.

Where the loss is L2 and the block has kinks (max-pool, ReLU), a channel's minimum often lies in a
valley that follows a kink (two max-pool inputs tied, a ReLU at zero): Gauss-Newton's model, taken on
one side of the kink, sees no descent there, while small first-order steps that cross it back and
forth slide along it. The fast solver ends such solves with :func:`descend` and one more
Gauss-Newton run.
"""

from __future__ import annotations

import torch

from .stacked import StackedBlock

__all__ = ["descend"]


def descend(
    stack: StackedBlock, mat: torch.Tensor, *, steps: int, lr: float, tol: float, check_every: int = 10
) -> torch.Tensor:
    """Up to ``steps`` Adam steps on the per-channel objectives from factors ``mat`` ``(m, taps)`` (one
    block call and its backward pass each), learning rate ``lr`` times the mean ``|mat|``; each channel
    keeps the best point it passed, which is returned. Stops early once ``check_every`` steps in a row
    gain less than ``tol`` of the objective."""
    x = mat.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr * float(mat.abs().mean().clamp_min(1e-12)))
    best_obj = best = None
    checked = float("inf")
    for i in range(steps + 1):
        with torch.enable_grad():
            obj = stack.objectives(stack.z(x).unsqueeze(0), x.unsqueeze(0))[0]  # (m,)
        with torch.no_grad():
            if best is None:
                best_obj, best = obj.detach().clone(), x.detach().clone()
            else:
                better = obj < best_obj
                best_obj = torch.where(better, obj, best_obj)
                best = torch.where(better[:, None], x, best)
        if i % check_every == 0:
            total = float(best_obj.sum())
            if checked - total <= tol * total:
                break
            checked = total
        if i == steps:
            break
        opt.zero_grad(set_to_none=True)
        obj.sum().backward()
        opt.step()
    return best
