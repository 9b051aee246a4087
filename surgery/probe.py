"""Probing a classifier's prediction rules with concept-level counterfactuals (paper, Section 5).

Transform one concept at a time (e.g. cover the grass in snow) and measure, per class, how much the
accuracy drops on the images of that class that show the concept. Concepts whose transformation
hurts a class most are the ones the model relies on to recognize it ("road" for "race car").

    result = probe(model, images, labels, masks, styles=PIXEL_STYLES, preprocess=normalize)
    result.rules(top_k=3)          # per class: the concepts whose transformation hurts most
    result.concept_sensitivity()   # per concept, across classes
    result.heatmap("probe.png"); result.to_csv("probe.csv")

Two ways to transform a concept:

- ``styles={name: fn}``: pixel transformations ``fn(images, masks) -> images``; the probe keeps
  their output inside the concept's mask only (``where(mask, fn(x, m), x)``), so nothing else in
  the image changes. :data:`PIXEL_STYLES` holds a few (gray, flat, blur).
- ``transform=fn`` with ``styles=[names]``: full control, ``fn(concept, style, index) -> images``
  returns ``images[index]`` with ``concept`` transformed by ``style`` (e.g. a re-rendering of
  synthetic scenes, or a style-transfer model's output pasted into the mask).

Accuracies are in percent, drops in percentage points (positive: the transformation hurts). The
95% intervals are paired percentile bootstraps over the images of a cell (the same resampled
images before and after, and for every style of a concept, so that the intervals of the mean over
styles are bootstrapped too).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._checks import (
    check_images,
    check_label_range,
    check_labels,
    check_logits,
    require_eval,
    resolve_device,
)
from ._files import atomic_write, save_figure
from .errors import SurgeryError

__all__ = [
    "PIXEL_STYLES",
    "ProbeCell",
    "ProbeResult",
    "ProbeRow",
    "Transform",
    "masked_transform",
    "probe",
]

logger = logging.getLogger(__name__)

StyleFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``fn(images (M, 3, H, W), masks (M, H, W) bool) -> images (M, 3, H, W)``."""

Transform = Callable[[str, str, torch.Tensor], torch.Tensor]
"""``transform(concept, style, index) -> images[index]`` with ``concept`` transformed by ``style``."""


# --------------------------------------------------------------------------------------------------
# Built-in pixel styles
# --------------------------------------------------------------------------------------------------


