"""Patch a loaded model with edits in place, and take them off again (PEFT's merge / unmerge).

``apply_edit`` checks everything before it touches a weight: the parameter exists, shapes and dtypes
fit, the architecture matches, and the new values are finite. It keeps a copy of the original bytes of
every parameter it changes, so reverting through the returned handle restores them exactly; several
edits stack and can be reverted in any order (the remaining ones are re-applied on the original bytes).
Reverting an edit from a file, in a fresh process without a handle, subtracts its update and reports
whether the result matches the base fingerprint recorded in the file.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .edit import Edit, architecture_id, tensor_sha256
from .errors import IncompatibleEditError, SurgeryError, SurgeryWarning

__all__ = ["EditHandle", "apply_edit", "revert_edit", "edited", "list_edits", "as_edit"]

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


def as_edit(source: EditSource) -> Edit:
    """An :class:`Edit` from an ``Edit`` or the path of an edit file."""
    if isinstance(source, Edit):
        return source
    if isinstance(source, (str, os.PathLike)):
        from .edit_file import load_edit

        return load_edit(Path(source))
    raise TypeError(f"expected an Edit or the path of an edit file, got {type(source).__name__}")


def _parameter(model: nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:
        near = [n for n, _ in model.named_parameters() if n.rsplit(".", 2)[-2:] == name.rsplit(".", 2)[-2:]][:3]
        hint = f" Parameters with a similar name: {near}." if near else ""
        raise IncompatibleEditError(
            f"the model ({type(model).__name__}) has no parameter {name!r}, so the edit was made for "
            f"another architecture.{hint}"
        ) from None


def _combine(p: torch.Tensor, delta: torch.Tensor, alpha: float) -> torch.Tensor:
    """``p + alpha * delta`` computed in float64 and rounded once to ``p``'s dtype."""
    return (p.detach().to(torch.float64) + alpha * delta.detach().to(p.device, torch.float64)).to(p.dtype)


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


def plan_update(
    lookup: Callable[[str], torch.Tensor], edit: Edit, alpha: float, sign: float = 1.0, where: str = "the model"
) -> dict[str, torch.Tensor]:
    """New values of every parameter the edit changes, from their current values ``lookup(name)``.

    Shared by the in-memory model and checkpoints on disk: checks alpha, shapes, dtypes and finiteness
    and raises before anything is modified; ``lookup`` raises for a missing name.
    """
    if not math.isfinite(alpha):
        raise SurgeryError(f"alpha must be a finite number, got {alpha}")
    planned: dict[str, torch.Tensor] = {}
    for name, delta in edit.parameter_deltas().items():
        p = lookup(name)
        if tuple(delta.shape) != tuple(p.shape):
            raise IncompatibleEditError(
                f"the edit's update of {name!r} has shape {tuple(delta.shape)} but {where}'s parameter has "
                f"{tuple(p.shape)}; the edit was made for another architecture"
            )
        base = edit.base.get(name, {})
        dtype = str(p.dtype).removeprefix("torch.")
        if base.get("dtype", dtype) != dtype:
            raise IncompatibleEditError(
                f"the edit was made on {base['dtype']} weights but {name!r} is {dtype}; convert the model "
                f"(e.g. model.to(torch.{base['dtype']})) before applying it"
            )
        new = _combine(p, delta, sign * alpha)
        if not torch.isfinite(new).all():
            raise SurgeryError(f"applying the edit would put non-finite values into {name!r}; nothing was changed")
        planned[name] = new
    return planned


def _plan(model: nn.Module, edit: Edit, alpha: float, sign: float = 1.0) -> dict[str, torch.Tensor]:
    """New values of every parameter of ``model`` the edit changes; raises before anything is modified."""
    if not math.isfinite(alpha):
        raise SurgeryError(f"alpha must be a finite number, got {alpha}")
    _check_architecture(model, edit)
    return plan_update(lambda name: _parameter(model, name), edit, alpha, sign)


def check_base(
    edit: Edit, originals: Mapping[str, torch.Tensor], strict: bool, stacklevel: int = 2, where: str = "the model"
) -> None:
    """Warn (or, under ``strict``, raise) when ``originals`` differ from the weights the edit was made on."""
    for name, current in originals.items():
        expected = edit.base.get(name, {}).get("sha256")
        if expected and tensor_sha256(current) != expected:
            message = (
                f"{name!r} in {where} differs from the weights the edit was made on (another checkpoint or a "
                "fine-tuned copy?); the edit may not do what it did there"
            )
            if strict:
                raise IncompatibleEditError(message + "; pass strict=False to apply it anyway")
            warnings.warn(message, SurgeryWarning, stacklevel=stacklevel + 1)


