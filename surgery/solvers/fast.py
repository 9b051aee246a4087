"""The fast solver: the rank-one problem split into one small problem per output channel.

With ``W' = W + lam (x) u`` the layer output is ``z = z0 + sum_t lam[:, t] * A_t``, where ``z0`` is the
unedited output and ``A_t`` the (one-channel) response of the layer to the unit update at tap ``t``
(for a conv: ``u^T k`` shifted by the kernel tap). Everything after the layer in a block (BN in eval
mode, residual add, ReLU, max-pool, layer-scale) acts per output channel, so channel ``o``'s value
depends on ``lam[:, o]`` alone: ``m`` independent problems with ``rank * kh * kw`` unknowns each.

Each is solved by damped Gauss-Newton (iteratively reweighted for L1) with a per-channel line search,
from zero and from the linearized solution, keeping the better end point per channel. The Jacobian of
the block with respect to one tap, for every channel at once, is one forward-mode product. Where the
block is affine in the weight and the loss is L2, the first step is the exact least-squares solution
``(A^T D A + ridge I)^{-1} A^T D R`` taken through the per-channel scale of the block, and the solve
ends there (:meth:`FastSolver.post_is_affine` tests the block numerically).
"""

from __future__ import annotations

import logging
import time
import warnings

import torch
from torch.func import jvp, vmap

from surgery.errors import UnsupportedModelError

from .joint import linear_in_weight, solve_joint
from .problem import EditProblem
from .responses import TapResponses, lam_to_mat, mat_to_lam

__all__ = ["solve_fast", "FastSolver"]

logger = logging.getLogger(__name__)

_STEP_SIZES = (1.0, 0.5, 0.25, 0.1, 0.03, 0.01)
_ENOUGH_IMPROVED = 0.9


