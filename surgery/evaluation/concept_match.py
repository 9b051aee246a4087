"""Label-free choice of an edit's strength: the candidate whose edited activations on transformed images
best match the concept's typical activations on clean images (docs/method.md section 6)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from surgery._guards import check_labels, require_eval
from surgery.edits.edit import Edit
from surgery.errors import SurgeryError
from surgery.evaluation.cached import CachedImages, Candidate
from surgery.evaluation.select import (
    CandidateResult,
    Selection,
    _accuracy,
    _as_candidates,
    _cached,
    _choose,
    _measure_clean,
    _path,
)
from surgery.inputs.images import check_images
from surgery.layers import get_layer
from surgery.layout import Layout

__all__ = ["select_by_concept_match"]


def _masked_mean(values: torch.Tensor, masks: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Mean channel vector over the positions of ``masks`` (area-pooled onto ``values`` through the
    layer's value ``layout``: maps or tokens; class/register tokens weigh nothing)."""
    m = masks.float()[:, None] if masks.dim() == 3 else masks.float()
    w, _ = layout.pool_mask(m, values)  # values' rank, size 1 on the channel axis: fraction of concept pixels
    tot = w.sum()
    if tot <= 0:
        raise SurgeryError("the masks are empty at the layer's resolution; nothing to match")
    axis = layout.resolve(values).channel_axis % values.ndim
    v = values.double().movedim(axis, -1)
    return (v * w.movedim(axis, -1)).reshape(-1, v.shape[-1]).sum(0) / tot


def select_by_concept_match(
    model: nn.Module,
    candidates: Sequence[Candidate | Edit | tuple[Edit, float]],
    images: torch.Tensor | CachedImages,
    masks: torch.Tensor,
    concept_images: torch.Tensor,
    concept_masks: torch.Tensor,
    *,
    clean_images: torch.Tensor | CachedImages,
    clean_labels: int | Sequence[int] | torch.Tensor | None = None,
    max_clean_drop: float = 0.25,
    batch_size: int = 128,
    check_every_candidate: bool = True,
) -> Selection:
    """Choose a strength without labels of the transformed images, by matching concept activations.

    What is matched, exactly: at the value site of the edited layer (the end of its block), let
    ``m(S)`` be the mean channel vector over the concept's positions in image set ``S``, each position
    weighted by the fraction of its cell covered by the concept mask (the mask average-pooled to the
    value resolution). The target is ``t = m(concept_images)``: clean images showing the original
    concept, with the unedited weights (the concept's typical activation). For each candidate,
    ``d = ||m_edit(images) - t|| / ||t||`` where ``m_edit`` uses the edited weight on the transformed
    ``images`` (e.g. the exemplars, or unlabelled validation images, with their concept masks). The
    candidate with the smallest ``d`` among those within the clean-accuracy budget wins; its
    ``score`` is ``-d``. Candidates must edit one layer's weight (e.g. :func:`strength_grid`).

    The clean budget needs clean labels; with ``clean_labels=None`` the unedited model's predictions
    stand in for them (agreement with the unedited model), which makes the whole selection label-free.
    ``check_every_candidate`` is :func:`~surgery.evaluation.select.select_strength`'s.
    """
    require_eval(model, "select_by_concept_match")
    cands = _as_candidates(candidates)
    x = _cached(model, images, "images", batch_size)
    concept_images = check_images(concept_images, "concept_images")
    clean = _cached(model, clean_images, "clean_images", batch_size)
    clean0 = clean.logits0
    y_clean = (
        clean0.argmax(1)
        if clean_labels is None
        else check_labels(clean_labels, len(clean), "clean_labels").cpu()
    )
    acc0 = _accuracy(clean0, y_clean)
    targets: dict[str, tuple[torch.Tensor, Layout]] = {}  # per layer: the concept's mean, the value layout
    table = []
    for i, c in enumerate(cands):
        site = c.edit.layers[-1]  # a span edit's value is read at its last layer
        if site not in targets:
            layer = get_layer(model, site)
            vals = []
            with torch.no_grad():
                for j in range(0, concept_images.shape[0], batch_size):
                    vals.append(layer.capture(model, concept_images[j : j + batch_size].to(x.device)).values.float().cpu())
            targets[site] = (_masked_mean(torch.cat(vals), concept_masks, layer.value_layout), layer.value_layout)
        t, layout = targets[site]
        d = float((_masked_mean(x.values(c), masks, layout) - t).norm() / t.norm().clamp_min(1e-12))
        table.append(
            CandidateResult(
                index=i, name=c.name, layer=c.edit.layer, alpha=c.alpha, score=-d, clean_acc_before=acc0,
                clean_acc_after=math.nan, clean_drop=math.nan, qualifies=None, extra={"distance": d},
            )
        )
    _measure_clean(table, lambda i: clean.logits(cands[i]), y_clean, max_clean_drop, check_every_candidate)
    idx = _choose(table, max_clean_drop)
    return Selection(index=idx, candidate=cands[idx], table=table, max_clean_drop=max_clean_drop, path=_path(clean, cands))
