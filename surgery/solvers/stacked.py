"""The block after an edited layer, called on stacks of the layer's outputs at once (the fast solver's
evaluations).

Every map is held with its channels last, as a ``(positions, m)`` matrix: the layer output for factors
``mat`` ``(m, taps)`` is ``z = z0 + A @ mat^T``, one matrix product, and a stack of ``k`` candidate
outputs ``(k, positions, m)`` goes to the block as one batch of ``k * N`` samples (the block's context
repeated), NCHW maps channels-last, where pooling is much faster on the CPU. The block's values come
back as ``(k, value positions, m)`` without a copy, and the per-channel objectives are computed in
place on them: fresh multi-megabyte buffers cost page faults. Stacks larger than :data:`STACK_BYTES`
are cut into pieces, one block call each.
"""

from __future__ import annotations

import torch

from .problem import EditProblem
from .responses import TapResponses

__all__ = ["StackedBlock", "STACK_BYTES"]

STACK_BYTES = 64 * 2**20  # layer outputs stacked into one block call, at most


class StackedBlock:
    """One problem's block, evaluated on stacks of layer outputs in the ``(positions, m)`` layout."""

    def __init__(self, problem: EditProblem, responses: TapResponses) -> None:
        self.problem = problem
        self.zdim = responses.zdim
        self.m = responses.m
        self.rows = problem.rows  # values-shaped -> (positions, m)
        moved = responses.z0.movedim(self.zdim, -1)
        self.batch = responses.z0.shape[0]
        self.sample_shape = moved.shape[1:]  # one sample's layer output, channels last
        self.z0 = moved.reshape(-1, self.m).contiguous()  # (E, m)
        self.design = responses.matrix.T.contiguous()  # (E, taps): z = z0 + design @ mat^T
        self.values = self.rows(problem.values).contiguous()  # (Ev, m)
        w = problem.weights
        self.d = None if w is None else self.rows(w.expand_as(problem.values)).contiguous()  # (Ev, m)
        self.channels_last = responses.z0.ndim == 4 and self.zdim % 4 == 1
        self.batchable: bool | None = None  # whether the block treats samples independently (checked once)
        self.contexts: dict[int, dict[str, torch.Tensor]] = {}  # the context repeated for k outputs
        self.scratch: dict[tuple[int, ...], torch.Tensor] = {}

    def z(self, mat: torch.Tensor) -> torch.Tensor:
        """Layer outputs ``(..., E, m)`` for factors ``(..., m, taps)``."""
        return torch.matmul(self.design, mat.transpose(-1, -2).to(self.design.dtype)) + self.z0

    def pieces(self, s: int, k: int) -> list[tuple[slice, slice]]:
        """An ``(s, k)`` stack of layer outputs (starts x candidates) cut into rectangular pieces of at most
        :data:`STACK_BYTES` each, one block call a piece: the whole stack where it fits (the usual case),
        else whole starts, else runs of candidates of one start. Many exemplars or large maps would
        otherwise need gigabytes at once."""
        fit = max(1, STACK_BYTES // (self.z0.numel() * self.z0.element_size()))
        if s * k <= fit:
            return [(slice(0, s), slice(0, k))]
        if k <= fit:
            per = fit // k
            return [(slice(i, min(i + per, s)), slice(0, k)) for i in range(0, s, per)]
        return [(slice(i, i + 1), slice(lo, min(lo + fit, k))) for i in range(s) for lo in range(0, k, fit)]

    def buffer(self, *shape: int) -> torch.Tensor:
        """A scratch tensor of ``shape``, reused until :meth:`release` (fresh large buffers cost page faults)."""
        buf = self.scratch.get(shape)
        if buf is None:
            buf = self.scratch[shape] = torch.empty(shape, dtype=self.z0.dtype, device=self.z0.device)
        return buf

    def release(self) -> None:
        """Drop the scratch buffers and repeated contexts (the next run stacks other counts of outputs)."""
        self.scratch.clear()
        self.contexts.clear()

    def post(self, zs: torch.Tensor) -> torch.Tensor:
        """The block on a stack of layer outputs ``(k, E, m)``; returns values ``(k, Ev, m)``.

        One call on the outputs concatenated along the batch axis (the context repeated) when the
        block treats samples independently (checked once, at the first call); a call per output
        otherwise."""
        k = zs.shape[0]
        maps = zs.reshape(-1, *self.sample_shape).movedim(-1, self.zdim)  # (k * N, ...), channels-last strides
        post = self.problem.layer.post
        if post is None:  # the value is z itself
            return zs
        if self.batchable is None:
            self.batchable = self._check_batchable(maps[: self.batch])
        if not self.batchable:
            n = self.batch
            return torch.stack([self.rows(post(maps[i * n : (i + 1) * n], self.problem.context)) for i in range(k)])
        if k not in self.contexts:
            self.contexts[k] = {n: self._like_z(t.repeat(k, *[1] * (t.ndim - 1))) for n, t in self.problem.context.items()}
        return self.rows(post(maps, self.contexts[k])).reshape(k, -1, self.m)

    def owned(self, out: torch.Tensor) -> bool:
        """Whether a block output is a temporary that may be overwritten: not a view of the problem's
        tensors (a block could hand a context back as its value)."""
        kept = [*self.problem.context.values(), *(t for c in self.contexts.values() for t in c.values())]
        ptr = out.untyped_storage().data_ptr()
        return all(ptr != t.untyped_storage().data_ptr() for t in kept)

    def objectives(self, zs: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
        """Per-channel objectives ``(k, m)`` in float64 of candidates with layer outputs ``zs`` ``(k, E, m)``
        and factors ``mats`` ``(k, m, taps)`` (for the ridge); differentiable where ``zs`` is."""
        out = self.post(zs)
        inplace = not out.requires_grad and self.owned(out)
        if inplace:
            r = out.sub_(self.values)
            r = r if self.d is None else r.mul_(self.d)
        else:
            r = out - self.values
            r = r if self.d is None else r * self.d
        return self.problem.objective_of(r, mats, dim=1, inplace=inplace)

    def _like_z(self, t: torch.Tensor) -> torch.Tensor:
        """A context map in the layout the stacked layer outputs have (channels-last for NCHW maps)."""
        if self.channels_last and t.ndim == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t

    def _check_batchable(self, z: torch.Tensor) -> bool:
        """Whether the block gives each sample of a stack what it gives that sample alone (the context
        repeated): checked on ``z`` stacked with ``2 z + 1``."""
        n, post, context = z.shape[0], self.problem.layer.post, self.problem.context
        if any(t.shape[:1] != (n,) for t in context.values()):
            return False  # a context without the batch axis first cannot be repeated along it
        with torch.no_grad():
            alone = post(z, context)
            ctx = {name: t.repeat(2, *[1] * (t.ndim - 1)) for name, t in context.items()}
            try:
                both = post(torch.cat([z, 2 * z + 1], dim=0), ctx)
            except RuntimeError:
                return False
            return both.shape[0] == 2 * n and torch.allclose(both[:n], alone, rtol=1e-5, atol=1e-6)
