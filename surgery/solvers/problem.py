"""The optimization problem of one edit: keys, target values, the direction and the loss.

``objective(lam) = loss(v*, f(k*; W + lam (x) u)) + ridge * ||lam||^2``, where the loss is the mean over
every element of ``d * |v* - f|`` (L1) or ``(d * (v* - f))^2`` (L2), and ``d`` is the square root of
the concept mask average-pooled to value resolution (all ones without a mask).

:class:`EditProblem` owns that objective (:meth:`EditProblem.objective_of`, the one definition every
solver evaluates, whatever the layout of its residuals) and the shapes the solvers convert between:
``lam`` ``(rank, m, *kernel)`` and ``mat`` ``(m, taps)`` (taps rank-major), values-shaped tensors as
``(m, positions)`` or ``(positions, m)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from surgery.editable import EditableLayer
from surgery.errors import SurgeryError
from surgery.layout import Layout, channels_first_rows, channels_last_rows
from surgery.rank_one import rank_one_delta

__all__ = ["EditProblem", "Loss", "value_weights", "penalty"]

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
    lay = Layout.of(layout, values)
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


def penalty(r: torch.Tensor, loss: Loss, *, inplace: bool = False) -> torch.Tensor:
    """The loss of each (weighted) residual: ``|r|`` for L1, ``r^2`` for L2 (in place on ``r`` if asked)."""
    if loss == "l1":
        return r.abs_() if inplace else r.abs()
    return r.square_() if inplace else r.square()


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
    def numel(self) -> int:
        """Elements of the values: the loss is their mean."""
        return self.values.numel()

    # -- shapes -----------------------------------------------------------------------------------
    @property
    def lam_shape(self) -> tuple[int, ...]:
        """``(rank, m, *kernel)``."""
        assert self.u is not None
        w = self.weight0
        return (self.u.shape[0], w.shape[0], *w.shape[2:])

    def to_mat(self, lam: torch.Tensor) -> torch.Tensor:
        """``(rank, m, *kernel)`` -> ``(m, taps)``, taps rank-major (``t = r * kh * kw + kernel position``)."""
        rank, m = lam.shape[0], lam.shape[1]
        return lam.reshape(rank, m, -1).permute(1, 0, 2).reshape(m, -1)

    def to_lam(self, mat: torch.Tensor) -> torch.Tensor:
        """``(m, taps)`` -> ``(rank, m, *kernel)``: the inverse of :meth:`to_mat`."""
        shape = self.lam_shape
        return mat.reshape(shape[1], shape[0], -1).permute(1, 0, 2).reshape(shape)

    def per_channel(self, t: torch.Tensor) -> torch.Tensor:
        """Values-shaped ``t`` -> ``(m, positions)``, one row per output channel."""
        return channels_first_rows(t, self.layer.value_channel_dim)

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """Values-shaped ``t`` -> ``(positions, m)``, channels last (a view where ``t`` is laid out so)."""
        return channels_last_rows(t, self.layer.value_channel_dim)

    # -- the objective ----------------------------------------------------------------------------
    def weight_for(self, lam: torch.Tensor) -> torch.Tensor:
        """``W + lam (x) u``."""
        assert self.u is not None
        return self.weight0 + rank_one_delta(lam, self.u)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The block's values for the transformed keys with ``weight``."""
        return self.layer.block_forward(self.keys, weight, self.context)

    def residual(self, values: torch.Tensor) -> torch.Tensor:
        """``d * (values - v*)``, values-shaped, in the values' dtype."""
        r = values - self.values
        return r if self.weights is None else r * self.weights

    def objective_of(
        self,
        residual: torch.Tensor,
        factors: torch.Tensor | None = None,
        *,
        dim: int | None = None,
        inplace: bool = False,
        loss: Loss | None = None,
    ) -> torch.Tensor:
        """The objective from weighted residuals ``d * (f - v*)`` (any layout) and the factors (for the
        ridge; ``None``: the loss alone): the penalty summed over ``dim`` (every axis when ``None``), in the
        residuals' dtype, then divided by the values' element count in float64; plus ``ridge`` times the
        factors' squares summed in float64 (over the last axis when ``dim`` is given, each row's factors,
        else over all). Per-channel objectives come from residuals laid out per channel; their sum is the
        objective. Differentiable where ``residual`` is, unless ``inplace`` (then ``residual`` is overwritten).
        ``loss`` overrides the problem's (the joint solver gives an L1 run an L2 start).
        """
        terms = penalty(residual, loss or self.loss, inplace=inplace)
        obj = (terms.sum() if dim is None else terms.sum(dim=dim)).to(torch.float64) / self.numel
        if self.ridge and factors is not None:
            sq = factors.to(torch.float64).square()
            obj = obj + self.ridge * (sq.sum() if dim is None else sq.sum(dim=-1))
        return obj

    def objective(self, lam: torch.Tensor) -> torch.Tensor:
        """Loss plus ridge for the factors ``lam``, through the real block with ``W + lam (x) u`` (float64)."""
        return self.objective_of(self.residual(self.forward(self.weight_for(lam))), lam)

    def loss_of_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The loss alone (no ridge) of any weight, differentiable in it (the reference solver's objective)."""
        return self.objective_of(self.residual(self.forward(weight)))

    def projection(self, weight: torch.Tensor) -> torch.Tensor:
        """The ``lam`` whose ``W + lam (x) u`` is closest to ``weight`` (least squares along ``u``)."""
        assert self.u is not None
        delta = weight.detach() - self.weight0
        gram = self.u @ self.u.T  # (r, r)
        coeff = torch.einsum("mn...,rn->rm...", delta, self.u)
        return torch.einsum("sr,rm...->sm...", torch.linalg.inv(gram), coeff)
