"""The joint solver: damped Gauss-Newton over all of ``lam`` at once, for blocks the per-channel split
of the fast solver does not cover.

Two cases reach it (``solve_fast`` dispatches here):

- the block mixes output channels after the edited layer (``layer.channelwise`` is False):
  squeeze-excite after the edited conv (timm SE-ResNeXt), a LayerNorm on the residual branch
  (res-post-norm Swin V2, ``ResPostBlock``, ``EvaBlockPostNorm``). Every value then depends on every
  output channel's coefficients, through the pooled gate or the per-position mean and variance;
- the layer's output is not linear in its weight (BiT's ``StdConv2d`` standardizes the weight inside
  its forward), so the fast solver's precomputed responses would be wrong.

The unknowns are the ``rank * m * kh * kw`` entries of ``lam``; the residual ``d * (f(k*; W + lam (x) u)
- v*)`` is computed through the real block (``problem.forward``). Each iteration linearizes it:
L2 minimizes ``|r + J step|^2`` (Gauss-Newton), L1 the same with iteratively reweighted residuals
(the majorizer ``|r| <= r^2 / 2|r0| + |r0| / 2``). When the block is channelwise (only the nonlinear
weight brings the case here) ``J`` is block-diagonal, and each channel's ``taps x taps`` normal
matrix comes from ``taps`` forward-mode products, as in the fast solver. Otherwise, when
``unknowns x values`` is small (``explicit_limit``), ``J`` is formed by batched forward-mode products
and the normal equations are solved exactly; for larger problems ``J`` is never formed: the normal
equations are solved by conjugate gradients, each product ``J^T Q J p`` being one forward-mode
(``jvp``) and one reverse-mode (``vjp``) pass through the block, preconditioned by the diagonal of
``J^T Q J`` estimated with random probes (inexact Newton: the line search keeps every step a descent
step). A trust region on the step length, starting at a tenth of the first step's and doubling while full steps
pay off, keeps ``lam`` from running away where the block is scale-invariant (a LayerNorm after the
edited layer flattens the objective towards infinity; such an edit would wreck other inputs). A Levenberg damping and a backtracking line
search on the true objective make every accepted step a descent step; the solver runs from zero, from
the linearized (one L2 step) solution and, for L1, from the L2 optimum, and keeps the best end point.
"""

from __future__ import annotations

import logging
import time

import torch
from torch.func import jvp, vjp, vmap

from surgery.errors import SurgeryError
from surgery.solvers.problem import EditProblem
from surgery.solvers.responses import TapResponses

__all__ = ["JointSolver", "solve_joint", "linear_in_weight"]

logger = logging.getLogger(__name__)

# backtracking from the full step, the first that lowers the objective taken (the fast solver instead tries
# longer steps too, all at once: its per-channel problems cross flat valleys; these joint problems are capped
# by a trust region)
_STEP_SIZES = (1.0, 0.5, 0.25, 0.1, 0.03, 0.01)


def linear_in_weight(problem: EditProblem, *, rtol: float = 1e-4) -> bool:
    """Whether the edited layer's output is affine in its weight on the problem's keys.

    Checks ``z(W + D) - z(W) == z(D) - z(0)`` for a random dense ``D`` of the weight's scale: true
    for Conv2d/Linear (and subclasses that only pad or reshape), false for weight standardization.
    ``D`` is not taken along the edit's ``u``: where ``u`` lies in the keys' near-null space (dead
    channels of a random network) ``z(D)`` would be rounding noise and a plain conv would fail the check.
    """
    layer = problem.layer
    if layer.plain:  # layer_forward is F.conv2d / F.linear: linear by construction
        return True
    w0 = problem.weight0
    keys = problem.keys
    g = torch.Generator(device="cpu").manual_seed(0)
    scale = float(w0.abs().mean()) + 1e-12
    delta = torch.randn(w0.shape, generator=g, dtype=torch.float64).to(w0) * scale
    with torch.no_grad():
        zero = torch.zeros_like(w0)
        lhs = layer.layer_forward(keys, w0 + delta) - layer.layer_forward(keys, w0)
        rhs = layer.layer_forward(keys, delta) - layer.layer_forward(keys, zero)
    err = float((lhs - rhs).norm()) / (float(rhs.norm()) + 1e-30)
    return err < rtol


