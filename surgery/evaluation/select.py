"""Choosing an edit's strength (or any hyperparameter) on the user's own validation data.

docs/method.md section 6, "Strength": the exact optimum of the rewrite objective is a larger edit than the paper's
early-stopped reference, so the strength is a hyperparameter, chosen the way the paper chooses its
learning rate, steps and layer: among candidate edits, the one that corrects the most errors on
validation images of the transformed concept while the clean-accuracy drop stays within a budget
(0.25 percentage points in the paper, Appendix A.6.3).

- :func:`select_strength`: labelled selection (% errors corrected on validation images, or any score).
- :func:`select_by_concept_match`: a label-free variant that picks the candidate whose edited
  activations on transformed images best match the concept's typical activations.
- :func:`strength_grid`: one edit at several strengths ``alpha``.

Candidates are evaluated fast by :class:`surgery.evaluation.cached.CachedImages` (keys captured once
per layer, only the block and the rest of the network per candidate); pass ``CachedImages`` instead
of tensors to reuse that work across calls.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from surgery._checks import check_images, check_labels, require_eval
from surgery.edits.edit import Edit
from surgery.errors import SurgeryError
from surgery.evaluation.cached import CachedImages, Candidate
from surgery.evaluation.metrics import errors_corrected
from surgery.layers import get_layer
from surgery.layout import Layout

__all__ = [
    "CandidateResult",
    "NoCandidateError",
    "Selection",
    "select_by_concept_match",
    "select_strength",
    "strength_grid",
]

logger = logging.getLogger(__name__)

Score = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], float]


class NoCandidateError(SurgeryError):
    """No candidate edit keeps the clean-accuracy drop within the budget."""

    def __init__(self, message: str, table: list[CandidateResult]) -> None:
        super().__init__(message)
        self.table = table


@dataclass
class CandidateResult:
    """One row of a :class:`Selection` table.

    Attributes:
        index: position in the candidate list.
        name: the candidate's name.
        layer: edited layer.
        alpha: strength.
        score: the validation score (% errors corrected by default; for
            :func:`select_by_concept_match`, minus the activation distance).
        errors_before / errors_after: validation errors counted by the default score (``None`` with a
            custom score).
        clean_acc_before / clean_acc_after: clean accuracy in percent.
        clean_drop: ``clean_acc_before - clean_acc_after`` in percentage points (positive: worse).
        qualifies: ``clean_drop <= max_clean_drop``.
        extra: other numbers (e.g. the activation distance).
    """

    index: int
    name: str
    layer: str
    alpha: float
    score: float
    clean_acc_before: float
    clean_acc_after: float
    clean_drop: float
    qualifies: bool
    errors_before: int | None = None
    errors_after: int | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["score"] = None if math.isnan(self.score) else self.score
        return d


@dataclass
class Selection:
    """What a selection chose, and every candidate's numbers.

    Attributes:
        index: position of the chosen candidate.
        candidate: the chosen :class:`Candidate` (apply it with ``apply_edit(model, c.edit, alpha=c.alpha)``).
        table: one :class:`CandidateResult` per candidate, in the order given.
        max_clean_drop: the budget, in percentage points.
        path: ``"suffix"`` when every candidate was evaluated from cached keys, ``"full"`` when some
            needed full forward passes, ``"mixed"`` for both.
    """

    index: int
    candidate: Candidate
    table: list[CandidateResult]
    max_clean_drop: float
    path: str

    @property
    def edit(self) -> Edit:
        return self.candidate.edit

    @property
    def alpha(self) -> float:
        return self.candidate.alpha

    @property
    def result(self) -> CandidateResult:
        return self.table[self.index]

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.candidate.name,
            "max_clean_drop": self.max_clean_drop,
            "path": self.path,
            "table": [r.to_dict() for r in self.table],
        }

    def to_markdown(self) -> str:
        lines = [
            "| # | candidate | score | val errors | clean acc | drop (pp) | within budget |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.table:
            mark = "**chosen**" if r.index == self.index else ("yes" if r.qualifies else "no")
            errs = "" if r.errors_before is None else f"{r.errors_before} -> {r.errors_after}"
            lines.append(
                f"| {r.index} | {r.name} | {r.score:.2f} | {errs} | {r.clean_acc_after:.2f} | "
                f"{r.clean_drop:+.2f} | {mark} |"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"chose {self.candidate.name} (budget {self.max_clean_drop} pp)\n" + self.to_markdown()


def strength_grid(
    edit: Edit,
    alphas: Sequence[float] | None = None,
    *,
    n: int = 6,
    lo: float = 1 / 32,
    hi: float = 1.0,
) -> list[Candidate]:
    """One edit at several strengths: ``alphas``, or ``n`` values spaced geometrically from ``lo`` to ``hi``.

    For a factored rank-one edit, ``alpha`` scales ``lam``; for a dense edit, the whole delta.
    Candidates are ordered from weakest to strongest.
    """
    if alphas is None:
        if n < 1 or lo <= 0 or hi < lo:
            raise SurgeryError(f"need n >= 1 and 0 < lo <= hi; got n={n}, lo={lo}, hi={hi}")
        alphas = [hi] if n == 1 else [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]
    return [Candidate(edit, float(a)) for a in sorted(alphas)]


def _as_candidates(candidates: Sequence[Any]) -> list[Candidate]:
    out = []
    for c in candidates:
        if isinstance(c, Candidate):
            out.append(c)
        elif isinstance(c, Edit):
            out.append(Candidate(c))
        elif isinstance(c, tuple) and len(c) == 2 and isinstance(c[0], Edit):
            out.append(Candidate(c[0], float(c[1])))
        else:
            raise SurgeryError(
                f"a candidate must be an Edit, an (Edit, alpha) pair or a Candidate; got {type(c).__name__}"
            )
    if not out:
        raise SurgeryError("no candidates to select from")
    return out


def _cached(model: nn.Module, images: torch.Tensor | CachedImages, name: str, batch_size: int) -> CachedImages:
    if isinstance(images, CachedImages):
        if images.model is not model:
            raise SurgeryError(f"{name} was cached for another model; build CachedImages(model, images) for this one")
        return images
    return CachedImages(model, images, batch_size=batch_size, name=name)


def _path(images: CachedImages, cands: Sequence[Candidate], use_suffix: bool = True) -> str:
    paths = {images.path(c, use_suffix=use_suffix) for c in cands}
    return "mixed" if len(paths) > 1 else paths.pop()


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == labels).double().mean().item()


def _choose(table: list[CandidateResult], max_clean_drop: float) -> int:
    ok = [r for r in table if r.qualifies]
    if not ok:
        best = min(table, key=lambda r: r.clean_drop)
        raise NoCandidateError(
            f"no candidate keeps the clean-accuracy drop within {max_clean_drop} pp; the smallest drop "
            f"was {best.clean_drop:.3f} pp ({best.name}). Add weaker candidates (smaller alpha, larger "
            "ridge, lower lr) or raise max_clean_drop",
            table,
        )
    # best score; ties -> smaller clean drop -> earlier candidate (nan scores rank last)
    def key(r: CandidateResult) -> tuple[float, float, int]:
        s = -math.inf if math.isnan(r.score) else r.score
        return (-s, r.clean_drop, r.index)

    return min(ok, key=key).index


def select_strength(
    model: nn.Module,
    candidates: Sequence[Candidate | Edit | tuple[Edit, float]],
    val_images: torch.Tensor | CachedImages,
    val_labels: int | Sequence[int] | torch.Tensor,
    *,
    clean_images: torch.Tensor | CachedImages,
    clean_labels: int | Sequence[int] | torch.Tensor,
    max_clean_drop: float = 0.25,
    score: str | Score = "errors_corrected",
    val_originals: torch.Tensor | CachedImages | None = None,
    batch_size: int = 128,
    use_suffix: bool = True,
) -> Selection:
    """The best candidate edit on validation data among those within a clean-accuracy budget.

    Every candidate is evaluated on the (transformed) validation images and on clean images. A
    candidate qualifies when its clean accuracy is at most ``max_clean_drop`` percentage points below
    the unedited model's; among those the one with the highest score wins (ties: the smaller clean
    drop, then the earlier candidate). The paper selects its hyperparameters this way with a 0.25%
    budget.

    Args:
        model: the unedited classifier, in eval mode (it is left exactly as it was).
        candidates: :class:`Candidate` objects, :class:`~surgery.Edit` s (alpha 1), or ``(edit, alpha)``
            pairs; e.g. :func:`strength_grid`, or one rewrite per ridge or layer, or fine-tuning edits
            at several learning rates.
        val_images: transformed validation images ``(N, 3, H, W)``, preprocessed for the model, or a
            :class:`CachedImages` of them (reuses cached keys and logits across calls).
        val_labels: their true labels, or one int for all.
        clean_images: clean images for the accuracy budget (or a :class:`CachedImages`);
            clean_labels: their labels.
        max_clean_drop: the budget in percentage points (0.25 = a quarter of a point).
        score: ``"errors_corrected"`` (% errors corrected, :func:`surgery.errors_corrected`; counted only
            on images whose original was classified correctly when ``val_originals`` is given),
            ``"accuracy"`` (validation accuracy after the edit), or a callable
            ``score(logits_before, logits_after, labels) -> float`` (higher is better).
        val_originals: untransformed versions of ``val_images``, to restrict the count as the paper does.
        batch_size: images per forward.
        use_suffix: evaluate single-layer candidates from cached keys (default); ``False`` forces full
            forward passes (same numbers, slower).

    Returns:
        A :class:`Selection` (``.candidate``, ``.edit``, ``.alpha``, ``.table``).

    Raises:
        NoCandidateError: no candidate qualifies; the message gives the smallest drop seen.
        SurgeryError: bad inputs.
    """
    require_eval(model, "select_strength")
    cands = _as_candidates(candidates)
    val = _cached(model, val_images, "val_images", batch_size)
    y = check_labels(val_labels, len(val), "val_labels").cpu()
    clean = _cached(model, clean_images, "clean_images", batch_size)
    y_clean = check_labels(clean_labels, len(clean), "clean_labels").cpu()
    if max_clean_drop < 0:
        raise SurgeryError(f"max_clean_drop must be >= 0 percentage points; got {max_clean_drop}")
    if isinstance(score, str) and score not in ("errors_corrected", "accuracy"):
        raise SurgeryError(f"score must be 'errors_corrected', 'accuracy' or a callable; got {score!r}")
    keep = torch.ones(len(y), dtype=torch.bool)
    if val_originals is not None:
        originals = _cached(model, val_originals, "val_originals", batch_size)
        if len(originals) != len(y):
            raise SurgeryError("val_originals must pair up with val_images")
        keep = originals.logits0.argmax(1) == y
    val0, clean0 = val.logits0, clean.logits0
    acc0 = _accuracy(clean0, y_clean)
    wrong0 = val0.argmax(1) != y
    table = []
    for i, c in enumerate(cands):
        val1, clean1 = val.logits(c, use_suffix=use_suffix), clean.logits(c, use_suffix=use_suffix)
        acc1 = _accuracy(clean1, y_clean)
        drop = acc0 - acc1
        e0 = e1 = None
        if callable(score):
            s = float(score(val0, val1, y))
        elif score == "accuracy":
            s = _accuracy(val1, y)
        else:
            wrong1 = val1.argmax(1) != y
            e0, e1 = int(wrong0[keep].sum()), int(wrong1[keep].sum())
            s = errors_corrected(e0, e1)
        table.append(
            CandidateResult(
                index=i, name=c.name, layer=c.edit.layer, alpha=c.alpha, score=s,
                clean_acc_before=acc0, clean_acc_after=acc1, clean_drop=drop,
                qualifies=drop <= max_clean_drop + 1e-9, errors_before=e0, errors_after=e1,
            )
        )
        logger.debug("select: %s score %.2f drop %.3f", c.name, s, drop)
    path = _path(clean, cands, use_suffix)
    idx = _choose(table, max_clean_drop)
    return Selection(index=idx, candidate=cands[idx], table=table, max_clean_drop=max_clean_drop, path=path)


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
        if c.edit.layer not in targets:
            layer = get_layer(model, c.edit.layer)
            vals = []
            with torch.no_grad():
                for j in range(0, concept_images.shape[0], batch_size):
                    vals.append(layer.capture(model, concept_images[j : j + batch_size].to(x.device)).values.float().cpu())
            targets[c.edit.layer] = (_masked_mean(torch.cat(vals), concept_masks, layer.value_layout), layer.value_layout)
        t, layout = targets[c.edit.layer]
        d = float((_masked_mean(x.values(c), masks, layout) - t).norm() / t.norm().clamp_min(1e-12))
        acc1 = _accuracy(clean.logits(c), y_clean)
        drop = acc0 - acc1
        table.append(
            CandidateResult(
                index=i, name=c.name, layer=c.edit.layer, alpha=c.alpha, score=-d,
                clean_acc_before=acc0, clean_acc_after=acc1, clean_drop=drop,
                qualifies=drop <= max_clean_drop + 1e-9, extra={"distance": d},
            )
        )
    idx = _choose(table, max_clean_drop)
    return Selection(index=idx, candidate=cands[idx], table=table, max_clean_drop=max_clean_drop, path=_path(clean, cands))
