"""The fast solver: the rank-one problem split into one small problem per output channel.

With ``W' = W + lam (x) u`` the layer output is ``z = z0 + sum_t lam[:, t] * A_t``, where ``z0`` is
the unedited output and ``A_t`` the (one-channel) response of the layer to the unit update at tap ``t``
(for a conv: ``u^T k`` shifted by the kernel tap). Everything after the layer in a block (BN in eval
mode, residual add, ReLU, max-pool, layer-scale) acts per output channel, so channel ``o``'s value
depends on ``lam[:, o]`` alone: ``m`` independent problems with ``rank * kh * kw`` unknowns each.

Each is solved by damped Gauss-Newton with a per-channel line search. For L1 each linearization is
itself solved by a few reweighted least-squares iterations (no block call between them). The block is
called on a stack of layer outputs at once: the Jacobian is a forward difference along each tap's
response, and every step length is tried in one call. The difference step starts wide (a smoothed
block, which crosses the kinks of ReLU and max-pool) and shrinks each iteration. Step lengths above one
let channels cross flat valleys.

The evaluations themselves (maps as channels-last ``(positions, m)`` matrices, stacks of candidates,
the objectives computed in place) are :class:`~surgery.solvers.stacked.StackedBlock`'s.

The solve runs from zero and from the linearized solution for a few iterations, both starts side by
side in the same block calls, keeps each channel's better point (kinked blocks have several local
minima per channel) and goes on from there until two iterations in a row gain less than :data:`_TOL`
of the objective. Under L2 on a kinked block, a few Adam steps (:func:`~surgery.solvers.descent.descend`) then slide
along the valleys that follow kinks, where Gauss-Newton stalls, and Gauss-Newton finishes. Where the
block is affine in the weight and the loss is L2, the exact least-squares solution
``(A^T D A + ridge I)^{-1} A^T D R``, taken through the block's exact forward-mode Jacobian, is the
answer (:meth:`FastSolver.post_is_affine` tests the block numerically).
"""

from __future__ import annotations

import logging
import time
import warnings

import torch
from torch.func import jvp, vmap

from surgery.errors import SurgeryError, UnsupportedModelError

from .descent import descend
from .joint import linear_in_weight, solve_joint
from .problem import EditProblem
from .responses import TapResponses
from .stacked import StackedBlock

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
# L2 on kinked blocks: Adam steps along the valleys that follow kinks (where Gauss-Newton stalls), with a
# step size relative to the mean |lam|, then Gauss-Newton again
_VALLEY_STEPS, _VALLEY_LR = 50, 0.1
MAX_ITER = 100  # the most Gauss-Newton iterations of each run, by default (FastConfig.max_iter)


