"""The rank-one direction ``u`` of an edit (docs/method.md section 3).

With ``C`` the second moment of the layer's keys and ``Z = C^{-1/2}``, the exemplar keys inside the
concept mask are whitened, and ``u = normalize(Z s)`` for the top right singular vector ``s``. This is
the top generalized eigenvector of ``(sum_j w_j^2 k_j k_j^T, C)``: the direction in which the concept's
keys stand out most against typical keys. For one key it is ``C^{-1} k``.
"""

from __future__ import annotations

import torch

from surgery.errors import SurgeryError
from surgery.layout import Layout, channels_last_rows
from surgery.stats.whitening import inverse_sqrt

__all__ = ["rank_one_direction", "key_weights"]


def key_weights(
    masks: torch.Tensor | None,
    keys: torch.Tensor,
    layout: Layout | int,
    *,
    prefix_weight: float = 1.0,
) -> torch.Tensor | None:
    """Per-position weights of ``keys`` from image masks ``(N, 1, H, W)``, area-pooled to key resolution.

    Returns ``None`` without masks. ``layout`` is the layer's key :class:`~surgery.layout.Layout`
    (an int is read as a channel axis: 1 for NCHW maps, -1 for NHWC maps, as before layouts existed).
    On a token layout the mask is pooled over each patch of the grid; each class/register/distillation
    token counts as ``prefix_weight`` grid tokens fully inside the concept (its key is weighted by
    ``sqrt(prefix_weight)``, since the direction weighs ``w^2 k k^T``).
    """
    if masks is None:
        return None
    lay = Layout.of(layout, keys)
    if not lay.spatial:
        raise SurgeryError(
            f"masks need spatial keys (N, C, H, W), (N, H, W, C) or tokens (N, L, C); this layer's keys "
            f"have shape {tuple(keys.shape)} and no spatial layout. Pass masks=None to use every position"
        )
    try:
        pooled, prefix = lay.pool_mask(masks, keys)
    except SurgeryError as e:
        raise SurgeryError(f"masks need spatial keys: {e}. Pass masks=None to use every position") from None
    if prefix is not None:
        pooled = torch.where(prefix, torch.full_like(pooled, prefix_weight**0.5), pooled)
    # rows in the order of channels_last_rows: every axis but the channel axis, flattened
    return channels_last_rows(pooled, lay.channel_axis).reshape(-1)


def rank_one_direction(
    moment: torch.Tensor,
    keys: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    rank: int = 1,
    eps: float | None = None,
    whitening: torch.Tensor | None = None,
) -> torch.Tensor:
    """The edit direction(s) ``u``, unit rows of shape ``(rank, n)`` in float64.

    Args:
        moment: ``C``, the ``(n, n)`` second moment of the layer's keys.
        keys: exemplar keys as rows ``(positions, n)`` (see :func:`~surgery.layout.channels_last_rows`).
        weights: per-position weights (the mask at key resolution); ``None`` weighs all equally.
        rank: how many directions: the top ``rank`` singular vectors.
        eps: ridge added to ``C``; by default only when ``C`` is ill-conditioned.
        whitening: ``C^{-1/2}`` computed once for these statistics (:meth:`KeyStats.whitening`);
            without it (or with ``eps``) it is computed here.
    """
    n = moment.shape[0]
    if keys.ndim != 2 or keys.shape[1] != n:
        raise SurgeryError(f"keys must be (positions, {n}) to match the statistics, got {tuple(keys.shape)}")
    if not 1 <= rank <= n:
        raise SurgeryError(f"rank must be between 1 and {n}, got {rank}")
    k = keys.detach().to(device=moment.device, dtype=torch.float64)
    if weights is not None:
        w = weights.detach().to(device=k.device, dtype=torch.float64).reshape(-1)
        if w.shape[0] != k.shape[0]:
            raise SurgeryError(f"{w.shape[0]} weights for {k.shape[0]} key positions")
        k = k * w[:, None]
    if not torch.isfinite(k).all():
        raise SurgeryError("exemplar keys contain NaN or inf")
    if not k.abs().sum() > 0:
        raise SurgeryError(
            "the exemplar keys inside the mask are all zero, so they define no direction; "
            "check the mask covers the concept (or pass no mask)"
        )
    if whitening is not None and eps is None:
        if tuple(whitening.shape) != (n, n):
            raise SurgeryError(f"the whitening is {tuple(whitening.shape)}, expected ({n}, {n})")
        z = whitening.to(device=k.device, dtype=torch.float64)
    else:
        z = inverse_sqrt(moment, eps=eps)
    whitened = k @ z
    _, _, vh = torch.linalg.svd(whitened, full_matrices=False)
    u = vh[:rank] @ z  # Z is symmetric: u_i = Z s_i
    u = u / u.norm(dim=1, keepdim=True)
    # A deterministic sign: positive projection of the (weighted) mean exemplar key.
    mean_key = k.mean(dim=0)
    signs = torch.sign(u @ mean_key)
    signs[signs == 0] = 1
    return u * signs[:, None]
