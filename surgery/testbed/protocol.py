"""The paper's editing protocol on the testbed, as rules both ``surgery demo`` and the efficacy benchmark
(``benchmarks/efficacy``) follow (Santurkar et al. 2021, Section 4.1 and Appendix A.6).

- **Pairs** (:func:`select_pairs`): on clean ``val`` scenes every concept is restyled with every style
  (variant 0); a concept-style pair qualifies when it lowers the accuracy of at least ``min_hurt`` (3)
  classes by at least ``min_drop`` (15) points on their scenes that show the concept. ``k`` of the
  qualifying pairs are drawn at random; the most harmful remaining pairs fill up a short list.
- **Target class** (:func:`choose_target`): drawn among the classes the pair hurts that have enough
  scenes showing the concept.
- **Candidates** (:func:`edit_candidates`): one fast-solver rewrite per candidate layer, each at a grid
  of strengths; the strength (and so the layer) is then chosen on validation images within a
  clean-accuracy budget (:func:`surgery.evaluation.select.select_strength`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from surgery.evaluation.cached import Candidate
from surgery.evaluation.select import strength_grid
from surgery.rewrite import rewrite
from surgery.stats import KeyStats

from .objects import CLASS_NAMES
from .scenes import Testbed, TestbedData
from .procedural_styles import STYLES
from .textures import CONCEPTS

__all__ = ["MIN_DROP", "MIN_HURT", "ALPHAS", "SPAN", "span_parts", "select_pairs", "choose_target", "edit_candidates"]

MIN_DROP = 15.0
MIN_HURT = 3
ALPHAS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0)
_MIN_SCENES = 5


def _predictions(model: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])


def select_pairs(
    model: nn.Module,
    tb: Testbed,
    prep: Callable[[torch.Tensor], torch.Tensor],
    clean_val: TestbedData,
    *,
    k: int,
    rng: np.random.Generator,
    min_drop: float = MIN_DROP,
    min_hurt: int = MIN_HURT,
    concepts: Sequence[str] | None = None,
    styles: Sequence[str] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(chosen pairs, every pair measured)``, measured on clean val-split scenes (never on test).

    Each row: ``concept``, ``style``, ``hurt`` (classes and their drops), ``n_hurt``,
    ``overall_drop_pp``, ``qualifies``, ``n_scenes``.
    """
    pred0 = _predictions(model, prep(clean_val.images))
    labels = clean_val.labels
    rows = []
    for concept in concepts or CONCEPTS:
        idx = clean_val.has_concept(concept).nonzero().flatten()
        if len(idx) == 0:
            continue
        specs = [clean_val.specs[i] for i in idx.tolist()]
        for style in styles or STYLES:
            images, _ = tb.render_batch(specs, restyle={concept: (style, 0)})
            pred1 = _predictions(model, prep(images))
            hurt = []
            for c in range(len(CLASS_NAMES)):
                sel = labels[idx] == c
                if int(sel.sum()) < _MIN_SCENES:
                    continue
                a0 = 100.0 * (pred0[idx][sel] == c).double().mean().item()
                a1 = 100.0 * (pred1[sel] == c).double().mean().item()
                if a0 - a1 >= min_drop:
                    hurt.append({"class": c, "drop_pp": round(a0 - a1, 1)})
            total = 100.0 * ((pred0[idx] == labels[idx]).double().mean() - (pred1 == labels[idx]).double().mean()).item()
            rows.append(
                {"concept": concept, "style": style, "hurt": hurt, "n_hurt": len(hurt),
                 "overall_drop_pp": round(total, 2), "qualifies": len(hurt) >= min_hurt, "n_scenes": len(idx)}
            )
    ok = [r for r in rows if r["qualifies"]]
    chosen = [ok[i] for i in sorted(rng.choice(len(ok), size=min(k, len(ok)), replace=False).tolist())] if ok else []
    if len(chosen) < k:
        rest = sorted((r for r in rows if not r["qualifies"]), key=lambda r: (-r["n_hurt"], -r["overall_drop_pp"]))
        chosen += rest[: k - len(chosen)]
    return chosen, rows


def choose_target(pair: dict[str, Any], labels: torch.Tensor, need: int, rng: np.random.Generator) -> int:
    """A class the pair hurts (on clean val scenes) with at least ``need`` of ``labels`` (the pool)."""
    counts = torch.bincount(labels, minlength=len(CLASS_NAMES))
    enough = [c for c in range(len(CLASS_NAMES)) if counts[c] >= need] or [int(counts.argmax())]
    hurt = [h["class"] for h in pair["hurt"] if h["class"] in enough]
    return int(rng.choice(hurt or enough))


SPAN = "+"  # a candidate "A+B" is one span edit of A and B (surgery.span)


def span_parts(candidate: str) -> list[str]:
    """The layers of a candidate: ``"A+B"`` -> ``["A", "B"]``, ``"A"`` -> ``["A"]``."""
    return candidate.split(SPAN)


def edit_candidates(
    model: nn.Module,
    layers: Sequence[str],
    stats: dict[str, KeyStats],
    x: torch.Tensor,
    x2: torch.Tensor,
    masks: torch.Tensor | None,
    *,
    alphas: Sequence[float] = ALPHAS,
    use_mask: bool = False,
    steps: int | None = None,
    prefix_weight: float | str = "auto",
    schedule: str = "memit",
    rank: int = 1,
) -> list[Candidate]:
    """One fast-solver rewrite per layer (L1, the paper's ``-mask`` unless ``use_mask``), each at every
    strength of ``alphas``; a layer ``"A+B"`` is one span edit of A and B (:func:`span_parts`) with
    ``schedule``. ``prefix_weight``: the class token's weight on token layers; ``rank``: the number of
    directions (``rewrite``)."""
    out: list[Candidate] = []
    for layer in layers:
        parts = span_parts(layer)
        edit = rewrite(
            model, parts if len(parts) > 1 else layer, x, x2, masks,
            stats={p: stats[p] for p in parts} if len(parts) > 1 else stats[layer], solver="fast",
            use_mask=use_mask, steps=steps, prefix_weight=prefix_weight, rank=rank,
            **({"schedule": schedule} if len(parts) > 1 else {}),
        )
        out += strength_grid(edit, alphas)
    return out
