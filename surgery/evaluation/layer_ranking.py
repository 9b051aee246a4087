"""Where to edit a model: its candidate layers in the order measured for its family, or ranked by
editing each one on the user's own exemplars."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from surgery._guards import model_device
from surgery.adapters import get_adapter
from surgery.editable import EditableLayer
from surgery.edits.apply import edited
from surgery.errors import LayerNotFoundError, SurgeryError
from surgery.layers import get_layer
from surgery.rewrite import rewrite
from surgery.stats.collect import collect_key_stats
from surgery.stats.keystats import KeyStats, ridged_moment

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
    data: Any = None,
    progress: bool = False,
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
    keeps those that move the left-out exemplars' logits furthest toward their originals' (a warning says
    when even the best barely moves them). ``data`` (clean images, as for ``collect_key_stats``) gives
    those edits the key statistics the real edit will use; it is worth passing (see :func:`rank_layers`).
    ``progress`` shows a bar over the measured layers.
    """
    if k < 1:
        raise LayerNotFoundError(f"k must be at least 1, got {k}")
    candidates = get_adapter(model).candidates(model)
    if originals is None and transformed is None:
        return candidates[:k]
    if originals is None or transformed is None:
        raise LayerNotFoundError("measured recommendations need both originals and transformed exemplars")
    ranked = rank_layers(model, originals, transformed, masks, layers=candidates[:pool], data=data, progress=progress)
    return [layer for layer, _ in ranked[:k]]


def rank_layers(
    model: nn.Module,
    originals: torch.Tensor,
    transformed: torch.Tensor,
    masks: torch.Tensor | None = None,
    *,
    layers: Sequence[EditableLayer | str] | None = None,
    data: Any = None,
    stats: Mapping[str, KeyStats] | None = None,
    folds: int = 4,
    progress: bool = False,
) -> list[tuple[EditableLayer, float]]:
    """Edit each of ``layers`` on the exemplars and rank them by the logit distance they leave.

    Each layer gets the library's default edit (:func:`rewrite`: fast solver, L1), fitted on all
    exemplars but one and scored on the one left out, in turn for each of the last ``folds`` exemplars
    (cross-validation): the left-out exemplars' mean logit distance, with the edit, to their originals'
    logits without it, divided by the distance before (lower is better; with one exemplar it is fitted
    and scored on the same one). Returns ``(layer, ratio)`` best first, and logs a warning when even the
    best leaves more than 95% of the distance.

    Key statistics: with ``data`` (clean images: a tensor, dataset or loader, as for
    :func:`~surgery.collect_key_stats`; a few dozen do), every layer's from one pass over them, as the
    real edit will have; without, the second moment of the originals' own keys plus a ridge of 1% of
    its mean eigenvalue. Measured on the breadth benchmark's random-weight models in docs/method.md
    ("Where to edit"): an earlier quick proxy (L2 loss, 10 iterations, transformed keys in the
    moment, one left-out exemplar) ranked a ViT's layers backwards. ``stats`` (``{layer name: KeyStats}``,
    as ``collect_key_stats`` returns for several layers) gives statistics already collected instead of
    ``data``, for callers that rank several times on one model. ``progress`` shows a bar over the layers.

    This is a measurement on the user's model, not an attribution proxy: in the breadth benchmark
    the exemplars' logit ratio ranked layers like the held-out ratio better than the two scores
    computed before editing (gradient x activation at the value site, a masked value patch).
    """
    layers = [get_layer(model, l) for l in (layers if layers is not None else recommended_layers(model, k=12))]
    device = model_device(model)
    x, x2 = originals.to(device), transformed.to(device)  # images may be on the CPU, the model on a GPU
    if x.shape != x2.shape or x.ndim != 4:
        raise LayerNotFoundError("originals and transformed must be image batches (N, 3, H, W) of one shape")
    if stats is not None:
        if data is not None:
            raise SurgeryError("pass either data (clean images to collect key statistics from) or stats, not both")
        missing = [l.name for l in layers if l.name not in stats]
        if missing:
            raise LayerNotFoundError(
                f"stats has no key statistics for {missing}; collect them with "
                "surgery.collect_key_stats(model, layers, data) over every layer ranked"
            )
    n = x.shape[0]
    left_out = list(range(max(0, n - folds), n)) if n > 1 else [0]
    with torch.no_grad():
        target = model(x[left_out]).float()  # the unedited model's logits of the left-out originals
        before = float((model(x2[left_out]).float() - target).norm(dim=-1).sum())
    if data is not None:
        stats = collect_key_stats(model, [l.name for l in layers], data, progress=progress)
    ranked = []
    for layer in tqdm(layers, desc="rank layers", unit="layer", disable=not progress):
        if stats is not None:
            moment = stats[layer.name]
        else:  # the originals' own keys: clean images
            moment = ridged_moment(layer.capture(model, x).keys, layer.key_channel_dim)
        after = 0.0
        for f, i in enumerate(left_out):
            fit = [j for j in range(n) if j != i] or [i]
            edit = rewrite(model, layer, x[fit], x2[fit], None if masks is None else masks[fit], stats=moment)
            with torch.no_grad(), edited(model, edit):
                after += float((model(x2[i : i + 1]).float() - target[f : f + 1]).norm(dim=-1).sum())
        ranked.append((layer, after / max(before, 1e-30)))
    ranked.sort(key=lambda t: t[1])
    if ranked and ranked[0][1] > _BARELY:
        logger.warning(
            "no candidate layer of the %d measured moves the left-out exemplars' logits by more than %.0f%% "
            "toward their originals' (best: %s, %.3f of the distance left); more exemplars, or more candidates, "
            "may find one",
            len(ranked), 100 * (1 - _BARELY), ranked[0][0].name, ranked[0][1],
        )
    return ranked
