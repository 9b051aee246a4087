"""Measuring an edit: % errors corrected on transformed images, and the clean accuracy it costs.

docs/method.md section 8: ``% errors corrected = 100 * (E_pre - E_post) / E_pre``, floored at -100, over
transformed test images, split into groups (target class vs other classes, exemplar style vs held-out
styles), plus the change in clean test accuracy. Like the paper's reference code, the groups can be
restricted to images whose untransformed original the model classified correctly before the edit;
the report says whether they were.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from surgery._guards import (
    check_label_range,
    check_labels,
    check_logits,
    require_eval,
    resolve_device,
)
from surgery.edits.apply import edited
from surgery.edits.edit import Edit
from surgery.errors import SurgeryError
from surgery.evaluation.unedited import refuse_edited_model
from surgery.inputs.images import check_images

__all__ = ["errors_corrected", "predict", "evaluate_edit", "EditReport", "GroupResult"]

logger = logging.getLogger(__name__)


def errors_corrected(errors_before: int | float, errors_after: int | float) -> float:
    """Percentage of errors an edit corrects: ``100 * (E_pre - E_post) / E_pre``, floored at -100.

    Returns ``nan`` when ``E_pre == 0``: with no errors to correct the ratio is undefined (an edit
    that then introduces errors shows up in ``E_post``, not in this number).

    Raises:
        SurgeryError: when a count is negative or not finite.
    """
    for what, v in (("errors_before", errors_before), ("errors_after", errors_after)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise SurgeryError(f"{what} must be a non-negative finite number; got {v!r}")
    if errors_before == 0:
        return float("nan")
    return max(-100.0, 100.0 * (errors_before - errors_after) / errors_before)


def predict(
    model: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Predicted labels (argmax of the logits), an int64 tensor ``(N,)`` on CPU.

    Runs without gradients in batches of ``batch_size``. The model must be in eval mode (so the pass
    leaves it unchanged) and already on ``device`` (default: the model's device). ``preprocess`` maps
    each batch of ``images`` (e.g. uint8 pixels) to the model's input; without it ``images`` are the
    model's input.
    """
    return _predict(model, images, batch_size=batch_size, device=device, preprocess=preprocess)[0]


def _predict(
    model: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device | str | None,
    what: str = "images",
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, int]:
    """Predicted labels and the number of classes the model scores."""
    require_eval(model, "predict")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise SurgeryError(f"batch_size must be a positive int; got {batch_size!r}")
    images = check_images(images, what, pixels=preprocess is not None)
    dev = resolve_device(model, device)
    out = []
    num_classes = 0
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            batch = images[i : i + batch_size]
            if preprocess is not None:
                batch = preprocess(batch)
            logits = check_logits(model(batch.to(dev)))
            num_classes = logits.shape[1]
            out.append(logits.argmax(dim=1).cpu())
    return torch.cat(out), num_classes


@dataclass(frozen=True)
class GroupResult:
    """One row of an :class:`EditReport`.

    Attributes:
        name: group name.
        n: images counted (after the restriction, when there is one).
        n_total: images in the group before the restriction.
        errors_before: misclassified counted images before the edit.
        errors_after: misclassified counted images with the edit applied.
        pct_corrected: :func:`errors_corrected` of the two counts (``nan`` when ``errors_before == 0``).
    """

    name: str
    n: int
    n_total: int
    errors_before: int
    errors_after: int
    pct_corrected: float


