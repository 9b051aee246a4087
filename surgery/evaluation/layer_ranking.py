"""Where to edit a model: its candidate layers in the order measured for its family, or ranked by
editing each one on the user's own exemplars."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from surgery.adapters import get_adapter
from surgery.editable import EditableLayer
from surgery.edits.apply import edited
from surgery.errors import LayerNotFoundError
from surgery.layers import get_layer
from surgery.layout import channels_last_rows
from surgery.rewrite import rewrite

__all__ = ["recommended_layers", "rank_layers"]

logger = logging.getLogger(__name__)

_BARELY = 0.95
"""A logit-distance ratio above this is an edit that barely moves the logits."""


def recommended_layers(
    model: nn.Module,
    k: int = 3,
    *,
    originals: torch.Tensor | None = None,
    transformed: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    pool: int = 12,
) -> list[EditableLayer]:
    """Where to edit ``model``: its ``k`` best candidate layers, best first.

    Candidates are the layers valued after a residual add and the skip-free sites (stage transitions,
    projections of blocks without a residual add, VGG convs; ``EditableLayer.skip`` is False), ordered
    by the adapter (``Adapter.candidates``) by site kind, branch and depth as the breadth protocol
    (``python -m benchmarks.breadth --sweep``) measured for the family: ConvNeXt, EfficientNet/MobileNet,
    Swin and MetaFormer put a skip-free site first, where one edit is not diluted by a skip; ResNets
    and VGGs the deepest block first, as the paper found on trained models.

    With exemplars (``originals`` and ``transformed`` image tensors, optionally ``masks``), the first
    ``pool`` candidates are measured instead on this model: :func:`rank_layers` edits each one and
    keeps those that move a left-out exemplar's logits furthest toward its original's (a warning says
    when even the best barely moves them).
    """
    if k < 1:
        raise LayerNotFoundError(f"k must be at least 1, got {k}")
    candidates = get_adapter(model).candidates(model)
    if originals is None and transformed is None:
        return candidates[:k]
    if originals is None or transformed is None:
        raise LayerNotFoundError("measured recommendations need both originals and transformed exemplars")
    ranked = rank_layers(model, originals, transformed, masks, layers=candidates[:pool])
    if ranked and ranked[0][1] > _BARELY:
        logger.warning(
            "no candidate layer of the %d measured moves the left-out exemplar's logits by more than %.0f%% "
            "toward its original's (best: %s, %.3f of the distance left); more exemplars, or a larger pool, "
            "may find one",
            len(ranked), 100 * (1 - _BARELY), ranked[0][0].name, ranked[0][1],
        )
    return [layer for layer, _ in ranked[:k]]


def rank_layers(
    model: nn.Module,
    originals: torch.Tensor,
    transformed: torch.Tensor,
    masks: torch.Tensor | None = None,
    *,
    layers: Sequence[EditableLayer | str] | None = None,
) -> list[tuple[EditableLayer, float]]:
    """Edit each of ``layers`` on the exemplars and rank them by the logit distance they leave.

    For each layer a quick edit (``rewrite`` with L2 loss, a few solver iterations, and the
    exemplars' own key second moment plus a ridge in place of dataset statistics) is fitted on all
    exemplars but the last, and scored on the last: the mean logit distance between the transformed
    and the original image after the edit, divided by the distance before (lower is better; with one
    exemplar it is fitted and scored on the same one). Returns ``(layer, ratio)`` best first.

    This is a measurement on the user's model, not an attribution proxy: in the breadth benchmark
    the exemplars' logit ratio ranked layers like the held-out ratio better than the two scores
    computed before editing (gradient x activation at the value site, a masked value patch).
    """
    layers = [get_layer(model, l) for l in (layers if layers is not None else recommended_layers(model, k=12))]
    x, x2 = originals, transformed
    if x.shape != x2.shape or x.ndim != 4:
        raise LayerNotFoundError("originals and transformed must be image batches (N, 3, H, W) of one shape")
    n = x.shape[0]
    ntrain = max(1, n - 1)
    score = slice(ntrain, n) if n > 1 else slice(0, 1)
    with torch.no_grad():
        target = model(x[score]).float()
        before = (model(x2[score]).float() - target).norm(dim=-1).mean()
    ranked = []
    for layer in layers:
        keys = torch.cat([layer.capture(model, x2).keys, layer.capture(model, x).keys])
        k_rows = channels_last_rows(keys, layer.key_channel_dim).to(torch.float64)
        moment = k_rows.T @ k_rows / len(k_rows)
        moment = moment + 1e-2 * torch.trace(moment) / moment.shape[0] * torch.eye(
            moment.shape[0], dtype=moment.dtype, device=moment.device
        )
        edit = rewrite(model, layer, x, x2, masks, stats=moment, loss="l2", steps=10, ntrain=ntrain)
        with torch.no_grad(), edited(model, edit):
            after = (model(x2[score]).float() - target).norm(dim=-1).mean()
        ranked.append((layer, float(after / before.clamp_min(1e-30))))
    return sorted(ranked, key=lambda t: t[1])
