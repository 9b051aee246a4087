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

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from surgery._guards import (
    check_label_range,
    check_labels,
    check_logits,
    require_eval,
    resolve_device,
)
from surgery.errors import SurgeryError
from surgery.evaluation.metrics import predict
from surgery.inputs.images import check_images
from surgery.probe.pixel_styles import PIXEL_STYLES, StyleFn, Transform, masked_transform
from surgery.probe.result import ProbeCell, ProbeResult, ProbeRow

__all__ = ["probe"]

logger = logging.getLogger(__name__)


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
        images: ``(N, 3, H, W)`` clean images (checked by :func:`surgery.inputs.images.check_images`).
            Without ``preprocess`` they are the model's input (floating point); with it, pixels the
            styles work in (floating point or uint8 RGB), and ``preprocess(batch)`` makes the model's
            input.
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
    images = check_images(images, pixels=preprocess is not None)
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

    pred0 = predict(model, images, preprocess=preprocess, batch_size=batch_size, device=dev)
    logger.info("probe: clean accuracy %.1f%% on %d images", 100 * float((pred0 == labels).float().mean()), n)
    pairs = [(c, s) for c in concepts for s in style_names]
    bar = None
    if progress:
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
                    correct_after.append(predict(model, x, preprocess=preprocess, batch_size=batch_size, device=dev) == labels[index])
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