def _gray(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Luminance in every channel (removes colour, keeps texture)."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * w).sum(1, keepdim=True).expand_as(images)


def _flat(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The region's mean colour everywhere (removes texture, keeps colour)."""
    m = masks[:, None].to(images.dtype)
    mean = (images * m).sum((2, 3), keepdim=True) / m.sum((2, 3), keepdim=True).clamp_min(1.0)
    return mean.expand_as(images)


def _blur(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """A 7x7 box blur (removes fine texture)."""
    return F.avg_pool2d(images, 7, stride=1, padding=3, count_include_pad=False)


PIXEL_STYLES: dict[str, StyleFn] = {"gray": _gray, "flat": _flat, "blur": _blur}
"""Generic pixel styles for :func:`probe`: ``gray`` (no colour), ``flat`` (no texture), ``blur``.
They work on float images in any linear pixel scale (they are channel-wise affine-equivariant
except ``gray``, whose weights assume RGB order), and on uint8 images."""


def masked_transform(images: torch.Tensor, masks: Mapping[str, torch.Tensor], styles: Mapping[str, StyleFn]) -> Transform:
    """The :data:`Transform` that applies ``styles[style]`` to ``images[index]`` inside ``masks[concept]``.

    Style functions see float images (uint8 images are converted to float in 0..255 and back,
    rounded and clipped); only pixels inside the mask change.
    """

    def transform(concept: str, style: str, index: torch.Tensor) -> torch.Tensor:
        x = images[index]
        m = masks[concept][index].to(x.device)
        xf = x if x.is_floating_point() else x.float()
        out = styles[style](xf, m)
        if not isinstance(out, torch.Tensor) or out.shape != xf.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise SurgeryError(
                f"style {style!r} must return a tensor of the shape of its input images "
                f"{tuple(xf.shape)}; it returned {got}"
            )
        out = torch.where(m[:, None], out.to(xf.dtype), xf)
        if not x.is_floating_point():
            info = torch.iinfo(x.dtype)
            out = out.round().clamp(info.min, info.max).to(x.dtype)
        return out

    return transform


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass
class ProbeRow:
    """One (class, concept, style) cell. Accuracies in percent, drops in percentage points.

    ``skipped`` cells had fewer than ``min_images`` images of the class showing the concept: their
    numbers are NaN.
    """

    label: int
    class_name: str
    concept: str
    style: str
    n: int
    acc_before: float
    acc_after: float
    drop: float
    ci_low: float
    ci_high: float
    skipped: bool = False


@dataclass
class ProbeCell:
    """One (class, concept) cell, aggregated over styles: the mean drop and its bootstrap interval."""

    label: int
    class_name: str
    concept: str
    n: int
    acc_before: float
    drop: float
    ci_low: float
    ci_high: float
    skipped: bool = False


def _nan_to_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


@dataclass
class ProbeResult:
    """What :func:`probe` measured.

    Attributes:
        rows: one :class:`ProbeRow` per (class, concept, style), skipped cells included; classes
            without any image get no rows.
        cells: one :class:`ProbeCell` per (class, concept): the mean over styles.
        concepts, styles, class_names: the axes, in order.
        meta: settings (``n_boot``, ``min_images``, ``seed``, ``n_images``, ...).
    """

    rows: list[ProbeRow]
    cells: list[ProbeCell]
    concepts: list[str]
    styles: list[str]
    class_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- summaries
    def drop_matrix(self) -> np.ndarray:
        """``(classes, concepts)`` mean drop over styles; NaN where skipped."""
        out = np.full((len(self.class_names), len(self.concepts)), np.nan)
        for c in self.cells:
            if not c.skipped:
                out[c.label, self.concepts.index(c.concept)] = c.drop
        return out

    def rules(self, top_k: int = 3) -> dict[str, list[ProbeCell]]:
        """Per class (by name), its ``top_k`` measured concepts whose transformation hurts most
        (largest mean drop over styles first). Classes without a measured cell are left out."""
        out: dict[str, list[ProbeCell]] = {}
        for label, name in enumerate(self.class_names):
            cells = [c for c in self.cells if c.label == label and not c.skipped]
            if cells:
                out[name] = sorted(cells, key=lambda c: -c.drop)[:top_k]
        return out

    def concept_sensitivity(self) -> list[dict[str, Any]]:
        """Per concept, across classes (each measured class weighs the same), most harmful first:
        ``mean_drop``, ``max_drop`` and the class it hurts most, ``n_classes`` measured,
        ``n_hurt`` (classes whose interval lies above 0)."""
        out = []
        for concept in self.concepts:
            cells = [c for c in self.cells if c.concept == concept and not c.skipped]
            if not cells:
                continue
            worst = max(cells, key=lambda c: c.drop)
            out.append(
                {
                    "concept": concept,
                    "mean_drop": float(np.mean([c.drop for c in cells])),
                    "max_drop": worst.drop,
                    "most_hurt_class": worst.class_name,
                    "n_classes": len(cells),
                    "n_hurt": sum(c.ci_low > 0 for c in cells),
                }
            )
        return sorted(out, key=lambda d: -d["mean_drop"])

    def to_markdown(self, top_k: int = 3) -> str:
        """The per-class rules and the concept sensitivity as markdown tables."""
        lines = [f"| class | top {top_k} concepts (mean drop over styles, pp [95% CI]) |", "|---|---|"]
        for name, cells in self.rules(top_k).items():
            cols = ", ".join(f"{c.concept} {c.drop:+.1f} [{c.ci_low:+.1f}, {c.ci_high:+.1f}]" for c in cells)
            lines.append(f"| {name} | {cols} |")
        lines += ["", "| concept | mean drop (pp) | max drop (class) | classes hurt / measured |", "|---|---|---|---|"]
        for d in self.concept_sensitivity():
            lines.append(
                f"| {d['concept']} | {d['mean_drop']:+.1f} | {d['max_drop']:+.1f} ({d['most_hurt_class']}) "
                f"| {d['n_hurt']} / {d['n_classes']} |"
            )
        return "\n".join(lines)

    # ---------------------------------------------------------------- files
    def to_csv(self, path: str | Path) -> None:
        """One line per (class, concept, style) row, skipped rows included (empty numbers)."""
        names = list(ProbeRow.__dataclass_fields__)

        def fill(f: Any) -> None:
            w = csv.DictWriter(f, fieldnames=names)
            w.writeheader()
            for r in self.rows:
                w.writerow({k: ("" if v is None else v) for k, v in _nan_to_none(asdict(r)).items()})

        _write_with(path, fill, newline="")

    def to_json(self, path: str | Path) -> None:
        """Rows, cells, rules, concept sensitivity and settings (NaN written as null)."""
        doc = {
            "meta": self.meta,
            "concepts": self.concepts,
            "styles": self.styles,
            "class_names": self.class_names,
            "rows": [_nan_to_none(asdict(r)) for r in self.rows],
            "cells": [_nan_to_none(asdict(c)) for c in self.cells],
            "concept_sensitivity": self.concept_sensitivity(),
        }
        _write_with(path, lambda f: json.dump(doc, f, indent=1))

    @classmethod
    def from_json(cls, path: str | Path) -> ProbeResult:
        """Read back a file written by :meth:`to_json`."""
        try:
            doc = json.loads(Path(path).read_text())
            nan = float("nan")
            rows = [ProbeRow(**{k: (nan if v is None else v) for k, v in r.items()}) for r in doc["rows"]]
            cells = [ProbeCell(**{k: (nan if v is None else v) for k, v in c.items()}) for c in doc["cells"]]
            return cls(rows, cells, doc["concepts"], doc["styles"], doc["class_names"], doc.get("meta", {}))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SurgeryError(f"cannot read probe results from {str(path)!r}: {e}") from None

    def heatmap(
        self, path: str | Path, *, highlight: set[tuple[int, str]] | None = None, title: str | None = None
    ) -> None:
        """Class x concept mean drop (pp), annotated, on a diverging colour map centred at 0.

        One row per class that has images; skipped cells are grey. ``highlight``: ``(label, concept)``
        cells to outline (e.g. the concepts a synthetic dataset was generated with).
        """
        plt = _pyplot()
        from matplotlib.patches import Rectangle

        shown = sorted({c.label for c in self.cells if c.n > 0})  # not every one of ImageNet's 1000
        if not shown:
            raise SurgeryError("nothing to plot: no class has an image showing any concept")
        m = self.drop_matrix()[shown]
        lim = max(5.0, float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 5.0)
        rows, cols = m.shape
        fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 0.62 * cols), 1.4 + 0.36 * rows))
        cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.85")
        im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto")
        for i in range(rows):
            for j in range(cols):
                v = m[i, j]
                text = "-" if math.isnan(v) else f"{v:.0f}"
                dark = not math.isnan(v) and abs(v) > 0.6 * lim
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
        for label, concept in highlight or ():
            if concept in self.concepts and label in shown:
                i, j = shown.index(label), self.concepts.index(concept)
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=1.6, ec="black"))
        ax.set_xticks(range(cols), self.concepts, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(rows), [self.class_names[k] for k in shown], fontsize=8)
        ax.set_xlabel("transformed concept")
        ax.set_ylabel("class")
        styles = ", ".join(self.styles)
        ax.set_title(title or f"accuracy drop (pp) when one concept is transformed\nmean over styles: {styles}", fontsize=9)
        fig.colorbar(im, ax=ax, label="drop (pp)", shrink=0.8)
        fig.tight_layout()
        _save(fig, path)

    def bar_charts(self, path: str | Path, *, columns: int = 5, highlight: set[tuple[int, str]] | None = None) -> None:
        """Small multiples: per class, the mean drop of each concept with its 95% interval
        (``highlight``ed cells drawn dark)."""
        plt = _pyplot()
        labels = [k for k in range(len(self.class_names)) if any(c.label == k and not c.skipped for c in self.cells)]
        if not labels:
            raise SurgeryError("no measured (class, concept) cell to plot: every cell was skipped")
        rows = math.ceil(len(labels) / columns)
        fig, axes = plt.subplots(
            rows, min(columns, len(labels)), figsize=(2.6 * min(columns, len(labels)), 2.1 * rows),
            sharey=True, squeeze=False,
        )
        m = self.drop_matrix()
        lo, hi = np.full_like(m, np.nan), np.full_like(m, np.nan)
        for c in self.cells:
            if not c.skipped:
                lo[c.label, self.concepts.index(c.concept)] = c.ci_low
                hi[c.label, self.concepts.index(c.concept)] = c.ci_high
        x = np.arange(len(self.concepts))
        for ax, k in zip(axes.flat, labels):
            ok = np.isfinite(m[k])
            colors = ["tab:red" if (k, c) in (highlight or ()) else "tab:blue" for c in self.concepts]
            ax.bar(x[ok], m[k][ok], color=[c for c, o in zip(colors, ok) if o], alpha=0.8)
            ax.errorbar(x[ok], m[k][ok], yerr=[m[k][ok] - lo[k][ok], hi[k][ok] - m[k][ok]], fmt="none", ecolor="black", lw=0.8, capsize=1.5)
            ax.axhline(0, color="black", lw=0.6)
            ax.set_title(self.class_names[k], fontsize=8)
            ax.set_xticks(x, self.concepts, rotation=90, fontsize=6)
            ax.tick_params(axis="y", labelsize=6)
        for ax in axes.flat[len(labels):]:
            ax.axis("off")
        for ax in axes[:, 0]:
            ax.set_ylabel("drop (pp)", fontsize=7)
        note = " (red: highlighted)" if highlight else ""
        fig.suptitle(f"accuracy drop per transformed concept, mean over styles, 95% bootstrap CI{note}", fontsize=9)
        fig.tight_layout()
        _save(fig, path)