class FastSolver:
    """Per-output-channel Gauss-Newton for one :class:`EditProblem`."""

    def __init__(self, problem: EditProblem) -> None:
        layer = problem.layer
        if not layer.channelwise:
            raise UnsupportedModelError(
                f"the block of {layer.name!r} mixes output channels ({layer.block}), so the fast "
                "solver's per-channel split does not apply; use solver='reference'"
            )
        if problem.u is None:
            raise ValueError("the problem has no direction u")
        self.problem = problem
        self.vdim = layer.value_channel_dim
        self.responses = TapResponses(problem)
        self.zdim = self.responses.zdim
        self.rank, self.m, self.taps = self.responses.rank, self.responses.m, self.responses.taps
        self.z0, self.designs = self.responses.z0, self.responses.designs
        self.numel = problem.values.numel()
        w = problem.weights
        self.d = None if w is None else w.expand_as(problem.values)

    # -- shapes -------------------------------------------------------------------------------
    def to_lam(self, mat: torch.Tensor) -> torch.Tensor:
        """``(m, taps)`` -> ``(rank, m, *kernel)``."""
        return mat_to_lam(mat, self.problem.lam_shape)

    def to_mat(self, lam: torch.Tensor) -> torch.Tensor:
        """``(rank, m, *kernel)`` -> ``(m, taps)``."""
        return lam_to_mat(lam)

    def _per_channel(self, t: torch.Tensor) -> torch.Tensor:
        """Values-shaped ``t`` -> ``(m, elements)``."""
        return t.movedim(self.vdim, 0).reshape(self.m, -1)

    # -- evaluation ---------------------------------------------------------------------------
    def layer_output(self, mat: torch.Tensor) -> torch.Tensor:
        """``z`` for factors ``mat`` ``(m, taps)``."""
        return self.responses.layer_output(mat)

    def post(self, z: torch.Tensor) -> torch.Tensor:
        layer = self.problem.layer
        if layer.post is None:
            return z
        return layer.post(z, self.problem.context)

    def channel_objective(self, mat: torch.Tensor) -> torch.Tensor:
        """The objective of each output channel, ``(m,)`` in float64; their sum is the objective."""
        with torch.no_grad():
            r = self._per_channel(self.post(self.layer_output(mat)) - self.problem.values).to(torch.float64)
            if self.d is not None:
                r = r * self._per_channel(self.d).to(torch.float64)
            loss = r.abs() if self.problem.loss == "l1" else r.square()
            obj = loss.sum(dim=1) / self.numel
            if self.problem.ridge:
                obj = obj + self.problem.ridge * mat.to(torch.float64).square().sum(dim=1)
        return obj

    def post_is_affine(self, mat: torch.Tensor, *, rtol: float = 1e-4) -> bool:
        """Whether the block after the layer is affine, tested along the move from ``z0`` to the layer
        output of ``mat`` and along a random move of each channel's spread: second differences vanish
        (to ``rtol`` of the first ones). ReLU, max-pool and GELU fail it; BN, layer-scale and residual
        adds pass."""
        with torch.no_grad():
            z0, base = self.z0, self.post(self.z0)
            g = torch.Generator(device=z0.device).manual_seed(0)
            dims = [d for d in range(z0.ndim) if d != self.zdim % z0.ndim]
            spread = z0.std(dim=dims, keepdim=True).nan_to_num(1.0).clamp_min(1e-6)
            noise = torch.randn(z0.shape, generator=g, dtype=z0.dtype, device=z0.device) * spread
            for move in (self.layer_output(mat) - z0, noise):
                up, down = self.post(z0 + move), self.post(z0 - move)
                first = (up - base).abs().max()
                if not bool((up + down - 2 * base).abs().max() <= rtol * first + 1e-30):
                    return False
        return True

    def _step(
        self, mat: torch.Tensor, loss: str, damping: torch.Tensor, smooth: float = 1e-6
    ) -> torch.Tensor:
        """One (damped, reweighted) Gauss-Newton step ``(m, taps)`` from ``mat``."""
        with torch.no_grad():
            z = self.layer_output(mat)
            # One forward-mode product per tap, batched: the block's response to each tap, every channel.
            tangents = torch.stack([a.expand_as(z) for a in self.designs])
            with warnings.catch_warnings():  # torch.func's vmap over jvp warns about torch.jit internals
                warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
                v, jt = vmap(lambda dz: jvp(self.post, (z,), (dz,)), out_dims=(None, 0))(tangents)
            j = torch.stack([self._per_channel(t) for t in jt], dim=1).to(torch.float64)  # (m, taps, e)
            r = self._per_channel(v - self.problem.values).to(torch.float64)
            d = None if self.d is None else self._per_channel(self.d).to(torch.float64)
            if loss == "l2":
                q = torch.ones_like(r) if d is None else d.square()
            else:  # L1 through a majorizing quadratic: d|r| <= d (r^2 / 2|r0| + |r0| / 2)
                absr = r.abs()
                floor = smooth * absr.mean(dim=1, keepdim=True) + 1e-30
                q = (1.0 if d is None else d) / (2 * absr.clamp_min(floor))
            qj = j * q[:, None, :]
            hess = torch.einsum("mte,mse->mts", qj, j) / self.numel
            grad = torch.einsum("mte,me->mt", qj, r) / self.numel
            ridge = self.problem.ridge
            eye = torch.eye(self.taps, dtype=torch.float64, device=hess.device)
            if ridge:
                hess = hess + ridge * eye
                grad = grad + ridge * mat.to(torch.float64)
            scale = hess.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)
            # A relative 1e-12 keeps rank-deficient channels (taps hidden by a dead ReLU or by
            # padding) solvable without moving well-posed ones measurably.
            hess = hess + ((damping + 1e-12) * scale)[:, None, None] * eye
            step = -torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)
            step = torch.nan_to_num(step, nan=0.0, posinf=0.0, neginf=0.0)
        return step.to(mat.dtype)

    def run(
        self, start: torch.Tensor, *, max_iter: int = 50, tol: float = 1e-4
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Gauss-Newton with a per-channel line search from ``start``; returns (mat, objectives, iters).

        Stops after ``max_iter`` iterations, or once two iterations in a row lower the objective by
        less than ``tol`` times its value.
        """
        mat = start.clone()
        obj = self.channel_objective(mat)
        damping = torch.zeros(self.m, dtype=torch.float64, device=mat.device)
        it = stalls = 0
        smooth = 1e-1  # L1: residuals below smooth * mean|r| weigh as if they were that large
        for it in range(1, max_iter + 1):
            step = self._step(mat, self.problem.loss, damping, smooth)
            smooth = max(smooth * 0.1, 1e-6)
            best_mat, best_obj = mat.clone(), obj.clone()
            accepted_full = torch.zeros(self.m, dtype=torch.bool, device=mat.device)
            for alpha in _STEP_SIZES:
                cand = mat + alpha * step
                cand_obj = self.channel_objective(cand)
                better = cand_obj < best_obj
                if alpha == 1.0:
                    accepted_full = better
                best_mat[better] = cand[better]
                best_obj[better] = cand_obj[better]
                # Backtracking evaluates the whole layer; once most channels have improved, the rest
                # get more damping (a shorter step) next iteration instead.
                if float((best_obj < obj).float().mean()) >= _ENOUGH_IMPROVED:
                    break
            improved = best_obj < obj
            damping = torch.where(
                improved,
                torch.where(accepted_full, damping / 3, damping),
                torch.clamp(damping * 10, min=1e-6),
            )
            gain = float((obj - best_obj).sum())
            mat, obj = best_mat, best_obj
            # Stop once a few iterations in a row gain nothing: failed channels get more damping first.
            stalls = stalls + 1 if gain <= tol * float(obj.sum()) + 1e-300 else 0
            if stalls >= 2:
                break
        return mat, obj, it

    def solve(self, *, max_iter: int = 100) -> tuple[torch.Tensor, dict]:
        """Solve from zero and from the linearized solution; keep each channel's better result."""
        start = time.perf_counter()
        zero = torch.zeros(self.m, self.taps, dtype=self.z0.dtype, device=self.z0.device)
        obj0 = self.channel_objective(zero)
        no_damping = torch.zeros(self.m, dtype=torch.float64, device=zero.device)
        linear = self._step(zero, "l2", no_damping)
        closed_form = self.problem.loss == "l2" and self.post_is_affine(linear)
        if closed_form:  # the linearized solution is the exact least-squares one
            mat, obj, results = linear, self.channel_objective(linear), []
        else:
            results = [self.run(zero, max_iter=max_iter), self.run(linear, max_iter=max_iter)]
            mat, obj, _ = results[0]
            for other_mat, other_obj, _ in results[1:]:
                better = other_obj < obj
                mat = torch.where(better[:, None], other_mat, mat)
                obj = torch.where(better, other_obj, obj)
        lam = self.to_lam(mat)
        with torch.no_grad():  # through the real block with W + lam u, not the per-channel model
            true_objective = float(self.problem.objective(lam))
        info = {
            "objective": true_objective,
            "objective_before": float(obj0.sum()),
            "iterations": [r[2] for r in results],
            "closed_form": closed_form,
            "seconds": time.perf_counter() - start,
        }
        logger.info(
            "fast solver on %s: objective %.6g -> %.6g", self.problem.layer.name, info["objective_before"], info["objective"]
        )
        return lam, info


def solve_fast(problem: EditProblem, *, max_iter: int = 100) -> tuple[torch.Tensor, dict]:
    """Solve ``problem`` with the per-channel decomposition; returns ``(lam, info)``.

    Blocks that mix output channels (squeeze-excite after the edited conv, a LayerNorm on the
    branch) and layers whose output is not linear in the weight (weight standardization) go to the
    joint Gauss-Newton solver of :mod:`surgery.solvers.joint` instead.
    """
    if not problem.layer.channelwise or not linear_in_weight(problem):
        return solve_joint(problem, max_iter=max_iter)
    return FastSolver(problem).solve(max_iter=max_iter)