def _content_id(edit: Edit) -> str:
    import hashlib

    h = hashlib.sha256(f"{edit.layer}\0{edit.method}".encode())
    for name, t in sorted(edit.parameter_deltas().items()):
        h.update(name.encode())
        h.update(tensor_sha256(t).encode())
    return h.hexdigest()


def apply_edit(model: nn.Module, edit: EditSource, *, alpha: float = 1.0, strict: bool = False) -> EditHandle:
    """Add ``alpha`` times the edit's update to the model's weights, in place.

    Args:
        model: the model to patch.
        edit: an :class:`Edit` or the path of an edit file.
        alpha: strength; 1 applies the edit as computed.
        strict: raise instead of warning when the model's weights differ from those the edit was made on.

    Returns:
        An :class:`EditHandle` for :func:`revert_edit`.

    Raises:
        IncompatibleEditError: missing parameter, other shape, dtype or architecture (or, with
            ``strict``, other weights). Nothing is changed.
        EditFormatError: a bad edit file.
    """
    edit = as_edit(edit)
    planned = _plan(model, edit, alpha)
    state = _state(model)
    check_base(edit, {name: state.base.get(name, _parameter(model, name)) for name in planned}, strict)
    edit_id = _content_id(edit)
    if any(h.edit_id == edit_id for h in state.handles):
        warnings.warn(
            f"this edit of {edit.layer!r} is already applied to the model; applying it again stacks it",
            SurgeryWarning,
            stacklevel=2,
        )
    with torch.no_grad():
        for name, new in planned.items():
            p = _parameter(model, name)
            state.base.setdefault(name, p.detach().clone())
            p.copy_(new)
    handle = EditHandle(edit=edit, alpha=float(alpha), edit_id=edit_id)
    state.handles.append(handle)
    logger.info("applied %r (alpha=%g)", edit, alpha)
    return handle


def _revert_handle(model: nn.Module, handle: EditHandle) -> None:
    state = _state(model)
    if not handle.active or handle not in state.handles:
        raise SurgeryError("this edit handle is not active on this model (already reverted, or another model)")
    state.handles.remove(handle)
    handle.active = False
    with torch.no_grad():
        for name in handle.edit.parameter_deltas():
            p = _parameter(model, name)
            value = state.base[name]
            remaining = [h for h in state.handles if name in h.edit.parameter_deltas()]
            for h in remaining:  # re-apply, in order, the edits that stay, on the original bytes
                value = _combine(value, h.edit.parameter_deltas()[name], h.alpha)
            p.copy_(value)
            if not remaining:
                del state.base[name]


def revert_edit(model: nn.Module, target: EditHandle | EditSource, *, alpha: float = 1.0) -> bool:
    """Take an edit off the model.

    Through a handle (or an edit that is active on this model) the original bytes are restored exactly.
    An edit that this model has no handle for (say, applied in another process) is subtracted, and the
    result is compared with the base fingerprint recorded in the edit.

    Returns:
        True when every reverted parameter now has exactly its recorded base bytes (always, through a
        handle); False when the subtraction left rounding differences (logged as a warning).
    """
    if isinstance(target, EditHandle):
        _revert_handle(model, target)
        return True
    edit = as_edit(target)
    edit_id = _content_id(edit)
    active = [h for h in _state(model).handles if h.edit_id == edit_id]
    if active:
        _revert_handle(model, active[-1])
        return True
    planned = _plan(model, edit, alpha, sign=-1.0)
    with torch.no_grad():
        for name, new in planned.items():
            _parameter(model, name).copy_(new)
    expected = edit.base_fingerprints
    exact = all(tensor_sha256(_parameter(model, n)) == expected.get(n) for n in planned)
    if not exact:
        logger.warning(
            "reverted %r by subtraction; the weights differ from the recorded originals by rounding "
            "(or the edit was applied to other weights)",
            edit,
        )
    return exact


def list_edits(model: nn.Module) -> list[EditHandle]:
    """Handles of the edits active on ``model``, oldest first."""
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
        for h in reversed(applied):
            _revert_handle(model, h)