class JointSolver:
    """Gauss-Newton on all of ``lam`` for one :class:`EditProblem`."""

    def __init__(
        self,
        problem: EditProblem,
        *,
        cg_iters: int = 50,
        cg_tol: float = 1e-3,
        probes: int = 8,
        explicit_limit: int = 8_000_000,
    ) -> None:
        if problem.u is None:
            raise SurgeryError("the problem has no direction u: build it with surgery.problems.prepare_problem")
        self.problem = problem
        self.shape = problem.lam_shape
        self.unknowns = int(torch.Size(self.shape).numel())
        self.dtype = problem.weight0.dtype
        self.device = problem.weight0.device
        self.numel = problem.numel
        self.channelwise = problem.layer.channelwise
        self.m = self.shape[1]
        self.taps = self.unknowns // self.m
        self.cg_iters = cg_iters
        self.cg_tol = cg_tol
        self.probes = probes
        if self.channelwise:
            self.mode = "per-channel blocks"
        elif self.unknowns * self.numel <= explicit_limit:
            self.mode = "explicit"
        else:
            self.mode = "conjugate gradients"

        # Affine layers: z = z0 + sum_t lam[:, t] * A_t with the one-channel responses A_t of the unit
        # update at tap t (as in the fast solver), so a residual costs the block tail only.
        self.linear = linear_in_weight(problem)
        if self.linear:
            self._precompute()

    def _precompute(self) -> None:
        self.responses = TapResponses(self.problem)

    def _layer_output(self, lam: torch.Tensor) -> torch.Tensor:
        # One broadcast add per tap, not TapResponses.layer_output's single product: the post-norm SwinV2
        # L1 case ends 1% apart (1.254 vs 1.240) under the product's other rounding with 2 threads.
        mat = self.problem.to_mat(lam)
        r = self.responses
        shape = [1] * r.z0.ndim
        shape[r.zdim] = self.m
        z = r.z0
        for t, a in enumerate(r.designs):
            z = z + a * mat[:, t].reshape(shape)
        return z

    # -- the residual and the objective ------------------------------------------------------------
    def residual(self, lam: torch.Tensor) -> torch.Tensor:
        """``d * (f(k*; W + lam u) - v*)``, values-shaped, in the model's dtype."""
        p = self.problem
        lam = lam.to(self.dtype)
        if self.linear:
            z = self._layer_output(lam)
            v = z if p.layer.post is None else p.layer.post(z, p.context)
        else:
            v = p.forward(p.weight_for(lam))
        return p.residual(v)

    def objective(self, lam: torch.Tensor, loss: str | None = None) -> float:
        """The problem's objective (loss plus ridge; ``loss`` overrides the problem's), in float64."""
        with torch.no_grad():
            return float(self.problem.objective_of(self.residual(lam).to(torch.float64), lam, loss=loss))

    # -- one linearized step -----------------------------------------------------------------------
    def _weights(self, r: torch.Tensor, loss: str, smooth: float) -> torch.Tensor:
        """``q`` of the quadratic model ``sum q (r + J s)^2 / 2numel`` (L2: 2; L1: 1/|r0|)."""
        if loss == "l2":
            return torch.full_like(r, 2.0)
        absr = r.abs()
        floor = smooth * absr.mean() + 1e-30
        return 1.0 / absr.clamp_min(floor)

    def _step_blocks(self, lam, r, q, grad, damping) -> torch.Tensor:
        """Exact per-channel normal equations (the block is channelwise; ``J`` is block-diagonal)."""
        columns = []
        for t in range(self.taps):
            basis = torch.zeros(self.m, self.taps, dtype=lam.dtype, device=lam.device)
            basis[:, t] = 1
            tangent = self.problem.to_lam(basis)
            _, col = jvp(self.residual, (lam.to(self.dtype),), (tangent.to(self.dtype),))
            columns.append(self.problem.per_channel(col).to(torch.float64))
        j = torch.stack(columns, dim=1)  # (m, taps, elements)
        qc = self.problem.per_channel(q)
        hess = torch.einsum("mte,mse->mts", j * qc[:, None, :], j) / self.numel
        eye = torch.eye(self.taps, dtype=torch.float64, device=hess.device)
        if self.problem.ridge:
            hess = hess + 2 * self.problem.ridge * eye
        scale = hess.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)
        hess = hess + ((damping + 1e-12) * scale)[:, None, None] * eye
        g = self.problem.to_mat(grad)
        step = -torch.linalg.solve(hess, g.unsqueeze(-1)).squeeze(-1)
        return self.problem.to_lam(torch.nan_to_num(step, nan=0.0, posinf=0.0, neginf=0.0))

    def _step_explicit(self, lam, q, grad, damping) -> torch.Tensor:
        """Exact normal equations with ``J`` formed by batched forward-mode products."""
        lam_m = lam.to(self.dtype)
        chunk = max(1, 2_000_000 // max(self.numel, 1))
        eye = torch.eye(self.unknowns, dtype=self.dtype, device=self.device)
        rows = []
        column = lambda t: jvp(self.residual, (lam_m,), (t,))[1]  # noqa: E731
        for i in range(0, self.unknowns, chunk):
            tangents = eye[i : i + chunk].reshape(-1, *self.shape)
            rows.append(vmap(column)(tangents).reshape(tangents.shape[0], -1).to(torch.float64))
        j = torch.cat(rows)  # (unknowns, elements)
        hess = (j * q.reshape(1, -1)) @ j.T / self.numel
        diag_mean = float(hess.diagonal().mean().clamp_min(1e-30))
        shift = 2 * self.problem.ridge + (damping + 1e-12) * diag_mean
        hess = hess + shift * torch.eye(self.unknowns, dtype=torch.float64, device=hess.device)
        step = -torch.linalg.solve(hess, grad.reshape(-1, 1)).reshape(self.shape)
        return torch.nan_to_num(step, nan=0.0, posinf=0.0, neginf=0.0)

    def _step_cg(self, lam, q, grad, vjp_fn, damping) -> torch.Tensor:
        """Preconditioned conjugate gradients on ``(J^T Q J / numel + 2 ridge + damping) s = -g``."""
        lam_m = lam.to(self.dtype)
        ridge2 = 2 * self.problem.ridge

        def jtqj(p: torch.Tensor) -> torch.Tensor:
            _, jp = jvp(self.residual, (lam_m,), (p.to(self.dtype),))
            (out,) = vjp_fn((q * jp.to(torch.float64)).to(self.dtype))
            return out.to(torch.float64) / self.numel

        # diag(J^T Q J) ~ E[(J^T sqrt(q) xi)^2] for Rademacher xi
        g = torch.Generator(device="cpu").manual_seed(1)
        diag = torch.zeros(self.shape, dtype=torch.float64, device=self.device)
        sq = q.sqrt()
        for _ in range(self.probes):
            xi = (torch.randint(0, 2, q.shape, generator=g, dtype=torch.int8).to(q.device) * 2 - 1).to(q.dtype)
            (col,) = vjp_fn((sq * xi).to(self.dtype))
            diag += col.to(torch.float64).square()
        diag = diag / (self.probes * self.numel)
        scale = float(diag.mean().clamp_min(1e-30).detach())
        shift = ridge2 + (damping + 1e-12) * scale
        precond = 1.0 / (diag + shift).clamp_min(1e-30)

        b = -grad
        x = torch.zeros_like(b)
        res = b.clone()
        z = precond * res
        p = z.clone()
        rz = float((res * z).sum())
        b_norm = float(b.norm()) + 1e-300
        for _ in range(min(self.cg_iters, self.unknowns)):
            ap = jtqj(p) + shift * p
            pap = float((p * ap).sum())
            if pap <= 0:
                break
            alpha = rz / pap
            x = x + alpha * p
            res = res - alpha * ap
            if float(res.norm()) < self.cg_tol * b_norm:
                break
            z = precond * res
            rz_new = float((res * z).sum())
            p = z + (rz_new / rz) * p
            rz = rz_new
        return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)

    def _step(self, lam: torch.Tensor, loss: str, damping: float, smooth: float = 1e-6) -> torch.Tensor:
        """One damped, reweighted Gauss-Newton step from ``lam`` (float64, ``lam``'s shape)."""
        r, vjp_fn = vjp(self.residual, lam.to(self.dtype))
        r = r.detach().to(torch.float64)
        q = self._weights(r, loss, smooth)
        (grad,) = vjp_fn((q * r).to(self.dtype))
        grad = grad.to(torch.float64) / self.numel
        if self.problem.ridge:
            grad = grad + 2 * self.problem.ridge * lam.to(torch.float64)
        if self.mode == "per-channel blocks":
            return self._step_blocks(lam, r, q, grad, damping)
        if self.mode == "explicit":
            return self._step_explicit(lam, q, grad, damping)
        return self._step_cg(lam, q, grad, vjp_fn, damping)

    # -- the iteration -----------------------------------------------------------------------------
    @torch.no_grad()
    def run(
        self, start: torch.Tensor, *, max_iter: int = 50, tol: float = 1e-4, loss: str | None = None
    ) -> tuple[torch.Tensor, float, int]:
        """Gauss-Newton with a line search from ``start``; returns ``(lam, objective, iterations)``.

        ``loss`` overrides the problem's (an L2 run gives an L1 run a start).
        """
        loss = loss or self.problem.loss
        lam = start.to(torch.float64).clone()
        obj = self.objective(lam, loss)
        damping = 0.0
        smooth = 1e-1
        stalls = it = 0
        radius: float | None = None  # trust region on the step norm, from the first step's length
        for it in range(1, max_iter + 1):
            step = self._step(lam, loss, damping, smooth)
            smooth = max(smooth * 0.1, 1e-6)
            norm = float(step.norm())
            if radius is None:
                radius = max(0.1 * norm, 1e-30)  # cautious: the region widens while full steps pay off
            capped = norm > radius
            if capped:
                step = step * (radius / norm)
            best, best_obj, full = lam, obj, False
            for alpha in _STEP_SIZES:
                cand = lam + alpha * step
                cand_obj = self.objective(cand, loss)
                if cand_obj < best_obj:
                    best, best_obj, full = cand, cand_obj, alpha == 1.0
                    break
            if best_obj >= obj:
                # no step helped: damp harder (towards a short gradient step) and try again, until the
                # damping says even that fails
                damping = max(damping * 10, 1e-4)
                radius *= 0.25
                if damping > 1e6:
                    break
                continue
            damping = damping / 3 if full else damping
            if full and capped:
                radius *= 2  # the region was the limit and the full step paid off: widen it
            gain = obj - best_obj
            lam, obj = best, best_obj
            # a step the trust region capped is not a sign of convergence: the region grows next time
            stalls = stalls + 1 if (gain <= tol * obj + 1e-300 and not capped) else 0
            if stalls >= 2:
                break
        return lam, obj, it

    @torch.no_grad()  # torch.func transforms ignore the outer no_grad; parameters build no graph
    def solve(self, *, max_iter: int = 100) -> tuple[torch.Tensor, dict]:
        """From zero and from the linearized solution; the better end point."""
        start = time.perf_counter()
        zero = torch.zeros(self.shape, dtype=torch.float64, device=self.device)
        obj0 = self.objective(zero)
        linear = self._step(zero, "l2", 0.0)
        results = [self.run(zero, max_iter=max_iter), self.run(linear, max_iter=max_iter)]
        if self.problem.loss == "l1":
            # L1 has kinks where Gauss-Newton can stop early: the L2 optimum is a third start
            l2, _, _ = self.run(linear, max_iter=max_iter, loss="l2")
            results.append(self.run(l2, max_iter=max_iter))
        lam, obj, _ = min(results, key=lambda r: r[1])
        lam = lam.to(self.dtype)
        with torch.no_grad():
            true_objective = float(self.problem.objective(lam))
        info = {
            "objective": true_objective,
            "objective_before": obj0,
            "iterations": [r[2] for r in results],
            "seconds": time.perf_counter() - start,
            "solver": "joint",
            "jacobian": self.mode,
        }
        logger.info(
            "joint solver on %s: objective %.6g -> %.6g", self.problem.layer.name, obj0, true_objective
        )
        return lam, info


def solve_joint(problem: EditProblem, *, max_iter: int = 100) -> tuple[torch.Tensor, dict]:
    """Solve ``problem`` with joint Gauss-Newton over every coefficient; returns ``(lam, info)``."""
    return JointSolver(problem).solve(max_iter=max_iter)