def _json_float(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


@dataclass
class EditReport:
    """What :func:`evaluate_edit` measured.

    Attributes:
        rows: one :class:`GroupResult` per group, in the order the groups were given.
        restricted: whether groups count only images whose original was correct before the edit.
        preds_before: predictions on the transformed images before the edit, ``(N,)``.
        preds_after: predictions on the transformed images with the edit applied, ``(N,)``.
        clean_acc_before: clean accuracy in percent before the edit, ``None`` without clean data.
        clean_acc_after: clean accuracy in percent with the edit, ``None`` without clean data.
        layer: the edited layer.
        method: the edit's method.
        alpha: the strength the edit was applied with.
        n_clean: number of clean images.
    """

    rows: list[GroupResult]
    restricted: bool
    preds_before: torch.Tensor = field(repr=False)
    preds_after: torch.Tensor = field(repr=False)
    clean_acc_before: float | None = None
    clean_acc_after: float | None = None
    layer: str = ""
    method: str = ""
    alpha: float = 1.0
    n_clean: int = 0

    @property
    def clean_acc_change(self) -> float | None:
        """Change of clean accuracy in percentage points (negative: the edit costs accuracy)."""
        if self.clean_acc_before is None or self.clean_acc_after is None:
            return None
        return self.clean_acc_after - self.clean_acc_before

    def group(self, name: str) -> GroupResult:
        """The row of group ``name``."""
        for row in self.rows:
            if row.name == name:
                return row
        names = ", ".join(r.name for r in self.rows)
        raise SurgeryError(f"no group {name!r} in this report; groups: {names}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (``nan`` becomes ``None``, tensors become lists)."""
        return {
            "layer": self.layer,
            "method": self.method,
            "alpha": float(self.alpha),
            "restricted_to_correct_originals": self.restricted,
            "groups": [
                {
                    "name": r.name,
                    "n": r.n,
                    "n_total": r.n_total,
                    "errors_before": r.errors_before,
                    "errors_after": r.errors_after,
                    "pct_corrected": _json_float(r.pct_corrected),
                }
                for r in self.rows
            ],
            "clean": {
                "n": self.n_clean,
                "acc_before": _json_float(self.clean_acc_before),
                "acc_after": _json_float(self.clean_acc_after),
                "acc_change_pp": _json_float(self.clean_acc_change),
            },
            "preds_before": self.preds_before.tolist(),
            "preds_after": self.preds_after.tolist(),
        }

    def __str__(self) -> str:
        head = (
            f"edit of {self.layer or '<model>'} ({self.method}, alpha {self.alpha:g}): "
            "errors on transformed images"
        )
        if self.restricted:
            scope = (
                "counting only images whose untransformed original was classified correctly "
                "before the edit"
            )
        else:
            scope = "counting all images (not restricted to correctly classified originals)"
        width = max([5, *(len(r.name) for r in self.rows)])
        header = f"{'group':<{width}}  {'n':>6}  {'before':>6}  {'after':>6}  {'% corrected':>11}"
        lines = [head, scope, header]
        for r in self.rows:
            pct = "n/a" if math.isnan(r.pct_corrected) else f"{r.pct_corrected:.1f}"
            n = f"{r.n}" if r.n == r.n_total else f"{r.n}/{r.n_total}"
            lines.append(
                f"{r.name:<{width}}  {n:>6}  {r.errors_before:>6}  {r.errors_after:>6}  {pct:>11}"
            )
        if self.clean_acc_before is not None and self.clean_acc_after is not None:
            lines.append(
                f"clean accuracy ({self.n_clean} images): {self.clean_acc_before:.2f}% -> "
                f"{self.clean_acc_after:.2f}% ({self.clean_acc_change:+.2f} pp)"
            )
        return "\n".join(lines)


def _check_groups(groups: Mapping[str, Any] | None, n: int) -> dict[str, torch.Tensor]:
    if groups is None:
        return {"all": torch.ones(n, dtype=torch.bool)}
    if not groups:
        raise SurgeryError("groups is empty; pass None for one group of all images")
    out = {}
    for name, mask in groups.items():
        m = torch.as_tensor(mask).cpu()
        if m.dtype != torch.bool:
            raise SurgeryError(
                f"group {name!r} must be a boolean mask over the images; got dtype {m.dtype}"
            )
        if m.shape != (n,):
            raise SurgeryError(
                f"group {name!r} has shape {tuple(m.shape)}; it must be a mask of shape ({n},)"
            )
        out[str(name)] = m
    return out


def evaluate_edit(
    model: nn.Module,
    edit: Edit,
    images: torch.Tensor,
    labels: int | Sequence[int] | torch.Tensor,
    *,
    groups: Mapping[str, Any] | None = None,
    originals: torch.Tensor | None = None,
    clean_images: torch.Tensor | None = None,
    clean_labels: int | Sequence[int] | torch.Tensor | None = None,
    alpha: float = 1.0,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> EditReport:
    """Errors on transformed images before and after an edit, per group, and the clean accuracy change.

    The edit is applied with :func:`surgery.edits.apply.edited` only while predicting, so the model ends
    with exactly the bytes it started with. The model must be in eval mode.

    Args:
        model: the unedited classifier, returning logits (a model that already carries ``edit`` is
            refused: pass the unedited model, or revert the edit first).
        edit: the edit to measure.
        images: transformed test images ``(N, 3, H, W)``, preprocessed.
        labels: their true labels ``(N,)``, or one int for all.
        groups: name -> boolean mask ``(N,)`` (e.g. target class vs others, seen vs held-out styles);
            default one group ``"all"``.
        originals: the untransformed versions of ``images`` (same order). When given, every group
            counts only images whose original the unedited model classified correctly, as the
            paper's reference code does for its target group.
        clean_images: clean test images, for the accuracy the edit costs.
        clean_labels: their labels; required with ``clean_images``.
        alpha: strength the edit is applied with.
        batch_size: images per forward pass.
        device: where to compute; the model must already be there. Defaults to the model's device.

    Returns:
        An :class:`EditReport`; ``print(report)`` shows a table, ``report.to_dict()`` is JSON-ready.

    Raises:
        SurgeryError: bad inputs, or a model that already carries the edit
            (:func:`surgery.evaluation.unedited.refuse_edited_model`).
    """
    require_eval(model, "evaluate_edit")
    refuse_edited_model(model, edit, "evaluate_edit", alphas=(alpha,))
    images = check_images(images)
    n = images.shape[0]
    y = check_labels(labels, n)
    masks = _check_groups(groups, n)
    if originals is not None:
        originals = check_images(originals, "originals")
        if originals.shape[0] != n:
            raise SurgeryError(
                f"originals has {originals.shape[0]} images but images has {n}; they must pair up"
            )
    if (clean_images is None) != (clean_labels is None):
        raise SurgeryError("give clean_images and clean_labels together, or neither")
    y_clean = None
    if clean_images is not None:
        clean_images = check_images(clean_images, "clean_images")
        n_clean = clean_images.shape[0]
        y_clean = check_labels(clean_labels, n_clean, "clean_labels")  # type: ignore[arg-type]

    def run(x: torch.Tensor, what: str) -> tuple[torch.Tensor, int]:
        return _predict(model, x, batch_size=batch_size, device=device, what=what)

    pre, num_classes = run(images, "images")
    check_label_range(y, num_classes)
    keep = torch.ones(n, dtype=torch.bool)
    if originals is not None:
        keep = run(originals, "originals")[0] == y
        logger.info("%d of %d originals classified correctly; counting only those", int(keep.sum()), n)
    clean_pre = None
    if clean_images is not None:
        check_label_range(y_clean, num_classes, "clean_labels")  # type: ignore[arg-type]
        clean_pre = run(clean_images, "clean_images")[0]
    with edited(model, edit, alpha=alpha):
        post = run(images, "images")[0]
        clean_post = run(clean_images, "clean_images")[0] if clean_images is not None else None

    wrong_pre, wrong_post = pre != y, post != y
    rows = []
    for name, mask in masks.items():
        counted = mask & keep
        e_pre, e_post = int(wrong_pre[counted].sum()), int(wrong_post[counted].sum())
        rows.append(
            GroupResult(
                name=name,
                n=int(counted.sum()),
                n_total=int(mask.sum()),
                errors_before=e_pre,
                errors_after=e_post,
                pct_corrected=errors_corrected(e_pre, e_post),
            )
        )
    acc_pre = acc_post = None
    if y_clean is not None:
        acc_pre = 100.0 * (clean_pre == y_clean).double().mean().item()  # type: ignore[operator]
        acc_post = 100.0 * (clean_post == y_clean).double().mean().item()  # type: ignore[operator]
    return EditReport(
        rows=rows,
        restricted=originals is not None,
        preds_before=pre,
        preds_after=post,
        clean_acc_before=acc_pre,
        clean_acc_after=acc_post,
        layer=edit.layer,
        method=edit.method,
        alpha=float(alpha),
        n_clean=0 if clean_images is None else int(clean_images.shape[0]),
    )
