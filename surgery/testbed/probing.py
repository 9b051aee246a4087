"""Probing the testbed classifiers: the probe on testbed scenes, restyled by exact re-rendering.

Restyling re-renders a scene with one concept's region restyled (:meth:`Testbed.render_batch` with
``restyle``), so only that concept's pixels change. ``surgery probe --testbed ARCH`` runs this on a
trained testbed classifier; ``benchmarks/probe_testbed.py`` also checks that the probe recovers the
generator's preferences.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from surgery.probe.run import ProbeResult, Transform, probe

from .objects import CLASS_NAMES
from .scenes import Testbed, TestbedData
from .procedural_styles import STYLES
from .textures import CONCEPTS
from .train import normalize

__all__ = ["scene_inputs", "probe_testbed", "preferred_cells"]


def scene_inputs(
    tb: Testbed, data: TestbedData, variant: int | str = 0
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], Transform]:
    """``(images uint8, labels, masks, transform)`` for :func:`surgery.probe.probe` on testbed scenes.

    ``transform(concept, style, index)`` re-renders ``data``'s scenes ``index`` with ``concept``
    restyled by ``(style, variant)``: exactly the clean scene outside the concept's region.
    """

    def transform(concept: str, style: str, index: torch.Tensor) -> torch.Tensor:
        specs = [data.specs[i] for i in index.tolist()]
        images, _ = tb.render_batch(specs, restyle={concept: (style, variant)})
        return images

    masks = {c: data.mask(c) for c in CONCEPTS}
    return data.images, data.labels, masks, transform


def probe_testbed(
    model: nn.Module,
    tb: Testbed,
    n: int,
    *,
    split: str = "test",
    styles: Sequence[str] | None = None,
    variant: int | str = 0,
    **kwargs: Any,
) -> ProbeResult:
    """:func:`surgery.probe.probe` on ``n`` testbed scenes of ``split``, every concept, ``styles``
    (default all) at ``variant``; ``kwargs`` go to ``probe`` (``n_boot``, ``min_images``, ...)."""
    data = tb.make_dataset(n, split)
    images, labels, masks, transform = scene_inputs(tb, data, variant)
    styles = list(styles or STYLES)
    unknown = [s for s in styles if s not in STYLES]
    if unknown:
        raise ValueError(f"unknown styles {unknown}; styles: {', '.join(STYLES)}")
    result = probe(
        model, images, labels, masks, styles, transform=transform, preprocess=normalize,
        class_names=CLASS_NAMES, **kwargs,
    )
    result.meta.update({"testbed": tb.config.key(), "testbed_seed": tb.seed, "split": split, "variant": variant})
    return result


def preferred_cells(tb: Testbed) -> set[tuple[int, str]]:
    """``(label, concept)`` pairs the generator prefers."""
    return {(k, c) for k in range(len(CLASS_NAMES)) for c in CONCEPTS if tb.prefers(k, c)}