def _write_with(path: str | Path, fill: Callable[[Any], None], **open_kwargs: Any) -> None:
    """Open a temporary file next to ``path`` for text, ``fill`` it, rename it over ``path``."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", **open_kwargs) as f:
            fill(f)

    try:
        atomic_write(path, write)
    except OSError as e:
        raise SurgeryError(f"cannot write {str(path)!r}: {e}") from None


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SurgeryError("the probe's figures need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> None:
    try:
        save_figure(fig, path, dpi=130)
    except OSError as e:
        raise SurgeryError(f"cannot write the figure to {str(path)!r}: {e}") from None


# --------------------------------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------------------------------


def _check_masks(masks: Mapping[str, Any], n: int, hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    if not isinstance(masks, Mapping) or not masks:
        raise SurgeryError("masks must be a non-empty dict {concept: (N, H, W) bool tensor}")
    out = {}
    for concept, m in masks.items():
        if not isinstance(concept, str):
            raise SurgeryError(f"mask keys must be concept names (str); got {concept!r}")
        m = torch.as_tensor(m)
        if m.ndim == 4 and m.shape[1] == 1:
            m = m[:, 0]
        if m.ndim != 3 or m.shape[0] != n or tuple(m.shape[1:]) != hw:
            raise SurgeryError(
                f"the mask of {concept!r} must have shape ({n}, {hw[0]}, {hw[1]}) (one mask per image, "
                f"at the images' resolution); got {tuple(m.shape)}"
            )
        if m.dtype != torch.bool:
            if m.is_floating_point() or m.is_complex() or not bool(((m == 0) | (m == 1)).all()):
                raise SurgeryError(
                    f"the mask of {concept!r} must be bool (or 0/1 integers); got {m.dtype}; "
                    "threshold soft masks first, e.g. mask > 0.5"
                )
            m = m.bool()
        out[concept] = m.cpu()
    return out


def _check_images(images: Any, preprocess: Callable | None) -> torch.Tensor:
    if preprocess is None:
        return check_images(images)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
        what = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise SurgeryError(f"images must be a non-empty tensor (N, C, H, W); got {what}")
    return images


@torch.no_grad()
def _predict(model: nn.Module, images: torch.Tensor, preprocess: Callable | None, batch_size: int, device: torch.device) -> torch.Tensor:
    preds = []
    for lo in range(0, len(images), batch_size):
        x = images[lo : lo + batch_size].to(device)
        x = preprocess(x) if preprocess is not None else x
        preds.append(check_logits(model(x)).argmax(1).cpu())
    return torch.cat(preds)


def _num_classes(model: nn.Module, images: torch.Tensor, preprocess: Callable | None, device: torch.device) -> int:
    with torch.no_grad():
        x = images[:1].to(device)
        return int(check_logits(model(preprocess(x) if preprocess is not None else x)).shape[1])


def probe(
    model: nn.Module,
    images: torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    masks: Mapping[str, torch.Tensor],
    styles: Mapping[str, StyleFn] | Sequence[str] = PIXEL_STYLES,
    *,
    transform: Transform | None = None,
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    class_names: Sequence[str] | None = None,
    concepts: Sequence[str] | None = None,
    n_boot: int = 1000,
    min_images: int = 5,
    seed: int = 0,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> ProbeResult:
    """Measure, for every (class, concept, style), the accuracy drop when only that concept is transformed.

    Args:
        model: the classifier, in eval mode (it is only read, never changed).
        images: ``(N, 3, H, W)`` clean images. Without ``preprocess`` they are the model's input
            (floating point); with it, any pixel format the styles work in (e.g. uint8 RGB), and
            ``preprocess(batch)`` makes the model's input.
        labels: ``(N,)`` true classes.
        masks: ``{concept: (N, H, W) bool}``; an image shows a concept when its mask is non-empty.
        styles: ``{name: fn(images, masks) -> images}``, applied inside each concept's mask
            (default :data:`PIXEL_STYLES`); or, with ``transform``, the style names to pass it.
        transform: ``transform(concept, style, index) -> images[index]`` transformed (same format as
            ``images``), for transformations that need more than pixels and masks, e.g. re-rendering.
        preprocess: maps a batch of ``images`` (or transformed images) to the model's input.
        class_names: one name per model output (default: ``"0"``, ``"1"``, ...).
        concepts: the concepts to probe, in order (default: every key of ``masks``).
        n_boot: bootstrap resamples for the 95% intervals.
        min_images: (class, concept) cells with fewer images showing the concept are skipped (kept
            in the result with ``skipped=True``).
        seed: seed of the bootstrap (numpy); each cell's stream depends on it and the cell only.
        batch_size: images per forward pass.
        device: where to run (default: the model's device).
        progress: show a tqdm progress bar over (concept, style) pairs.

    Returns:
        A :class:`ProbeResult`.

    Raises:
        SurgeryError: bad inputs (shapes, lengths, names, a model in training mode).
    """
    require_eval(model, "probe")
    images = _check_images(images, preprocess)
    n, hw = images.shape[0], (images.shape[2], images.shape[3])
    labels = check_labels(labels, n)
    masks = _check_masks(masks, n, hw)
    concepts = list(masks) if concepts is None else list(concepts)
    unknown = [c for c in concepts if c not in masks]
    if unknown or not concepts:
        raise SurgeryError(f"concepts {unknown or concepts} have no mask; masks are given for {', '.join(masks)}")
    if transform is None:
        if not isinstance(styles, Mapping) or not styles or not all(callable(f) for f in styles.values()):
            raise SurgeryError(
                "styles must be a non-empty dict {name: fn(images, masks) -> images} (or pass "
                "transform=fn(concept, style, index) with styles as a list of names)"
            )
        transform = masked_transform(images, masks, styles)
    elif not callable(transform):
        raise SurgeryError(f"transform must be callable as transform(concept, style, index); got {type(transform).__name__}")
    style_names = list(styles)
    if not style_names or not all(isinstance(s, str) for s in style_names):
        raise SurgeryError(f"styles must name at least one style by a string; got {style_names!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise SurgeryError(f"n_boot must be a positive int; got {n_boot!r}")
    if isinstance(min_images, bool) or not isinstance(min_images, int) or min_images < 1:
        raise SurgeryError(f"min_images must be a positive int; got {min_images!r}")
    dev = resolve_device(model, device)

    k = _num_classes(model, images, preprocess, dev)
    check_label_range(labels, k)
    if class_names is None:
        class_names = [str(i) for i in range(k)]
    elif isinstance(class_names, str) or len(class_names) != k:
        got = "a string" if isinstance(class_names, str) else f"{len(class_names)} names"
        raise SurgeryError(f"class_names must give one name per model output ({k}); got {got}")
    class_names = [str(c) for c in class_names]

    pred0 = _predict(model, images, preprocess, batch_size, dev)
    logger.info("probe: clean accuracy %.1f%% on %d images", 100 * float((pred0 == labels).float().mean()), n)
    pairs = [(c, s) for c in concepts for s in style_names]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pairs), desc="probe", unit="pair")
    rows: list[ProbeRow] = []
    cells: list[ProbeCell] = []
    present = sorted(set(labels.tolist()))  # classes with images: the others get no rows
    try:
        for ci, concept in enumerate(concepts):
            index = masks[concept].flatten(1).any(1).nonzero().flatten()
            correct_after = []
            for style in style_names:
                if len(index):
                    x = transform(concept, style, index)
                    if not isinstance(x, torch.Tensor) or x.shape[0] != len(index) or tuple(x.shape[2:]) != hw:
                        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                        raise SurgeryError(
                            f"transform({concept!r}, {style!r}, index) must return the {len(index)} images "
                            f"of index, shape ({len(index)}, C, {hw[0]}, {hw[1]}); got {got}"
                        )
                    correct_after.append(_predict(model, x, preprocess, batch_size, dev) == labels[index])
                else:
                    correct_after.append(torch.zeros(0, dtype=torch.bool))
                if bar is not None:
                    bar.update(1)
            after = torch.stack(correct_after).numpy()  # (styles, M)
            before = (pred0[index] == labels[index]).numpy()
            for label in present:
                sel = (labels[index] == label).numpy()
                r, c = _cell(label, class_names[label], concept, style_names, before[sel], after[:, sel], n_boot, min_images, [seed, label, ci])
                rows += r
                cells.append(c)
    finally:
        if bar is not None:
            bar.close()
    meta = {
        "n_images": n,
        "n_boot": n_boot,
        "min_images": min_images,
        "seed": seed,
        "clean_accuracy": 100.0 * float((pred0 == labels).float().mean()),
        "ci": "95% paired percentile bootstrap over images",
    }
    return ProbeResult(rows, cells, concepts, style_names, class_names, meta)


def _cell(
    label: int, name: str, concept: str, styles: list[str], before: np.ndarray, after: np.ndarray,
    n_boot: int, min_images: int, seed: list[int],
) -> tuple[list[ProbeRow], ProbeCell]:
    """Rows of one (class, concept) cell and their mean over styles, with shared bootstrap resamples."""
    m = len(before)
    nan = float("nan")
    if m < min_images:
        rows = [ProbeRow(label, name, concept, s, m, nan, nan, nan, nan, nan, True) for s in styles]
        return rows, ProbeCell(label, name, concept, m, nan, nan, nan, nan, True)
    rng = np.random.default_rng(seed)
    diff = 100.0 * (before[None].astype(np.float64) - after.astype(np.float64))  # (S, m)
    counts = rng.multinomial(m, np.full(m, 1.0 / m), size=n_boot)  # (n_boot, m): one resample a row
    boot = diff @ counts.T / m  # (S, n_boot)
    acc0 = 100.0 * float(before.mean())
    rows = []
    for s, style in enumerate(styles):
        lo, hi = np.percentile(boot[s], [2.5, 97.5])
        acc1 = 100.0 * float(after[s].mean())
        rows.append(ProbeRow(label, name, concept, style, m, acc0, acc1, acc0 - acc1, float(lo), float(hi)))
    lo, hi = np.percentile(boot.mean(0), [2.5, 97.5])
    drop = float(diff.mean())
    return rows, ProbeCell(label, name, concept, m, acc0, drop, float(lo), float(hi))
