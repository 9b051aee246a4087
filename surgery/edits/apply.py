"""Patch a loaded model with edits in place, and take them off again (PEFT's merge / unmerge).

``apply_edit`` checks everything before it touches a weight: the parameter exists, shapes and dtypes
fit, the architecture matches, and the new values are finite. It keeps a copy of the original bytes of
every parameter it changes, so reverting through the returned handle restores them exactly; several
edits stack and can be reverted in any order (the remaining ones are re-applied on the original bytes).
Reverting an edit from a file, in a fresh process without a handle, first checks that the edit is on
the weights (the file records the original weights along the edit), then subtracts its update and
reports whether the result matches the base fingerprint recorded in the file. An edit applied on a weight
that already carries an edit with an overlapping key direction gives an
:class:`~surgery.errors.InterferenceWarning` (:mod:`surgery.edits.interference`).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from surgery.edits.edit import Edit
from surgery.edits.interference import warn_interference
from surgery.edits.preflight import RevertReport, check_base, check_presence, not_a_parameter, plan_update
from surgery.errors import IncompatibleEditError, SurgeryError, SurgeryWarning
from surgery.identity import architecture_id, content_id, tensor_sha256
from surgery.rank_one import add_scaled

__all__ = [
    "EditHandle",
    "apply_edit",
    "revert_edit",
    "edited",
    "list_edits",
    "as_edit",
    "edit_identity",
]

logger = logging.getLogger(__name__)

_STATE_ATTR = "_surgery_edit_state"
EditSource = Edit | str | os.PathLike


@dataclass(eq=False)
class EditHandle:
    """What :func:`apply_edit` returns; pass it to :func:`revert_edit` to take the edit off exactly."""

    edit: Edit
    alpha: float
    edit_id: str
    active: bool = True

    def __repr__(self) -> str:
        state = "active" if self.active else "reverted"
        return f"EditHandle({self.edit!r}, alpha={self.alpha}, {state})"


@dataclass
class _State:
    """Per-model bookkeeping, kept in the model's ``__dict__`` (invisible to ``state_dict``)."""

    handles: list[EditHandle] = field(default_factory=list)
    base: dict[str, torch.Tensor] = field(default_factory=dict)  # bytes before any active edit


def _state(model: nn.Module) -> _State:
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        state = _State()
        model.__dict__[_STATE_ATTR] = state
    return state


def edit_identity(edit: Edit) -> str:
    """What makes two edits the same edit (layer, method and update), whatever their provenance."""
    return content_id(edit.layer, edit.method, edit.parameter_deltas())


def as_edit(source: EditSource) -> Edit:
    """An :class:`Edit` from an ``Edit`` or the path of an edit file."""
    if isinstance(source, Edit):
        return source
    if isinstance(source, (str, os.PathLike)):
        return Edit.load(Path(source))
    raise TypeError(f"expected an Edit or the path of an edit file, got {type(source).__name__}")


