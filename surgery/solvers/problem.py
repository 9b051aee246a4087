"""The optimization problem of one edit: keys, target values, the direction and the loss.

``objective(lam) = loss(v*, f(k*; W + lam (x) u)) + ridge * ||lam||^2``, where the loss is the mean over
every element of ``d * |v* - f|`` (L1) or ``(d * (v* - f))^2`` (L2), and ``d`` is the square root of
the concept mask average-pooled to value resolution (all ones without a mask).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from surgery.editable import EditableLayer
from surgery.edits.edit import rank_one_delta
from surgery.errors import SurgeryError

__all__ = ["EditProblem", "Loss", "value_weights"]

Loss = Literal["l1", "l2"]


def value_weights(masks: torch.Tensor, values: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``sqrt`` of image masks ``(N, 1, H, W)`` area-pooled to the values' resolution.

    Returned with the values' number of dimensions, size 1 on the channel axis, ready to broadcast.
    """
    moved = values.movedim(channel_dim, 1)
    spatial = moved.shape[2:]
    if len(spatial) != 2:
        raise SurgeryError(
            f"a loss mask needs spatial values (N, C, H, W); this layer's values have shape "
            f"{tuple(values.shape)}. Use use_mask=False"
        )
    pooled = F.adaptive_avg_pool2d(masks.to(values.dtype), tuple(spatial)).sqrt()
    return pooled.movedim(1, channel_dim)


@dataclass
class EditProblem:
    """Everything a solver needs to find ``lam`` for one layer.

    Attributes:
        layer: the editable layer.
        keys: keys of the transformed exemplars.
        values: target values, read from the original exemplars.
        context: other block inputs (e.g. the identity branch), from the transformed exemplars.
        u: unit directions ``(rank, n)`` along the weight's input-channel axis.
        weights: loss weights broadcastable to ``values`` (``sqrt`` of the pooled mask), or ``None``.
        loss: ``"l1"`` or ``"l2"``.
        ridge: ``ridge * ||lam||^2`` is added to the objective.
    """

    layer: EditableLayer
    keys: torch.Tensor
    values: torch.Tensor
    context: Mapping[str, torch.Tensor] = field(default_factory=dict)
    u: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    loss: Loss = "l1"
    ridge: float = 0.0

    def __post_init__(self) -> None:
        if self.loss not in ("l1", "l2"):
            raise SurgeryError(f"loss must be 'l1' or 'l2', got {self.loss!r}")
        if self.ridge < 0:
            raise SurgeryError(f"ridge must be >= 0, got {self.ridge}")
        w = self.layer.weight
        self.keys = self.keys.to(device=w.device, dtype=w.dtype)
        self.values = self.values.to(device=w.device, dtype=w.dtype)
        self.context = {k: v.to(device=w.device, dtype=w.dtype) for k, v in self.context.items()}
        if self.u is not None:
            self.u = self.u.to(device=w.device, dtype=w.dtype)
            if self.u.ndim != 2 or self.u.shape[1] != w.shape[1]:
                raise SurgeryError(
                    f"u must be (rank, {w.shape[1]}) for {self.layer.name}, got {tuple(self.u.shape)}"
                )
        if self.weights is not None:
            self.weights = self.weights.to(device=w.device, dtype=w.dtype)

    @property
    def weight0(self) -> torch.Tensor:
        """The layer's current weight, detached."""
        return self.layer.weight.detach()

    @property
    def lam_shape(self) -> tuple[int, ...]:
        """``(rank, m, *kernel)``."""
        assert self.u is not None
        w = self.weight0
        return (self.u.shape[0], w.shape[0], *w.shape[2:])

    def weight_for(self, lam: torch.Tensor) -> torch.Tensor:
        """``W + lam (x) u``."""
        assert self.u is not None
        return self.weight0 + rank_one_delta(lam, self.u)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The block's values for the transformed keys with ``weight``."""
        return self.layer.block_forward(self.keys, weight, self.context)

    def loss_value(self, values: torch.Tensor) -> torch.Tensor:
        """The (weighted, mean) loss between ``values`` and the targets."""
        diff = values - self.values
        if self.weights is not None:
            diff = diff * self.weights
        return diff.abs().mean() if self.loss == "l1" else diff.square().mean()

    def objective(self, lam: torch.Tensor) -> torch.Tensor:
        """Loss plus ridge for the factors ``lam``."""
        value = self.loss_value(self.forward(self.weight_for(lam)))
        if self.ridge:
            value = value + self.ridge * lam.square().sum()
        return value

    def projection(self, weight: torch.Tensor) -> torch.Tensor:
        """The ``lam`` whose ``W + lam (x) u`` is closest to ``weight`` (least squares along ``u``)."""
        assert self.u is not None
        delta = weight.detach() - self.weight0
        gram = self.u @ self.u.T  # (r, r)
        coeff = torch.einsum("mn...,rn->rm...", delta, self.u)
        return torch.einsum("sr,rm...->sm...", torch.linalg.inv(gram), coeff)
