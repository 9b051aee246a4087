"""Choosing an edit's strength (or any hyperparameter) on the user's own validation data.

DESIGN.md "Strength": the exact optimum of the rewrite objective is a larger edit than the paper's
early-stopped reference, so the strength is a hyperparameter, chosen the way the paper chooses its
learning rate, steps and layer: among candidate edits, the one that corrects the most errors on
validation images of the transformed concept while the clean-accuracy drop stays within a budget
(0.25 percentage points in the paper, Appendix A.6.3).

- :func:`select_strength`: labelled selection (% errors corrected on validation images, or any score).
- :func:`select_by_concept_match`: a label-free variant that picks the candidate whose edited
  activations on transformed images best match the concept's typical activations.
- :func:`strength_grid`: one edit at several strengths ``alpha``.

Candidates are evaluated fast (:class:`CachedImages`): the keys (and block context) of the validation
and clean images are captured once per layer, and only the block and the rest of the network run per
candidate (:func:`surgery.suffix.network_suffix`), for every edit that changes only parameters after
the keys (rank-one rewrites, local and most global fine-tuning). Other candidates, and models
``torch.fx`` cannot split, fall back to full forward passes with the edit applied. Pass
:class:`CachedImages` instead of tensors to reuse this work across calls.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_images, check_labels, require_eval
from .apply import edited
from .edit import Edit
from .editable import EditableLayer
from .errors import SurgeryError, UnsupportedModelError
from .layers import get_layer
from .metrics import errors_corrected

__all__ = [
    "CachedImages",
    "Candidate",
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
class Candidate:
    """One candidate: an edit applied with strength ``alpha``, with a display name."""

    edit: Edit
    alpha: float = 1.0
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            hp = {k: v for k, v in self.edit.hparams.items() if k in ("solver", "ridge", "use_mask", "scope", "lr", "steps")}
            desc = ",".join(f"{k}={v}" for k, v in hp.items())
            self.name = f"{self.edit.method}[{self.edit.layer}{',' + desc if desc else ''}]@{self.alpha:g}"


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


def _single_layer(edit: Edit) -> bool:
    return set(edit.parameter_deltas()) == {edit.param}


@dataclass
class _LayerCache:
    """Keys and block context of a set of images at one layer, with the network after the block."""

    layer: EditableLayer
    suffix: Any  # NetworkSuffix
    keys: torch.Tensor
    context: dict[str, torch.Tensor]
    downstream: frozenset[str]  # parameters an edit may change and still be evaluated from these keys
    output: torch.Tensor | None = None  # the layer's own output with its current weight, when computed


class CachedImages:
    """Images evaluated under many candidate edits, with what does not change computed once.

    Holds the unedited model's logits of ``images`` and, per edited layer (on first use), their keys and
    block context (on CPU) and the network after the block (:func:`surgery.suffix.network_suffix`).
    A candidate edit is then evaluated by running only its block and the rest of the network, when
    every parameter it changes comes after the keys: a rank-one rewrite of the layer, local
    fine-tuning, and global fine-tuning unless it changes a module the block's context comes from
    (e.g. a ResNet shortcut's downsample). Other edits, and models ``torch.fx`` cannot split, are
    evaluated with full forward passes (same numbers, slower).

    Pass instances to :func:`select_strength` / :func:`select_by_concept_match` instead of image
    tensors to reuse the work across calls; :meth:`subset` shares it with a subset of the images.
    The model's weights must not change while an instance is in use (edits are applied only
    temporarily, inside :meth:`logits`).

    Args:
        model: the classifier, in eval mode.
        images: ``(N, 3, H, W)`` images preprocessed for the model.
        batch_size: images per forward.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, *, batch_size: int = 128, name: str = "images") -> None:
        require_eval(model, "CachedImages")
        self.model = model
        self.images = check_images(images, name)
        self.batch_size = batch_size
        self._parent: CachedImages | None = None
        self._index: torch.Tensor | None = None
        self._logits0: torch.Tensor | None = None
        self._layers: dict[str, _LayerCache | None] = {}
        self._delta_out: tuple[Edit, torch.Tensor] | None = None  # the last edit's layer-output change
        self.device = next(model.parameters()).device

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: Sequence[int] | torch.Tensor) -> CachedImages:
        """The images at ``index``, sharing this instance's cached logits, keys and context."""
        idx = torch.as_tensor(index, dtype=torch.long).flatten()
        if idx.numel() and (idx.min() < 0 or idx.max() >= len(self)):
            raise SurgeryError(f"subset index out of range for {len(self)} images")
        sub = CachedImages.__new__(CachedImages)
        sub.model, sub.batch_size, sub.device = self.model, self.batch_size, self.device
        sub.images = self.images[idx]
        sub._parent, sub._index = self, idx
        sub._logits0, sub._layers, sub._delta_out = None, {}, None
        return sub

    def _full(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        with torch.no_grad():
            for i in range(0, x.shape[0], self.batch_size):
                outs.append(self.model(x[i : i + self.batch_size].to(self.device)).float().cpu())
        return torch.cat(outs) if outs else torch.empty(0)

    @property
    def logits0(self) -> torch.Tensor:
        """Logits of the unedited model."""
        if self._logits0 is None:
            if self._parent is not None:
                self._logits0 = self._parent.logits0[self._index]
            else:
                self._logits0 = self._full(self.images)
        return self._logits0

    def layer_cache(self, layer_name: str) -> _LayerCache | None:
        """Keys, context and suffix at ``layer_name``; ``None`` when the network cannot be split there."""
        if layer_name not in self._layers:
            if self._parent is not None:
                parent = self._parent.layer_cache(layer_name)
                entry = None if parent is None else _LayerCache(
                    parent.layer, parent.suffix, parent.keys[self._index],
                    {k: v[self._index] for k, v in parent.context.items()}, parent.downstream,
                )
            else:
                entry = self._capture(layer_name)
            self._layers[layer_name] = entry
        return self._layers[layer_name]

    def _capture(self, layer_name: str) -> _LayerCache | None:
        from .finetune import parameters_after_keys
        from .suffix import network_suffix

        layer = get_layer(self.model, layer_name)
        try:
            suffix = network_suffix(self.model, layer)
        except UnsupportedModelError as e:
            logger.info("CachedImages: full forward passes for %s (%s)", layer_name, e)
            return None
        with torch.no_grad():
            keys, context = layer.capture_keys(
                self.model, self.images, batch_size=self.batch_size, device=self.device, store="cpu"
            )
        downstream = parameters_after_keys(self.model, layer, self.images[:1].to(self.device))
        return _LayerCache(layer, suffix, keys, context, downstream)

    def _batches(self, entry: _LayerCache) -> Iterator[tuple[slice, torch.Tensor, dict[str, torch.Tensor]]]:
        """``(slice, keys, context)`` of each batch of the cached keys, on the model's device."""
        for i in range(0, len(self), self.batch_size):
            sl = slice(i, i + self.batch_size)
            yield sl, entry.keys[sl].to(self.device), {k: v[sl].to(self.device) for k, v in entry.context.items()}

    def _suffix_logits(self, entry: _LayerCache, weight: torch.Tensor) -> torch.Tensor:
        from .suffix import suffix_logits

        with torch.no_grad():
            return torch.cat([
                suffix_logits(entry.suffix, entry.layer, keys, weight, ctx).float().cpu()
                for _, keys, ctx in self._batches(entry)
            ])

    def _layer_output(self, entry: _LayerCache) -> torch.Tensor:
        """The edited conv/linear's own output with its current weight (cached)."""
        if entry.output is None:
            if self._parent is not None:
                parent = self._parent.layer_cache(entry.layer.name)
                assert parent is not None
                entry.output = self._parent._layer_output(parent)[self._index]
            else:
                with torch.no_grad():
                    entry.output = torch.cat([
                        entry.layer.layer_forward(keys, entry.layer.weight).cpu() for _, keys, _ in self._batches(entry)
                    ])
        return entry.output

    def _strength_logits(self, entry: _LayerCache, edit: Edit, alpha: float) -> torch.Tensor:
        """Logits of a single-layer edit at strength ``alpha`` from the layer output's linearity in the weight.

        ``conv(k, W + a D) = conv(k, W) + a (conv(k, D) - bias)``: the edited layer runs once per edit,
        not once per strength; only the rest of the block and the suffix run per strength.
        """
        base = self._layer_output(entry)
        if self._delta_out is None or self._delta_out[0] is not edit:
            d = edit.delta().to(device=self.device, dtype=entry.layer.weight.dtype)
            bias = entry.layer.module.bias
            parts = []
            with torch.no_grad():
                for _, keys, _ in self._batches(entry):
                    out = entry.layer.layer_forward(keys, d)
                    if bias is not None:  # conv: (N, C, H, W) with bias (C,); linear: bias on the last axis
                        out = out - (bias[:, None, None] if isinstance(entry.layer.module, nn.Conv2d) else bias)
                    parts.append(out.cpu())
            self._delta_out = (edit, torch.cat(parts))
        delta_out = self._delta_out[1]
        post = entry.layer.post
        outs = []
        with torch.no_grad():
            for sl, _, ctx in self._batches(entry):
                out = (base[sl] + alpha * delta_out[sl]).to(self.device)
                outs.append(entry.suffix(out if post is None else post(out, ctx)).float().cpu())
        return torch.cat(outs)

    def path(self, candidate: Candidate, *, use_suffix: bool = True) -> str:
        """``"suffix"`` when ``candidate`` is evaluated from the cached keys, else ``"full"``."""
        edit = candidate.edit
        entry = self.layer_cache(edit.layer) if use_suffix else None
        if entry is None:
            return "full"
        if _single_layer(edit) or set(edit.parameter_deltas()) <= entry.downstream:
            return "suffix"
        return "full"

    def logits(self, candidate: Candidate | None = None, *, use_suffix: bool = True) -> torch.Tensor:
        """Logits with ``candidate`` applied (``None``: the unedited model's, cached)."""
        if candidate is None:
            return self.logits0
        edit = candidate.edit
        if self.path(candidate, use_suffix=use_suffix) == "suffix":
            entry = self.layer_cache(edit.layer)
            assert entry is not None
            if _single_layer(edit):
                if type(entry.layer.module) in (nn.Conv2d, nn.Linear):  # linear in the weight
                    return self._strength_logits(entry, edit, candidate.alpha)
                return self._suffix_logits(entry, edit.new_weight(entry.layer.weight, candidate.alpha))
            with edited(self.model, edit, alpha=candidate.alpha):
                return self._suffix_logits(entry, entry.layer.weight)
        with edited(self.model, edit, alpha=candidate.alpha):
            return self._full(self.images)

    def values(self, candidate: Candidate) -> torch.Tensor:
        """The edited layer's block output under ``candidate`` (needs a single-layer edit)."""
        if not _single_layer(candidate.edit):
            raise SurgeryError(f"{candidate.name} changes more than one parameter; it has no single edited layer")
        layer = get_layer(self.model, candidate.edit.layer)
        w = candidate.edit.new_weight(layer.weight, candidate.alpha)
        entry = self.layer_cache(candidate.edit.layer)
        with torch.no_grad():
            if entry is None:  # the network cannot be split there: keys and context for this call only
                keys, context = layer.capture_keys(
                    self.model, self.images, batch_size=self.batch_size, device=self.device, store="cpu"
                )
                entry = _LayerCache(layer, None, keys, context, frozenset())
            return torch.cat([layer.block_forward(k, w, c).float().cpu() for _, k, c in self._batches(entry)])


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


def _masked_mean(values: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean channel vector over the positions of ``masks`` (downsampled to ``values``' resolution)."""
    m = masks.float()
    if m.dim() == 3:
        m = m[:, None]
    w = F.adaptive_avg_pool2d(m, values.shape[-2:])[:, 0]  # (N, h, w) fraction of concept pixels
    tot = w.sum()
    if tot <= 0:
        raise SurgeryError("the masks are empty at the layer's resolution; nothing to match")
    return torch.einsum("nchw,nhw->c", values.double(), w.double()) / tot


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
    targets: dict[str, torch.Tensor] = {}
    table = []
    for i, c in enumerate(cands):
        if c.edit.layer not in targets:
            layer = get_layer(model, c.edit.layer)
            vals = []
            with torch.no_grad():
                for j in range(0, concept_images.shape[0], batch_size):
                    vals.append(layer.capture(model, concept_images[j : j + batch_size].to(x.device)).values.float().cpu())
            targets[c.edit.layer] = _masked_mean(torch.cat(vals), concept_masks)
        t = targets[c.edit.layer]
        d = float((_masked_mean(x.values(c), masks) - t).norm() / t.norm().clamp_min(1e-12))
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