def _parameter(model: nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:
        buffers = dict(model.named_buffers())
        if name in buffers:
            raise not_a_parameter(name, "the model", "a buffer (running statistics or a counter)") from None
        near = [n for n, _ in model.named_parameters() if n.rsplit(".", 2)[-2:] == name.rsplit(".", 2)[-2:]][:3]
        hint = f" Parameters with a similar name: {near}." if near else ""
        raise IncompatibleEditError(
            f"the model ({type(model).__name__}) has no parameter {name!r}, so the edit was made for "
            f"another architecture.{hint}"
        ) from None


def _check_architecture(model: nn.Module, edit: Edit) -> None:
    here = architecture_id(model)
    if edit.architecture and edit.architecture != here:
        same_class = edit.architecture.split("@")[0] == here.split("@")[0]
        detail = " (the same class with other layers, like resnet18 and resnet34)" if same_class else ""
        raise IncompatibleEditError(
            f"the edit was made for architecture {edit.architecture!r} but the model is {here!r}{detail}; "
            "apply it to a model of the same architecture (if you are sure the layer is the same, set "
            "edit.architecture = None to skip this check)"
        )


def _plan(model: nn.Module, edit: Edit, alpha: float, sign: float = 1.0, strict: bool = False) -> dict[str, torch.Tensor]:
    """New values of every parameter of ``model`` the edit changes; raises before anything is modified."""
    if not math.isfinite(alpha):
        raise SurgeryError(f"alpha must be a finite number, got {alpha}")
    _check_architecture(model, edit)
    state = model.__dict__.get(_STATE_ATTR)
    base = {} if state is None else state.base  # the weights before the active edits
    return plan_update(
        lambda name: _parameter(model, name), edit, alpha, sign, strict=strict, stacklevel=3,
        originals=lambda name: base.get(name, _parameter(model, name)),
    )


def apply_edit(model: nn.Module, edit: EditSource, *, alpha: float = 1.0, strict: bool = False) -> EditHandle:
    """Add ``alpha`` times the edit's update to the model's weights, in place.

    Args:
        model: the model to patch.
        edit: an :class:`Edit` or the path of an edit file.
        alpha: strength; 1 applies the edit as computed.
        strict: raise instead of warning when the model's weights differ from those the edit was made
            on, or when the update is oversized: more than 10 times the weight it changes, for an edit made
            on other weights, or more than 10 times its solver's update (``alpha`` above 10), for one made
            on these.

    Warns (:class:`~surgery.errors.InterferenceWarning`, never an error) when a weight the edit changes
    already carries an active edit whose key direction overlaps this one's by more than
    :data:`~surgery.edits.interference.OVERLAP_THRESHOLD` (:func:`~surgery.edits.interference.key_overlap`):
    the earlier rule may no longer hold. Silence it with ``warnings.filterwarnings("ignore",
    category=InterferenceWarning)``.

    Returns:
        An :class:`EditHandle` for :func:`revert_edit`.

    Raises:
        IncompatibleEditError: missing parameter, a buffer or integer tensor, other shape, dtype or
            architecture (or, with ``strict``, other weights or an oversized update). Nothing is changed.
        EditFormatError: a bad edit file.
    """
    edit = as_edit(edit)
    planned = _plan(model, edit, alpha, strict=strict)
    state = _state(model)
    check_base(edit, {name: state.base.get(name, _parameter(model, name)) for name in planned}, strict)
    edit_id = edit_identity(edit)
    if any(h.edit_id == edit_id for h in state.handles):
        warnings.warn(
            f"this edit of {edit.layer!r} is already applied to the model; applying it again stacks it",
            SurgeryWarning,
            stacklevel=2,
        )
    warn_interference([h.edit for h in state.handles if h.edit_id != edit_id], edit, stacklevel=2)
    with torch.no_grad():
        for name, new in planned.items():
            p = _parameter(model, name)
            state.base.setdefault(name, p.detach().clone())
            p.copy_(new)
    handle = EditHandle(edit=edit, alpha=float(alpha), edit_id=edit_id)
    state.handles.append(handle)
    logger.info("applied %r (alpha=%g)", edit, alpha)
    return handle


def _expected(state: _State, name: str) -> torch.Tensor:
    """What parameter ``name`` holds while the active edits are applied: base + each, in order."""
    value = state.base[name]
    for h in state.handles:
        deltas = h.edit.parameter_deltas()
        if name in deltas:
            value = add_scaled(value, deltas[name], h.alpha)
    return value


def _revert_handle(model: nn.Module, handle: EditHandle, *, force: bool = False, stacklevel: int = 2) -> None:
    state = _state(model)
    if not handle.active or handle not in state.handles:
        raise SurgeryError("this edit handle is not active on this model (already reverted, or another model)")
    names = list(handle.edit.parameter_deltas())
    changed = [n for n in names if not torch.equal(_parameter(model, n).detach(), _expected(state, n))]
    if changed:
        message = (
            f"the weights {changed} changed since the edit was applied (something else wrote to them: an "
            "optimizer step, load_state_dict, another tool); reverting through the handle restores the "
            "weights saved at apply time and discards that change"
        )
        if not force:
            raise SurgeryError(message + "; nothing was changed. Pass force=True to restore them anyway")
        warnings.warn(message, SurgeryWarning, stacklevel=stacklevel + 1)
    state.handles.remove(handle)
    handle.active = False
    with torch.no_grad():
        for name in names:
            p = _parameter(model, name)
            remaining = [h for h in state.handles if name in h.edit.parameter_deltas()]
            p.copy_(_expected(state, name))  # the base with the edits that stay, in order
            if not remaining:
                del state.base[name]


def revert_edit(
    model: nn.Module, target: EditHandle | EditSource, *, alpha: float = 1.0, force: bool = False
) -> RevertReport:
    """Take an edit off the model.

    Through a handle (or an edit that is active on this model) the original bytes are restored exactly;
    if the weights were changed by something else since the apply, this raises (``force=True``
    restores the saved bytes anyway, discarding that change). An edit that this model has no handle for
    (say, applied in another process or read from an edited checkpoint) is subtracted, but only when
    the weights hold it at strength ``alpha``: the edit file records its original weights along the
    edit, so a revert of an edit that was never applied, or was applied at another strength, raises
    (``force=True`` subtracts anyway). The result is compared with the base fingerprint.

    Returns:
        A :class:`RevertReport` (truthy when the original bytes are restored exactly; a revert by
        subtraction is exact only up to float rounding, each element within 1 ulp).

    Raises:
        SurgeryError: the checks above failed; nothing was changed.
    """
    if isinstance(target, EditHandle):
        _revert_handle(model, target, force=force)
        return RevertReport(exact=True, through_handle=True)
    edit = as_edit(target)
    edit_id = edit_identity(edit)
    active = [h for h in _state(model).handles if h.edit_id == edit_id]
    if active:
        _revert_handle(model, active[-1], force=force)
        return RevertReport(exact=True, through_handle=True)
    planned = _plan(model, edit, alpha, sign=-1.0)
    current = {name: _parameter(model, name) for name in planned}
    found, passed = check_presence(edit, current, alpha, force=force, where="the model")
    with torch.no_grad():
        for name, new in planned.items():
            _parameter(model, name).copy_(new)
    expected = edit.base_fingerprints
    exact = all(tensor_sha256(_parameter(model, n)) == expected.get(n) for n in planned)
    after = edit.presence({n: _parameter(model, n) for n in planned})
    report = RevertReport(exact=exact, through_handle=False, found=found, after=after, forced=not passed)
    logger.info("reverted %r by subtraction: %s", edit, report.describe())
    return report


def list_edits(model: nn.Module) -> list[EditHandle]:
    """Handles of the edits active on ``model``, oldest first (the order they were applied in, which is
    the order their updates are summed in; a reverted edit leaves the list and the others keep their order)."""
    return list(_state(model).handles)


@contextmanager
def edited(model: nn.Module, *edits: EditSource, alpha: float = 1.0, strict: bool = False) -> Iterator[nn.Module]:
    """Apply ``edits`` for the duration of a ``with`` block; the model is always restored exactly."""
    applied: list[EditHandle] = []
    try:
        for e in edits:
            applied.append(apply_edit(model, e, alpha=alpha, strict=strict))
        yield model
    finally:
        for h in reversed(applied):  # always restored; a change made inside the block is reported
            _revert_handle(model, h, force=True, stacklevel=3)
