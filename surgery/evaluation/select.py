"""Choosing an edit's strength (or any hyperparameter) on the user's own validation data.

docs/method.md section 6, "Strength": the exact optimum of the rewrite objective is a larger edit than the paper's
early-stopped reference, so the strength is a hyperparameter, chosen the way the paper chooses its
learning rate, steps and layer: among candidate edits, the one that corrects the most errors on
validation images of the transformed concept while the clean-accuracy drop stays within a budget
(0.25 percentage points in the paper, Appendix A.6.3).

- :func:`select_strength`: labelled selection (% errors corrected on validation images, or any score).
- :func:`surgery.evaluation.concept_match.select_by_concept_match`: a label-free variant that picks the
  candidate whose edited activations on transformed images best match the concept's typical activations.
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

from surgery._guards import check_labels, require_eval
from surgery.edits.edit import Edit
from surgery.errors import SurgeryError
from surgery.evaluation.cached import CachedImages, Candidate
from surgery.evaluation.metrics import errors_corrected
from surgery.evaluation.unedited import refuse_edited_model

__all__ = [
    "CandidateResult",
    "NoCandidateError",
    "Selection",
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
        clean_acc_before / clean_acc_after: clean accuracy in percent (``after`` is NaN for a candidate whose
            clean accuracy was not measured: ``check_every_candidate=False``).
        clean_drop: ``clean_acc_before - clean_acc_after`` in percentage points (positive: worse; NaN
            when not measured).
        qualifies: ``clean_drop <= max_clean_drop`` (``None`` when not measured).
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
    qualifies: bool | None
    errors_before: int | None = None
    errors_after: int | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for k in ("score", "clean_acc_after", "clean_drop"):
            d[k] = None if math.isnan(d[k]) else d[k]
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
            mark = "**chosen**" if r.index == self.index else {True: "yes", False: "no", None: "not measured"}[r.qualifies]
            errs = "" if r.errors_before is None else f"{r.errors_before} -> {r.errors_after}"
            acc, drop = ("-", "-") if r.qualifies is None else (f"{r.clean_acc_after:.2f}", f"{r.clean_drop:+.2f}")
            lines.append(f"| {r.index} | {r.name} | {r.score:.2f} | {errs} | {acc} | {drop} | {mark} |")
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


def _rank(score: float) -> float:
    return -math.inf if math.isnan(score) else score  # nan scores rank last


def _measure_clean(
    table: list[CandidateResult],
    clean_logits: Callable[[int], torch.Tensor],
    clean_labels: torch.Tensor,
    max_clean_drop: float,
    every: bool,
) -> None:
    """Fill in the clean accuracy of the rows of ``table`` (their scores set): of every row, or (``every``
    False) of the best-scoring rows first, one group of equal scores at a time, until a group holds a row
    within the budget. :func:`_choose` then makes the same choice as with every row measured: a
    qualifying row of a higher score always wins over any row of a lower one."""
    order = sorted(table, key=lambda r: (-_rank(r.score), r.index))
    i = 0
    while i < len(order):
        group = [r for r in order[i:] if _rank(r.score) == _rank(order[i].score)]
        for r in group:
            r.clean_acc_after = _accuracy(clean_logits(r.index), clean_labels)
            r.clean_drop = r.clean_acc_before - r.clean_acc_after
            r.qualifies = r.clean_drop <= max_clean_drop + 1e-9
            logger.debug("select: %s score %.2f drop %.3f", r.name, r.score, r.clean_drop)
        i += len(group)
        if not every and any(r.qualifies for r in group):
            break


def _choose(table: list[CandidateResult], max_clean_drop: float) -> int:
    ok = [r for r in table if r.qualifies]
    if not ok:
        best = min(table, key=lambda r: r.clean_drop)  # every row was measured
        raise NoCandidateError(
            f"no candidate keeps the clean-accuracy drop within {max_clean_drop} pp; the smallest drop "
            f"was {best.clean_drop:.3f} pp ({best.name}). Add weaker candidates (smaller alpha, larger "
            "ridge, lower lr) or raise max_clean_drop",
            table,
        )
    # best score; ties -> smaller clean drop -> earlier candidate (nan scores rank last)
    def key(r: CandidateResult) -> tuple[float, float, int]:
        return (-_rank(r.score), r.clean_drop, r.index)

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
    check_every_candidate: bool = True,
) -> Selection:
    """The best candidate edit on validation data among those within a clean-accuracy budget.

    Every candidate is evaluated on the (transformed) validation images and on clean images. A
    candidate qualifies when its clean accuracy is at most ``max_clean_drop`` percentage points below
    the unedited model's; among those the one with the highest score wins (ties: the smaller clean
    drop, then the earlier candidate). The paper selects its hyperparameters this way with a 0.25%
    budget.

    Args:
        model: the unedited classifier, in eval mode (it is left exactly as it was); a model that already
            carries one of the candidates' edits is refused.
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
        check_every_candidate: measure every candidate's clean accuracy (default). ``False`` measures it
            only for the best-scoring candidates until one is within the budget: the same choice, for a
            fraction of the clean forwards (the clean set is usually far larger than the validation
            set); the other rows' clean numbers are NaN and their ``qualifies`` is ``None``.

    Returns:
        A :class:`Selection` (``.candidate``, ``.edit``, ``.alpha``, ``.table``).

    Raises:
        NoCandidateError: no candidate qualifies; the message gives the smallest drop seen.
        SurgeryError: bad inputs, or a model that already carries a candidate's edit.
    """
    require_eval(model, "select_strength")
    cands = _as_candidates(candidates)
    refuse_edited_model(model, [c.edit for c in cands], "select_strength", alphas=[c.alpha for c in cands])
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
    val0 = val.logits0
    acc0 = _accuracy(clean.logits0, y_clean)
    wrong0 = val0.argmax(1) != y
    table = []
    for i, c in enumerate(cands):
        val1 = val.logits(c, use_suffix=use_suffix)
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
                index=i, name=c.name, layer=c.edit.layer, alpha=c.alpha, score=s, clean_acc_before=acc0,
                clean_acc_after=math.nan, clean_drop=math.nan, qualifies=None, errors_before=e0, errors_after=e1,
            )
        )
    _measure_clean(
        table, lambda i: clean.logits(cands[i], use_suffix=use_suffix), y_clean, max_clean_drop, check_every_candidate
    )
    path = _path(clean, cands, use_suffix)
    idx = _choose(table, max_clean_drop)
    return Selection(index=idx, candidate=cands[idx], table=table, max_clean_drop=max_clean_drop, path=path)