class FastSolver:
    """Per-output-channel Gauss-Newton for one :class:`EditProblem`.

    Factors are held as ``mat`` ``(m, taps)`` (:meth:`EditProblem.to_mat`), or ``(starts, m, taps)`` for several
    starts solved side by side; maps as ``(positions, m)`` matrices, channels last.
    """

    def __init__(self, problem: EditProblem) -> None:
        layer = problem.layer
        if not layer.channelwise:
            raise UnsupportedModelError(
                f"the block of {layer.name!r} mixes output channels ({layer.block}), so the fast "
                "solver's per-channel split does not apply; use solver='reference'"
            )
        if problem.u is None:
            raise SurgeryError("the problem has no direction u: build it with surgery.problems.prepare_problem")
        self.problem = problem
        self.responses = TapResponses(problem)
        self.zdim = self.responses.zdim
        self.rank, self.m, self.taps = self.responses.rank, self.responses.m, self.responses.taps
        self.z0, self.designs = self.responses.z0, self.responses.designs
        self.numel = problem.numel
        self.stack = StackedBlock(problem, self.responses)  # evaluations, maps as (positions, m)
        self._dt = None if self.stack.d is None else self.stack.d.T.contiguous()  # loss weights (m, Ev)
        # each tap's forward-difference step per unit of `spread`: the spread of z over that of the tap's response
        self._fd_steps = torch.tensor(
            [float(self.z0.std().clamp_min(1e-30) / a.std().clamp_min(1e-30)) for a in self.designs],
            dtype=self.z0.dtype,
            device=self.z0.device,
        )
        self._alphas = torch.tensor(_STEP_SIZES, dtype=self.z0.dtype, device=self.z0.device)

    # -- evaluation ---------------------------------------------------------------------------
    def layer_output(self, mat: torch.Tensor) -> torch.Tensor:
        """``z`` for factors ``mat`` ``(m, taps)``, in the layer's own layout."""
        return self.responses.layer_output(mat)

    def post(self, z: torch.Tensor) -> torch.Tensor:
        layer = self.problem.layer
        if layer.post is None:
            return z
        return layer.post(z, self.problem.context)

    def channel_objective(self, mat: torch.Tensor) -> torch.Tensor:
        """The objective of each output channel, ``(m,)`` in float64, through the block called on the
        layer's own layout (no stacking); their sum is the objective."""
        p = self.problem
        with torch.no_grad():
            r = p.per_channel(p.residual(self.post(self.layer_output(mat)))).to(torch.float64)
            return p.objective_of(r, mat, dim=1)

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
            j = torch.stack([self.problem.per_channel(t) for t in jt], dim=1).to(torch.float64)  # (m, taps, e)
            r = self.problem.per_channel(v - self.problem.values).to(torch.float64)
            q = None if self._dt is None else self._dt.to(torch.float64).square()
            zero = torch.zeros(self.m, dtype=torch.float64, device=j.device)
            return self._solve_quadratic(j, r, q, mat, zero).to(mat.dtype)

    def _linearize(
        self, mat: torch.Tensor, spread: float = _FD_STEP, zs: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Residuals ``(m, e)`` and Jacobian ``(m, taps, e)`` at ``mat`` (``(m, taps)``, or ``(s, m, taps)``
        for ``s`` starts, then both results with a leading ``s`` axis folded into ``m``: ``(s * m, ...)``),
        from one stacked block call (more where the stack exceeds :data:`~surgery.solvers.stacked.STACK_BYTES`): forward
        differences along each tap's response, a step of ``spread`` times the spread of ``z`` (exact on
        the linear pieces of ReLU / max-pool blocks that the step does not cross; a wide step averages
        the slopes of the pieces it crosses). ``zs``: the layer outputs of ``mat`` ``(s, E, m)``, where the
        caller has them."""
        mats = mat.reshape(-1, self.m, self.taps)
        s, k = mats.shape[0], self.taps + 1
        steps = spread * self._fd_steps  # (taps,)
        offsets = torch.cat([torch.zeros_like(self.stack.design[:, :1]), self.stack.design * steps], dim=1).T  # (taps + 1, E)
        zs = self.stack.z(mats) if zs is None else zs
        pieces = self.stack.pieces(s, k)
        if len(pieces) == 1:  # the usual case
            stack = self.stack.buffer(s, k, *zs.shape[1:])  # laid out as written
            torch.add(zs.unsqueeze(1), offsets.unsqueeze(-1), out=stack)
            out = self.stack.post(stack.flatten(0, 1)).unflatten(0, (s, k))
        else:
            out = None
            for st, cs in pieces:
                stack = self.stack.buffer(len(range(s)[st]), len(range(k)[cs]), *zs.shape[1:])
                torch.add(zs[st].unsqueeze(1), offsets[cs].unsqueeze(-1), out=stack)
                piece = self.stack.post(stack.flatten(0, 1)).unflatten(0, stack.shape[:2])
                out = piece.new_empty(s, k, *piece.shape[2:]) if out is None else out
                out[st, cs] = piece  # copied out before the buffer is filled again
        v = out[:, 0]  # (s, Ev, m)
        if self.stack.owned(out):  # in place
            diff = out[:, 1:].sub_(v.unsqueeze(1)).div_(steps.reshape(-1, 1, 1))
        else:
            diff = (out[:, 1:] - v.unsqueeze(1)) / steps.reshape(-1, 1, 1)  # (s, taps, Ev, m)
        j = diff.permute(0, 3, 1, 2).reshape(s * self.m, self.taps, -1).contiguous()  # (s * m, taps, Ev)
        r = (v - self.stack.values).transpose(1, 2).reshape(s * self.m, -1).contiguous()  # (s * m, Ev)
        return r, j

    def _solve_quadratic(
        self,
        j: torch.Tensor,
        r: torch.Tensor,
        q: torch.Tensor | None,
        mat: torch.Tensor,
        damping: torch.Tensor,
        jrt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The step minimizing ``sum_e q (r + j^T s)^2 / numel + ridge |mat + s|^2`` per channel (``j``
        ``(c, taps, e)``, ``r`` and ``q`` ``(c, e)``, ``mat`` ``(c, taps)``; ``jrt``: ``[j^T | r]``
        ``(c, e, taps + 1)`` contiguous, when the caller has it), damped by ``damping`` times
        the mean curvature (a relative 1e-12 keeps channels with taps hidden by a dead ReLU or padding
        solvable without moving well-posed ones measurably); solved in float64."""
        qj = j if q is None else j * q.to(j.dtype).unsqueeze(1)
        if self.taps == 1:
            hess = (qj * j).sum(dim=2, keepdim=True).to(torch.float64) / self.numel  # (c, 1, 1)
            grad = (qj[:, 0] * r).sum(dim=1, keepdim=True).to(torch.float64) / self.numel
        else:
            if jrt is None:
                jrt = torch.cat([j, r.to(j.dtype).unsqueeze(1)], dim=1).transpose(1, 2).contiguous()
            both = torch.bmm(qj, jrt).to(torch.float64) / self.numel  # (c, taps, taps + 1)
            hess, grad = both[:, :, :-1], both[:, :, -1]
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

    def _step(
        self,
        mat: torch.Tensor,
        damping: torch.Tensor,
        smooth: float,
        spread: float = _FD_STEP,
        *,
        least_squares: bool = False,
        zs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One damped Gauss-Newton step (``mat``'s shape) from ``mat`` ``(m, taps)`` or ``(s, m, taps)``
        with ``damping`` of ``mat``'s shape less the taps. For L1 (unless ``least_squares``) the
        linearized problem ``min_s sum_e d |r + j^T s|`` is itself solved by :data:`_L1_INNER` reweighted
        least-squares iterations, with residuals below ``smooth * mean|r|`` weighing as if they were that
        large and the floor shrinking each inner iteration: no block call between them. ``zs``: see
        :meth:`_linearize`."""
        with torch.no_grad():
            r, j = self._linearize(mat, spread, zs)
            flat, damping = mat.reshape(-1, self.taps), damping.reshape(-1)
            d = None if self._dt is None else self._dt.repeat(flat.shape[0] // self.m, 1)
            if least_squares or self.problem.loss == "l2":
                step = self._solve_quadratic(j, r, None if d is None else d.square(), flat, damping)
                return step.to(mat.dtype).reshape(mat.shape)
            floor = r.abs().mean(dim=1, keepdim=True) + 1e-30
            jrt = None if self.taps == 1 else torch.cat([j, r.unsqueeze(1)], dim=1).transpose(1, 2).contiguous()
            step = None
            for inner in range(_L1_INNER):  # d|x| <= d (x^2 / 2|x0| + |x0| / 2) around the last inner step
                res = r if step is None else torch.baddbmm(r.unsqueeze(1), step.to(j.dtype).unsqueeze(1), j).squeeze(1)
                q = (1.0 if d is None else d) / (2 * res.abs().clamp_min(smooth * floor))
                step = self._solve_quadratic(j, r, q, flat, damping, jrt)
                smooth = max(smooth * _INNER_DECAY, _SMOOTH_FLOOR)
        return step.to(mat.dtype).reshape(mat.shape)

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

        ``start`` is ``(m, taps)``, or ``(s, m, taps)`` for ``s`` starts run side by side in the same
        block calls (then ``mat`` is ``(s, m, taps)`` and the objectives ``(s, m)``).
        ``smooth`` (L1): residuals below ``smooth * mean|r|`` weigh as if they were that large at first,
        a floor that shrinks by :data:`_SMOOTH_DECAY` each iteration; ``spread``: the first difference
        step of the Jacobian (see :meth:`_linearize`), shrinking by :data:`_FD_DECAY` each iteration to
        :data:`_FD_STEP`. Every step length of :data:`_STEP_SIZES` is tried in one stacked block call,
        and each channel keeps its best. Stops after ``max_iter`` iterations, or once two iterations in
        a row lower the objective by less than ``tol`` times its value.
        """
        with torch.no_grad():
            mat = start.clone().reshape(-1, self.m, self.taps)  # (s, m, taps)
            s, k = mat.shape[0], len(_STEP_SIZES)
            obj = self.stack.objectives(self.stack.z(mat), mat)  # (s, m)
            damping = torch.zeros_like(obj)
            alphas = self._alphas.reshape(1, k, 1, 1)
            one = _STEP_SIZES.index(1.0)
            channel = torch.arange(self.m, device=mat.device)
            it = stalls = 0
            for it in range(1, max_iter + 1):
                z = self.stack.z(mat)  # (s, E, m)
                step = self._step(mat, damping, smooth, max(spread * _FD_DECAY ** (it - 1), _FD_STEP), zs=z)
                smooth = max(smooth * _SMOOTH_DECAY, _SMOOTH_FLOOR)
                # z is affine in mat: every candidate's layer output from the base and the step's move
                cands = torch.addcmul(mat.unsqueeze(1), alphas, step.unsqueeze(1))  # (s, k, m, taps)
                base, move = z.unsqueeze(1), (self.stack.design @ step.transpose(1, 2)).unsqueeze(1)
                pieces = self.stack.pieces(s, k)
                if len(pieces) == 1:  # the usual case
                    zs = self.stack.buffer(s, k, *self.stack.z0.shape)
                    torch.addcmul(base, alphas, move, out=zs)
                    objs = self.stack.objectives(zs.flatten(0, 1), cands.flatten(0, 1)).unflatten(0, (s, k))
                else:
                    objs = torch.empty(s, k, self.m, dtype=torch.float64, device=mat.device)
                    for st, cs in pieces:
                        zs = self.stack.buffer(len(range(s)[st]), len(range(k)[cs]), *self.stack.z0.shape)
                        torch.addcmul(base[st], alphas[:, cs], move[st], out=zs)
                        objs[st, cs] = self.stack.objectives(zs.flatten(0, 1), cands[st, cs].flatten(0, 1)).unflatten(0, zs.shape[:2])
                best_obj, best = objs.min(dim=1)  # (s, m)
                improved = best_obj < obj
                chosen = torch.stack([cands[i, best[i], channel] for i in range(s)])
                damping = torch.where(
                    improved,
                    torch.where(best <= one, damping / 3, damping),
                    torch.clamp(damping * 10, min=1e-6),
                )
                best_obj = torch.where(improved, best_obj, obj)
                gain = float((obj - best_obj).sum())
                mat, obj = torch.where(improved.unsqueeze(-1), chosen, mat), best_obj
                # Stop once a few iterations in a row gain nothing: failed channels get more damping first.
                stalls = stalls + 1 if gain <= tol * float(obj.sum()) + 1e-300 else 0
                if stalls >= 2:
                    break
        self.stack.release()
        return mat.reshape(start.shape), obj.reshape(start.shape[:-1]), it

    def solve(self, *, max_iter: int = MAX_ITER) -> tuple[torch.Tensor, dict]:
        """Solve from zero and from the linearized solution (side by side) for :data:`_MERGE_AFTER`
        iterations, keep each channel's better point and go on from there to convergence.

        The per-channel problems of kinked blocks have several local minima; the two starts lead to
        different ones for many channels, and which is better shows after a few iterations.
        """
        start = time.perf_counter()
        zero = torch.zeros(self.m, self.taps, dtype=self.z0.dtype, device=self.z0.device)
        obj0 = self.channel_objective(zero)
        # the undamped least-squares step from zero, through the difference Jacobian at a small step
        linear = self._step(zero, torch.zeros_like(obj0), 0.0, least_squares=True)
        closed_form = self.problem.loss == "l2" and self.post_is_affine(linear)
        if closed_form:  # the exact least-squares solution, through the exact Jacobian
            mat, iterations = self._linear_step(zero), []
        else:
            first = min(_MERGE_AFTER, max_iter)
            mats, objs, begun = self.run(torch.stack([zero, linear]), max_iter=first, tol=_TOL)
            better = objs[1] < objs[0]
            mat = torch.where(better[:, None], mats[1], mats[0])
            mat, _, polish = self.run(mat, max_iter=max_iter, tol=_TOL, spread=_FD_POLISH)
            iterations = [begun, polish]
            if self.problem.loss == "l2" and _VALLEY_STEPS:
                mat = descend(self.stack, mat, steps=_VALLEY_STEPS, lr=_VALLEY_LR, tol=_TOL)
                mat, _, again = self.run(mat, max_iter=max_iter, tol=_TOL, spread=_FD_POLISH)
                iterations.append(again)
        lam = self.problem.to_lam(mat)
        with torch.no_grad():  # through the real block with W + lam u, not the per-channel model
            objective = float(self.problem.objective(lam))
        info = {
            "objective": objective,
            "objective_before": float(obj0.sum()),
            "iterations": iterations,
            "closed_form": closed_form,
            "seconds": time.perf_counter() - start,
        }
        logger.info(
            "fast solver on %s: objective %.6g -> %.6g", self.problem.layer.name, info["objective_before"], info["objective"]
        )
        return lam, info


def solve_fast(problem: EditProblem, *, max_iter: int = MAX_ITER) -> tuple[torch.Tensor, dict]:
    """Solve ``problem`` with the per-channel decomposition; returns ``(lam, info)``.

    Blocks that mix output channels (squeeze-excite after the edited conv, a LayerNorm on the
    branch) and layers whose output is not linear in the weight (weight standardization) go to the
    joint Gauss-Newton solver of :mod:`surgery.solvers.joint` instead.
    """
    if not problem.layer.channelwise or not linear_in_weight(problem):
        return solve_joint(problem, max_iter=max_iter)
    return FastSolver(problem).solve(max_iter=max_iter)
