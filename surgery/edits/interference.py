"""How much two factored edits of one weight overlap, and the warning given when a stack of them does.

A factored edit adds ``lam (x) u`` to a weight: it changes the layer's output at a key ``k`` by
``lam (u . k)``, and it was solved so that the keys of its concept (those along ``u``) map to new
values. A later edit of the same weight whose direction ``u'`` is close to ``u`` adds its own update on
those same keys, in proportion to ``|cos(u, u')|``, so the earlier rule may no longer hold. The overlap
of two edits on a weight is the largest ``|cos|`` between a row of one's ``u`` and a row of the other's;
dense edits (fine-tuning) have no direction and never overlap anything here.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch

from surgery.edits.edit import Edit
from surgery.errors import InterferenceWarning

__all__ = ["OVERLAP_THRESHOLD", "key_overlap", "warn_interference", "describe_edit"]

OVERLAP_THRESHOLD = 0.5
"""Overlaps above this (``|cos|`` of key directions) give an :class:`~surgery.errors.InterferenceWarning`."""


def _unit_rows(u: torch.Tensor) -> torch.Tensor:
    u = u.detach().to("cpu", torch.float64)
    return u / u.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


def key_overlap(edit_a: Edit, edit_b: Edit) -> dict[str, float]:
    """``{parameter name: overlap}`` for every weight both edits factor (each layer of a span edit).

    The overlap is the largest ``|cosine|`` between a row of one edit's ``u`` and a row of the other's,
    in ``[0, 1]``: 1 when they share a key direction, 0 when every direction of one is orthogonal to
    every direction of the other. Weights only one of them changes, and dense edits, are left out.
    """
    fa, fb = edit_a.factors(), edit_b.factors()
    overlaps: dict[str, float] = {}
    for name, (_, ua) in fa.items():
        if name not in fb or fb[name][1].shape[1:] != ua.shape[1:]:
            continue
        cos = _unit_rows(ua) @ _unit_rows(fb[name][1]).T
        overlaps[name] = float(cos.abs().max().clamp(max=1.0)) if cos.numel() else 0.0
    return overlaps


def describe_edit(edit: Edit) -> str:
    """``repr(edit)``, with its description when it has one."""
    return f"{edit!r} ({edit.description!r})" if edit.description else repr(edit)


def warn_interference(
    earlier: Iterable[Edit], edit: Edit, *, threshold: float = OVERLAP_THRESHOLD, stacklevel: int = 2
) -> list[tuple[Edit, str, float]]:
    """Warn once for every edit of ``earlier`` (oldest first) whose key direction on a weight that
    ``edit`` changes too overlaps ``edit``'s by more than ``threshold``.

    Returns:
        ``(earlier edit, parameter name, overlap)`` for each overlap found above the threshold.
    """
    found: list[tuple[Edit, str, float]] = []
    for old in earlier:
        over = {name: v for name, v in key_overlap(old, edit).items() if v > threshold}
        if not over:
            continue
        found += [(old, name, v) for name, v in over.items()]
        where = ", ".join(f"{name!r} (overlap {v:.3f})" for name, v in over.items())
        warnings.warn(
            f"{describe_edit(edit)} changes {where}, which already carries {describe_edit(old)}, and their key "
            f"directions overlap (largest |cos| between their u rows, above {threshold:g}): the later edit's "
            "update also acts on the keys the earlier edit rewrote, in proportion to the overlap, so the "
            "earlier rule may no longer hold (measured on the testbed: 8 stacked edits kept a median 22-79% of "
            "their solo efficacy and cost 1.1-4.2 points of clean accuracy, benchmarks/results/multi_edit.md). "
            "Revert one of them, or make the rules together (a batch rewrite, surgery.batch.rewrite_rules)",
            InterferenceWarning,
            stacklevel=stacklevel + 1,
        )
    return found
