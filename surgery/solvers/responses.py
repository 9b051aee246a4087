"""The edited layer's output as an affine function of the factors ``lam`` (shared by the fast and joint solvers).

With ``W' = W + lam (x) u`` and a layer linear in its weight, ``z = z0 + sum_t lam[:, t] * A_t``: ``z0`` is
the unedited output and ``A_t`` the response to the unit update at tap ``t`` (for a conv, ``u^T k`` shifted
by the kernel tap), the same in every output channel, so one channel of it is kept. Taps are ordered
rank-major: ``t = r * kh * kw + kernel position``; ``mat`` is ``lam`` as ``(m, taps)`` (:meth:`EditProblem.to_mat`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from surgery.layout import channels_first_rows
from surgery.rank_one import rank_one_delta

from .problem import EditProblem

__all__ = ["TapResponses"]


class TapResponses:
    """``z0`` and the tap responses ``A_t`` of one problem's keys; :meth:`layer_output` is ``z(mat)``."""

    def __init__(self, problem: EditProblem) -> None:
        self.problem = problem
        self.zdim = problem.layer.key_channel_dim  # the layer's output has its channels where its input does
        self.rank, self.m = problem.lam_shape[:2]
        self.kernel = tuple(problem.lam_shape[2:])
        self.taps = self.rank * int(torch.Size(self.kernel).numel())
        with torch.no_grad():
            self.z0 = problem.layer.layer_forward(problem.keys, problem.weight0)
            per_tap = self._per_tap(problem.keys)  # taps on the channel axis
        self.designs = [per_tap.narrow(self.zdim, t, 1) for t in range(self.taps)]
        # as one (taps, positions) matrix: z = z0 + (mat @ it), channels moved back in place
        self.matrix = channels_first_rows(per_tap, self.zdim)
        self._moved_shape = self.z0.movedim(self.zdim, 0).shape

    def _per_tap(self, keys: torch.Tensor) -> torch.Tensor:
        """Every tap's response, bias excluded, one per entry of the channel axis. Plain convolutions and
        linear layers get them from one call whose weight has one output row per tap (``u[r]`` at one
        kernel position); other layers from one call per tap with the whole weight."""
        layer = self.problem.layer
        module = layer.module
        if layer.plain and getattr(module, "groups", 1) == 1:
            per_rank = self.taps // self.rank
            u = self.problem.u.to(device=keys.device, dtype=keys.dtype)
            rows = torch.zeros(self.taps, u.shape[1], per_rank, dtype=keys.dtype, device=keys.device)
            for t in range(self.taps):
                rows[t, :, t % per_rank] = u[t // per_rank]
            rows = rows.reshape(self.taps, u.shape[1], *self.kernel)
            return F.linear(keys, rows) if type(module) is nn.Linear else module._conv_forward(keys, rows, None)
        return torch.cat(self.per_call(keys), dim=self.zdim)

    def per_call(self, keys: torch.Tensor) -> list[torch.Tensor]:
        """The tap responses from the whole layer, called once per tap with the unit update (any layer)."""
        problem = self.problem
        out = []
        with torch.no_grad():
            for t in range(self.taps):
                basis = torch.zeros(self.m, self.taps, dtype=keys.dtype, device=keys.device)
                basis[:, t] = 1
                delta = rank_one_delta(problem.to_lam(basis), problem.u)
                out.append(problem.layer.update_response(keys, delta).narrow(self.zdim, 0, 1))
        return out

    def layer_output(self, mat: torch.Tensor) -> torch.Tensor:
        """``z`` for factors ``mat`` ``(m, taps)``."""
        change = (mat.to(self.matrix.dtype) @ self.matrix).reshape(self._moved_shape)
        return self.z0 + change.movedim(0, self.zdim)
