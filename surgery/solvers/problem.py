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

from surgery.editable import EditableLayer
from surgery.edits.edit import rank_one_delta
from surgery.errors import SurgeryError
from surgery.layout import Layout

__all__ = ["EditProblem", "Loss", "value_weights"]

Loss = Literal["l1", "l2"]


def value_weights(
    masks: torch.Tensor | None,
    values: torch.Tensor,
    layout: Layout | int,
    *,
    prefix_weight: float = 1.0,
    loss: Loss = "l1",
) -> torch.Tensor | None:
    """Loss weights ``d``: ``sqrt`` of image masks ``(N, 1, H, W)`` area-pooled to the values' positions.

    Returned with the values' number of dimensions, size 1 on the channel axis, ready to broadcast.
    ``layout`` is the layer's value :class:`~surgery.layout.Layout` (an int is read as a channel
    axis, 1 for NCHW and -1 for NHWC maps). On token layouts, each class/register/distillation token
    counts as ``prefix_weight`` grid tokens fully inside the concept: ``d = prefix_weight`` for L1 and
    ``sqrt(prefix_weight)`` for L2, since the loss is ``mean(d |r|)`` or ``mean((d r)^2)``.

    Without masks (``masks=None``) every grid token weighs 1 and prefix tokens as above; the result is
    ``None`` (no weighting) when that changes nothing, i.e. ``prefix_weight == 1`` or no prefix tokens.
    """
    lay = layout.resolve(values) if isinstance(layout, Layout) else _int_layout(layout, values)
    prefix_d = prefix_weight if loss == "l1" else prefix_weight**0.5
    if masks is None:
        if prefix_weight == 1.0 or lay.kind != "tokens" or not lay.prefix:
            return None
        d = torch.ones(values.shape[0], values.shape[1], 1, dtype=values.dtype, device=values.device)
        d[:, : lay.prefix] = prefix_d
        return d
    if not lay.spatial:
        raise SurgeryError(
            f"a loss mask needs spatial values (N, C, H, W), (N, H, W, C) or tokens (N, L, C); this "
            f"layer's values have shape {tuple(values.shape)} and no spatial layout. Use use_mask=False"
        )
    try:
        # pooled in the values' dtype, as before layouts existed (bit-identical weights for CNNs)
        pooled, prefix = lay.pool_mask(masks, values, dtype=values.dtype)
    except SurgeryError as e:
        raise SurgeryError(f"a loss mask needs spatial values: {e}. Use use_mask=False") from None
    d = pooled.sqrt()
    if prefix is not None:
        d = torch.where(prefix, torch.full_like(d, prefix_d), d)
    return d


def _int_layout(channel_dim: int, values: torch.Tensor) -> Layout:
    if channel_dim == 1:
        return Layout("nchw")
    if channel_dim == -1 and values.ndim == 4:
        return Layout("nhwc")
    return Layout("flat", channel_dim=channel_dim)


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
        prefix_weight: the class/register-token weight the weights were built with (a record).
    """

    layer: EditableLayer
    keys: torch.Tensor
    values: torch.Tensor
    context: Mapping[str, torch.Tensor] = field(default_factory=dict)
    u: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    loss: Loss = "l1"
    ridge: float = 0.0
    prefix_weight: float = 1.0

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
