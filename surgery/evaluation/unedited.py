"""Refusing a model that already carries the edit a measurement is about to apply itself.

:func:`surgery.evaluate_edit`, :func:`surgery.select_strength` and ``surgery evaluate`` compare a model
before and after applying an edit. Given a model that already has the edit, they would compare the edit
applied twice with an edited "before" and report nonsense without a word; :func:`refuse_edited_model`
stops them first.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn

from surgery.edits.apply import list_edits
from surgery.edits.edit import Edit
from surgery.errors import SurgeryError
from surgery.identity import content_id

__all__ = ["refuse_edited_model"]

logger = logging.getLogger(__name__)

_STRENGTH_SLACK = 0.1  # as a revert by subtraction accepts (surgery.edits.preflight.check_presence)


def _carried(model: nn.Module, edit: Edit, alphas: Sequence[float]) -> str | None:
    """How ``model`` is seen to carry ``edit`` already; ``None`` when it does not, as far as can be told.

    Two witnesses: the handles of :func:`surgery.edits.apply.apply_edit` on this model (an edit applied
    in this process and not reverted), and the weights themselves along the edit
    (:meth:`Edit.presence`: an edit applied elsewhere, e.g. a checkpoint written by ``surgery apply``).
    Where the weights give one number only (a dense edit of one parameter, whose measurement is a
    single scalar and so always a multiple of the edit), the strength must also be within 10% of 1 or
    of one of ``alphas``: any other checkpoint would show *some* strength there.
    """
    eid: str | None = None
    for h in list_edits(model):
        if h.edit is not edit:
            eid = eid or content_id(edit.layer, edit.method, edit.parameter_deltas())
            if h.edit_id != eid:
                continue
        return f"applied with apply_edit at strength {h.alpha:g} and not reverted"
    deltas = edit.parameter_deltas()
    try:
        weights = {name: model.get_parameter(name) for name in deltas}
    except AttributeError:
        return None  # not this model's edit: applying it says so
    if any(tuple(w.shape) != tuple(deltas[n].shape) or not w.is_floating_point() for n, w in weights.items()):
        return None
    found = edit.presence(weights)
    if found is None or found.absent or not found.clean:
        return None  # no record along the edit, not there, or something else changed the layer
    if sum(t.numel() for t in edit.base_along.values()) <= 1:
        near = [a for a in (1.0, *alphas) if abs(found.strength - a) <= max(found.tolerance, _STRENGTH_SLACK * abs(a))]
        if not near:
            return None
    return f"its weights hold the edit at strength {found.strength:.3g}"


def refuse_edited_model(
    model: nn.Module, edits: Edit | Sequence[Edit], caller: str, *, alphas: Sequence[float] = (1.0,), fix: str | None = None
) -> None:
    """Raise when ``model`` already carries one of ``edits``: ``caller`` applies them itself, on top.

    Measuring an edit on a model that already has it compares a doubled edit with an edited "before".

    Raises:
        SurgeryError: naming the edit, how it was found, and the fix (``fix``, or the library's).
    """
    seen: set[int] = set()
    for edit in [edits] if isinstance(edits, Edit) else edits:
        if id(edit) in seen:
            continue
        seen.add(id(edit))
        why = _carried(model, edit, alphas)
        if why is None:
            continue
        fix = fix or (
            "pass the unedited model, or revert the edit first (surgery.revert_edit(model, handle), or leave the "
            "`with surgery.edited(...)` block)"
        )
        raise SurgeryError(
            f"{caller} applies the edit of {edit.layer!r} itself, but the model already carries it ({why}): it "
            f"would measure the edit applied twice against an already edited 'before'. {fix[0].upper()}{fix[1:]}"
        )
    logger.debug("%s: the model carries none of the edits", caller)
