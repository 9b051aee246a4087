"""The fast solver: the rank-one problem split into one small problem per output channel.

With ``W' = W + lam (x) u`` the layer output is ``z = z0 + sum_t lam[:, t] * A_t``, where ``z0`` is the
unedited output and ``A_t`` the (one-channel) response of the layer to the unit update at tap ``t``
(for a conv: ``u^T k`` shifted by the kernel tap). Everything after the layer in a block (BN in eval
mode, residual add, ReLU, max-pool, layer-scale) acts per output channel, so channel ``o``'s value
depends on ``lam[:, o]`` alone: ``m`` independent problems with ``rank * kh * kw`` unknowns each.

Each is solved by damped Gauss-Newton with a per-channel line search. For L1 each linearization is
itself solved by a few reweighted least-squares iterations (no block call between them). The block is
called on a stack of layer outputs at once: the Jacobian is a forward difference along each tap's
response, and every step length is tried in one call. The difference step starts wide (a smoothed
block, which crosses the kinks of ReLU and max-pool) and shrinks each iteration. Step lengths above one
let channels cross flat valleys. NCHW maps are kept channels-last, where pooling is much faster on the CPU.

The solve runs from zero and from the linearized solution for a few iterations, keeps each channel's
better point (kinked blocks have several local minima per channel) and goes on from there until two
iterations in a row gain less than :data:`_TOL` of the objective. Where the block is affine in the
weight and the loss is L2, the exact least-squares solution ``(A^T D A + ridge I)^{-1} A^T D R``, taken
through the block's exact forward-mode Jacobian, is the answer (:meth:`FastSolver.post_is_affine` tests
the block numerically).
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

_STEP_SIZES = (4.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.03, 0.01)  # tried at once; above 1: flat valleys
_MERGE_AFTER = 4  # iterations from each start before each channel keeps the better point
_L1_INNER = 2  # reweighted least-squares iterations on each L1 linearization
# L1: residuals below smooth * mean|r| weigh as if they were that large; smooth shrinks per (inner) iteration
_SMOOTH_DECAY, _INNER_DECAY, _SMOOTH_FLOOR = 0.3, 0.3, 1e-6
_TOL = 3e-5  # stop once two iterations in a row gain less than this fraction of the objective
# the Jacobian's forward-difference step, relative to the spread of z: from the starts' first step
# (and the merged run's) it shrinks by _FD_DECAY per iteration down to _FD_STEP
_FD_START, _FD_POLISH, _FD_DECAY, _FD_STEP = 0.1, 0.01, 0.5, 1e-3


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
        self._batchable: bool | None = None
        self._contexts: dict[int, dict[str, torch.Tensor]] = {}
        # each tap's forward-difference step per unit of `spread`: the spread of z over that of the tap's response
        self._fd_steps = [float(self.z0.std().clamp_min(1e-30) / a.std().clamp_min(1e-30)) for a in self.designs]
        self._cl_matrix = None  # NCHW maps: the layer output channels-last, z = z0 + matrix @ mat^T
        if self.z0.ndim == 4 and self.zdim % 4 == 1:
            n, c, h, wd = self.z0.shape
            self._cl_z0 = self.z0.contiguous(memory_format=torch.channels_last)
            self._cl_matrix = self.responses.matrix.T.contiguous()
            self._cl_shape = (n, h, wd, c)
        # the targets (and weights) in the layout of the block's outputs
        self._values = self._like_z(problem.values)
        self._d = None if self.d is None else self._like_z(self.d.contiguous())

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

    # -- batched block calls ------------------------------------------------------------------
    def _stacked_post(self, zs: list[torch.Tensor]) -> torch.Tensor:
        """The block after the layer on several layer outputs at once, stacked on a new first axis.

        One call on the outputs concatenated along the batch axis (the context repeated) when the
        block treats samples independently (checked once, at the first call); a call per output
        otherwise. For NCHW maps the outputs are kept channels-last, where pooling is many times
        faster on the CPU."""
        if self._batchable is None:
            self._batchable = self._check_batchable(zs[0])
        if not self._batchable:
            return torch.stack([self.post(z) for z in zs])
        k = len(zs)
        if k not in self._contexts:
            self._contexts[k] = {n: self._like_z(t.repeat(k, *[1] * (t.ndim - 1))) for n, t in self.problem.context.items()}
        post, stacked = self.problem.layer.post, torch.cat(zs, dim=0)
        out = stacked if post is None else post(stacked, self._contexts[k])  # None: the value is z itself
        return out.unflatten(0, (k, zs[0].shape[0]))

    def _like_z(self, t: torch.Tensor) -> torch.Tensor:
        """A values- or context-shaped map in the layout of the layer outputs (channels-last for NCHW maps)."""
        if self._cl_matrix is not None and t.ndim == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t

    def _check_batchable(self, z: torch.Tensor) -> bool:
        """Whether the block gives each sample of a stack what it gives that sample alone (the context
        repeated): checked on ``z`` stacked with ``2 z + 1``."""
        n = z.shape[0]
        if self.problem.layer.post is None:
            return True
        if any(t.shape[:1] != (n,) for t in self.problem.context.values()):
            return False  # a context without the batch axis first cannot be repeated along it
        with torch.no_grad():
            alone = self.post(z)
            ctx = {name: t.repeat(2, *[1] * (t.ndim - 1)) for name, t in self.problem.context.items()}
            try:
                both = self.problem.layer.post(torch.cat([z, 2 * z + 1], dim=0), ctx)
            except RuntimeError:
                return False
            return both.shape[0] == 2 * n and torch.allclose(both[:n], alone, rtol=1e-5, atol=1e-6)

    def _layer_output(self, mat: torch.Tensor) -> torch.Tensor:
        """:meth:`layer_output`, channels-last for NCHW maps."""
        if self._cl_matrix is None:
            return self.layer_output(mat)
        change = (self._cl_matrix @ mat.T.to(self._cl_matrix.dtype)).reshape(self._cl_shape).permute(0, 3, 1, 2)
        return self._cl_z0 + change

    def _objectives(self, mats: list[torch.Tensor], zs: list[torch.Tensor] | None = None) -> torch.Tensor:
        """:meth:`channel_objective` of several factor matrices, ``(k, m)`` in float64; ``zs``: their layer
        outputs where the caller has them."""
        with torch.no_grad():
            if zs is None:
                zs = [self._layer_output(m) for m in mats]
            r = self._stacked_post(zs) - self._values
            if self.d is not None:
                r = r * self._d
            loss = r.abs_() if self.problem.loss == "l1" else r.square_()
            channel = self.vdim % (r.ndim - 1) + 1  # summed over every axis but the candidates' and the channels'
            obj = loss.sum(dim=[a for a in range(1, r.ndim) if a != channel]).to(torch.float64) / self.numel
            if self.problem.ridge:
                obj = obj + self.problem.ridge * torch.stack(mats).to(torch.float64).square().sum(dim=2)
        return obj

    # -- steps --------------------------------------------------------------------------------
    def _linear_step(self, mat: torch.Tensor) -> torch.Tensor:
        """The undamped least-squares Gauss-Newton step from ``mat``, through the exact (forward-mode)
        Jacobian, in float64: on a block affine in the weight, the exact least-squares solution."""
        with torch.no_grad():
            z = self.layer_output(mat)
            tangents = torch.stack([a.expand_as(z) for a in self.designs])
            with warnings.catch_warnings():  # torch.func's vmap over jvp warns about torch.jit internals
                warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
                v, jt = vmap(lambda dz: jvp(self.post, (z,), (dz,)), out_dims=(None, 0))(tangents)
            j = torch.stack([self._per_channel(t) for t in jt], dim=1).to(torch.float64)  # (m, taps, e)
            r = self._per_channel(v - self.problem.values).to(torch.float64)
            q = None if self.d is None else self._per_channel(self.d).to(torch.float64).square()
            zero = torch.zeros(self.m, dtype=torch.float64, device=j.device)
            return self._solve_quadratic(j, r, q, mat, zero).to(mat.dtype)

    def _linearize(self, mat: torch.Tensor, spread: float = _FD_STEP) -> tuple[torch.Tensor, torch.Tensor]:
        """Residuals ``(m, e)`` and Jacobian ``(m, taps, e)`` at ``mat`` from one stacked block call:
        forward differences along each tap's response, a step of ``spread`` times the spread of ``z``
        (exact on the linear pieces of ReLU / max-pool blocks that the step does not cross; a wide step
        averages the slopes of the pieces it crosses)."""
        z = self._layer_output(mat)
        out = self._stacked_post([z] + [z + spread * h * a for h, a in zip(self._fd_steps, self.designs)])
        v = out[0]
        steps = spread * torch.tensor(self._fd_steps, dtype=out.dtype, device=out.device).reshape(-1, *[1] * v.ndim)
        diff = (out[1:] - v) / steps  # (taps, *values shape)
        j = diff.movedim(self.vdim % v.ndim + 1, 0).reshape(self.m, self.taps, -1).contiguous()  # (m, taps, e)
        return self._per_channel(v - self.problem.values), j

    def _solve_quadratic(
        self,
        j: torch.Tensor,
        r: torch.Tensor,
        q: torch.Tensor | None,
        mat: torch.Tensor,
        damping: torch.Tensor,
        jt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The step minimizing ``sum_e q (r + j^T s)^2 / numel + ridge |mat + s|^2`` per channel, damped by
        ``damping`` times the mean curvature (a relative 1e-12 keeps channels with taps hidden by a dead
        ReLU or padding solvable without moving well-posed ones measurably); solved in float64."""
        qj = j if q is None else j * q.unsqueeze(1)
        hess = torch.bmm(qj, j.transpose(1, 2) if jt is None else jt).to(torch.float64) / self.numel
        grad = torch.bmm(qj, r.unsqueeze(-1)).squeeze(-1).to(torch.float64) / self.numel
        diagonal = hess.diagonal(dim1=1, dim2=2)
        if self.problem.ridge:
            diagonal += self.problem.ridge
            grad = grad + self.problem.ridge * mat.to(torch.float64)
        scale = diagonal.mean(dim=1, keepdim=True).clamp_min(1e-30)
        diagonal += (damping.unsqueeze(1) + 1e-12) * scale
        if self.taps == 1:
            step = -grad / hess[:, :, 0]
        else:
            step = -torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)
        return torch.nan_to_num(step, nan=0.0, posinf=0.0, neginf=0.0)

    def _step(self, mat: torch.Tensor, damping: torch.Tensor, smooth: float, spread: float = _FD_STEP) -> torch.Tensor:
        """One damped Gauss-Newton step ``(m, taps)`` from ``mat``. For L1 the linearized problem
        ``min_s sum_e d |r + j^T s|`` is itself solved by :data:`_L1_INNER` reweighted least-squares
        iterations, with residuals below ``smooth * mean|r|`` weighing as if they were that large and the
        floor shrinking each inner iteration: no block call between them."""
        with torch.no_grad():
            r, j = self._linearize(mat, spread)
            d = None if self.d is None else self._per_channel(self.d)
            if self.problem.loss == "l2":
                return self._solve_quadratic(j, r, None if d is None else d.square(), mat, damping).to(mat.dtype)
            jt = j.transpose(1, 2).contiguous()
            floor = r.abs().mean(dim=1, keepdim=True) + 1e-30
            step = torch.zeros(self.m, self.taps, dtype=torch.float64, device=r.device)
            for inner in range(_L1_INNER):  # d|x| <= d (x^2 / 2|x0| + |x0| / 2) around the last inner step
                res = r if inner == 0 else r + (step.to(j.dtype).unsqueeze(1) @ j).squeeze(1)
                q = (1.0 if d is None else d) / (2 * res.abs().clamp_min(smooth * floor))
                step = self._solve_quadratic(j, r, q, mat, damping, jt)
                smooth = max(smooth * _INNER_DECAY, _SMOOTH_FLOOR)
        return step.to(mat.dtype)

    def run(
        self,
        start: torch.Tensor,
        *,
        max_iter: int = 50,
        tol: float = 1e-4,
        smooth: float = 0.1,
        spread: float = _FD_START,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Gauss-Newton with a per-channel line search from ``start``; returns (mat, objectives, iters).

        ``smooth`` (L1): residuals below ``smooth * mean|r|`` weigh as if they were that large at first,
        a floor that shrinks by :data:`_SMOOTH_DECAY` each iteration; ``spread``: the first difference
        step of the Jacobian (see :meth:`_linearize`), shrinking by :data:`_FD_DECAY` each iteration to
        :data:`_FD_STEP`. Every step length of :data:`_STEP_SIZES` is tried in one stacked block call,
        and each channel keeps its best. Stops after ``max_iter`` iterations, or once two iterations in
        a row lower the objective by less than ``tol`` times its value.
        """
        mat = start.clone()
        obj = self._objectives([mat])[0]
        damping = torch.zeros(self.m, dtype=torch.float64, device=mat.device)
        it = stalls = 0
        for it in range(1, max_iter + 1):
            step = self._step(mat, damping, smooth, max(spread * _FD_DECAY ** (it - 1), _FD_STEP))
            smooth = max(smooth * _SMOOTH_DECAY, _SMOOTH_FLOOR)
            cands = [mat + alpha * step for alpha in _STEP_SIZES]
            # z is affine in mat; the move is taken as a difference of layer outputs, as the solver was
            # measured (the direct product rounds differently, and the solve amplifies rounding)
            base, move = self._layer_output(mat), self._layer_output(step) - self._layer_output(torch.zeros_like(step))
            objs = self._objectives(cands, [base + alpha * move for alpha in _STEP_SIZES])  # (alphas, m)
            best_obj, best = objs.min(dim=0)
            improved = best_obj < obj
            chosen = torch.stack(cands)[best, torch.arange(self.m, device=mat.device)]
            damping = torch.where(
                improved,
                torch.where(best <= _STEP_SIZES.index(1.0), damping / 3, damping),
                torch.clamp(damping * 10, min=1e-6),
            )
            best_obj = torch.where(improved, best_obj, obj)
            gain = float((obj - best_obj).sum())
            mat, obj = torch.where(improved[:, None], chosen, mat), best_obj
            # Stop once a few iterations in a row gain nothing: failed channels get more damping first.
            stalls = stalls + 1 if gain <= tol * float(obj.sum()) + 1e-300 else 0
            if stalls >= 2:
                break
        return mat, obj, it

    def solve(self, *, max_iter: int = 100) -> tuple[torch.Tensor, dict]:
        """Solve from zero and from the linearized solution for :data:`_MERGE_AFTER` iterations, keep each
        channel's better point and go on from there to convergence.

        The per-channel problems of kinked blocks have several local minima; the two starts lead to
        different ones for many channels, and which is better shows after a few iterations.
        """
        start = time.perf_counter()
        zero = torch.zeros(self.m, self.taps, dtype=self.z0.dtype, device=self.z0.device)
        obj0 = self.channel_objective(zero)
        linear = self._linear_step(zero)
        closed_form = self.problem.loss == "l2" and self.post_is_affine(linear)
        if closed_form:  # the linearized solution is the exact least-squares one
            mat, obj, iterations = linear, self.channel_objective(linear), []
        else:
            first = min(_MERGE_AFTER, max_iter)
            results = [self.run(begin, max_iter=first, tol=_TOL) for begin in (zero, linear)]
            mat, obj, _ = results[0]
            for other_mat, other_obj, _ in results[1:]:
                better = other_obj < obj
                mat = torch.where(better[:, None], other_mat, mat)
                obj = torch.where(better, other_obj, obj)
            mat, obj, polish = self.run(mat, max_iter=max_iter, tol=_TOL, spread=_FD_POLISH)
            iterations = [r[2] for r in results] + [polish]
        lam = self.to_lam(mat)
        with torch.no_grad():  # through the real block with W + lam u, not the per-channel model
            true_objective = float(self.problem.objective(lam))
        info = {
            "objective": true_objective,
            "objective_before": float(obj0.sum()),
            "iterations": iterations,
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
