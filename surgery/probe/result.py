"""What the probe found: rows per (class, concept, style), cells per (class, concept), and their
reports (rules, CSV, JSON, markdown, a heatmap, per-class bar charts), all written atomically."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from surgery._files import atomic_write, save_figure
from surgery.errors import SurgeryError

__all__ = ["ProbeRow", "ProbeCell", "ProbeResult"]

logger = logging.getLogger(__name__)


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
