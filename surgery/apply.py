"""Patch a loaded model with edits in place, and take them off again (PEFT's merge / unmerge).

``apply_edit`` checks everything before it touches a weight: the parameter exists, shapes and dtypes
fit, the architecture matches, and the new values are finite. It keeps a copy of the original bytes of
every parameter it changes, so reverting through the returned handle restores them exactly; several
edits stack and can be reverted in any order (the remaining ones are re-applied on the original bytes).
Reverting an edit from a file, in a fresh process without a handle, first checks that the edit is on
the weights (the file records the original weights along the edit), then subtracts its update and
reports whether the result matches the base fingerprint recorded in the file.
"""

from __future__ import annotations

import hashlib
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

from .edit import Edit, Presence, architecture_id, tensor_sha256
from .errors import IncompatibleEditError, SurgeryError, SurgeryWarning

__all__ = [
    "EditHandle",
    "RevertReport",
    "apply_edit",
    "revert_edit",
    "edited",
    "list_edits",
    "as_edit",
    "content_id",
    "check_presence",
    "check_parameter",
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


def as_edit(source: EditSource) -> Edit:
    """An :class:`Edit` from an ``Edit`` or the path of an edit file."""
    if isinstance(source, Edit):
        return source
    if isinstance(source, (str, os.PathLike)):
        from .edit_file import load_edit

        return load_edit(Path(source))
    raise TypeError(f"expected an Edit or the path of an edit file, got {type(source).__name__}")


_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
_MAX_RELATIVE_UPDATE = 10.0


def _not_a_parameter(name: str, where: str, why: str) -> IncompatibleEditError:
    return IncompatibleEditError(
        f"the edit changes {name!r}, which in {where} is {why}; edits change only floating-point "
        "parameters (weights and biases), so this file was not made by model-surgery for this model"
    )


def _parameter(model: nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:
        buffers = dict(model.named_buffers())
        if name in buffers:
            raise _not_a_parameter(name, "the model", "a buffer (running statistics or a counter)") from None
        near = [n for n, _ in model.named_parameters() if n.rsplit(".", 2)[-2:] == name.rsplit(".", 2)[-2:]][:3]
        hint = f" Parameters with a similar name: {near}." if near else ""
        raise IncompatibleEditError(
            f"the model ({type(model).__name__}) has no parameter {name!r}, so the edit was made for "
            f"another architecture.{hint}"
        ) from None


def check_parameter(name: str, value: torch.Tensor, where: str) -> None:
    """Refuse tensors an edit must never change: integer tensors and BatchNorm statistics/counters."""
    if not value.is_floating_point():
        raise _not_a_parameter(name, where, f"an integer tensor ({str(value.dtype).removeprefix('torch.')})")
    if name.rsplit(".", 1)[-1] in _BUFFER_SUFFIXES:
        raise _not_a_parameter(name, where, "a BatchNorm buffer (running statistics or a counter)")


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


def _check_size(name: str, p: torch.Tensor, delta: torch.Tensor, alpha: float, strict: bool, stacklevel: int) -> None:
    """Warn (raise under ``strict``) when an update is far larger than the weight it changes."""
    w = float(p.detach().to(torch.float64).norm())
    d = abs(alpha) * float(delta.detach().to(torch.float64).norm())
    if w > 0 and d > _MAX_RELATIVE_UPDATE * w:
        message = (
            f"the edit's update of {name!r} is {d / w:.3g} times the norm of the weight it changes (more than "
            f"{_MAX_RELATIVE_UPDATE:g}x): a crafted or corrupted edit, or a far too large alpha"
        )
        if strict:
            raise IncompatibleEditError(message + "; nothing was changed")
        warnings.warn(message + "; pass strict=True (--strict) to refuse such edits", SurgeryWarning, stacklevel=stacklevel + 1)


def plan_update(
    lookup: Callable[[str], torch.Tensor],
    edit: Edit,
    alpha: float,
    sign: float = 1.0,
    where: str = "the model",
    *,
    strict: bool = False,
    stacklevel: int = 2,
) -> dict[str, torch.Tensor]:
    """New values of every parameter the edit changes, from their current values ``lookup(name)``.

    Shared by the in-memory model and checkpoints on disk: checks alpha, that every changed tensor is a
    floating-point parameter, shapes, dtypes, the update's size (when applying) and finiteness, and
    raises before anything is modified; ``lookup`` raises for a missing name.
    """
    if not math.isfinite(alpha):
        raise SurgeryError(f"alpha must be a finite number, got {alpha}")
    planned: dict[str, torch.Tensor] = {}
    for name, delta in edit.parameter_deltas().items():
        p = lookup(name)
        check_parameter(name, p, where)
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
        if sign > 0:
            _check_size(name, p, delta, alpha, strict, stacklevel + 1)
        new = _combine(p, delta, sign * alpha)
        if not torch.isfinite(new).all():
            raise SurgeryError(f"applying the edit would put non-finite values into {name!r}; nothing was changed")
        planned[name] = new
    return planned


def _plan(model: nn.Module, edit: Edit, alpha: float, sign: float = 1.0, strict: bool = False) -> dict[str, torch.Tensor]:
    """New values of every parameter of ``model`` the edit changes; raises before anything is modified."""
    if not math.isfinite(alpha):
        raise SurgeryError(f"alpha must be a finite number, got {alpha}")
    _check_architecture(model, edit)
    return plan_update(lambda name: _parameter(model, name), edit, alpha, sign, strict=strict, stacklevel=3)


def check_base(
    edit: Edit,
    originals: Mapping[str, torch.Tensor],
    strict: bool,
    stacklevel: int = 2,
    where: str = "the model",
    also: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Warn (or, under ``strict``, raise) when ``originals`` differ from the weights the edit was made on.

    ``also``: other acceptable values (on a checkpoint, the weights after the edits applied before
    this one, for an edit made on an already edited model).
    """
    for name, current in originals.items():
        expected = edit.base.get(name, {}).get("sha256")
        if not expected or tensor_sha256(current) == expected:
            continue
        if also is not None and name in also and tensor_sha256(also[name]) == expected:
            continue
        message = (
            f"{name!r} in {where} differs from the weights the edit was made on (another checkpoint or a "
            "fine-tuned copy?); the edit may not do what it did there"
        )
        if strict:
            raise IncompatibleEditError(message + "; pass strict=False to apply it anyway")
        warnings.warn(message, SurgeryWarning, stacklevel=stacklevel + 1)


def content_id(edit: Edit) -> str:
    """A digest of what an edit does (layer, method, every update's bytes): equal edits, equal ids."""
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
        strict: raise instead of warning when the model's weights differ from those the edit was made
            on, or when the update is more than 10 times larger than the weight it changes.

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
    edit_id = content_id(edit)
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


@dataclass(frozen=True)
class RevertReport:
    """What :func:`revert_edit` (and :func:`surgery.checkpoint.revert_from_checkpoint`) did.

    Truthy when the weights are now exactly the bytes the edit was made on.

    Attributes:
        exact: every reverted parameter has its original bytes (always, through a handle; for a revert by
            subtraction, when its SHA-256 equals the base fingerprint recorded in the edit).
        through_handle: the edit was active on this model, and its handle restored the saved bytes.
        found: how strongly the edit was found on the weights before the revert (by subtraction only;
            ``None`` through a handle, or for an edit that does not record its base along the edit).
        after: the same measurement after the revert: its ``strength`` is the deviation from the
            original weights along the edit (0 up to rounding when the revert undid the edit).
        forced: the revert went ahead although the checks failed (``force=True``).
    """

    exact: bool
    through_handle: bool
    found: Presence | None = None
    after: Presence | None = None
    forced: bool = False

    def __bool__(self) -> bool:
        return self.exact

    def describe(self) -> str:
        if self.through_handle:
            return "the original weights restored exactly (from the bytes saved at apply time)"
        if self.exact:
            return "the original weights restored exactly (SHA-256 of the base fingerprint)"
        deviation = "" if self.after is None else f"; along the edit they deviate by {self.after.describe()}"
        return (
            "restored within rounding: the weights differ from the originals' SHA-256 by float rounding "
            f"(each element within 1 ulp when the edit was applied once with this alpha){deviation}"
        )


def _expected(state: _State, name: str) -> torch.Tensor:
    """What parameter ``name`` holds while the active edits are applied: base + each, in order."""
    value = state.base[name]
    for h in state.handles:
        deltas = h.edit.parameter_deltas()
        if name in deltas:
            value = _combine(value, deltas[name], h.alpha)
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


_STRENGTH_SLACK = 0.1


def check_presence(
    edit: Edit, current: Mapping[str, torch.Tensor], alpha: float, *, force: bool, where: str, stacklevel: int = 2
) -> tuple[Presence | None, bool]:
    """Make sure the edit is on ``current`` at strength ``alpha`` before it is subtracted.

    The strength found must be within 10% of ``alpha`` (or rounding, when larger): other edits of the
    same layer applied as well move it a little; an edit that is not there, or is there at another
    strength, is refused (unless ``force``, which warns instead). Returns the measurement and whether
    the checks passed.
    """
    found = edit.presence(dict(current))
    if found is not None:
        slack = max(found.tolerance, _STRENGTH_SLACK * abs(alpha))
        if abs(found.strength - alpha) <= slack:
            if not found.clean:
                warnings.warn(
                    f"{where} also changed along the edit in another way ({found.describe()}): another edit of "
                    "the same layer applied as well? Only this edit is subtracted",
                    SurgeryWarning,
                    stacklevel=stacklevel + 1,
                )
            return found, True
    if found is None:
        message = (
            f"this edit does not record its original weights along the edit (an edit file of format version 1), "
            f"so it cannot be told whether it is applied to {where}"
        )
    elif abs(found.strength) <= max(found.tolerance, _STRENGTH_SLACK * abs(alpha)):
        message = (
            f"the edit is not applied to {where} (found at strength {found.strength:.3g}): subtracting it would "
            "change weights that never had it"
        )
    else:
        message = (
            f"the edit is on {where} at strength {found.strength:.4g}, not at the {alpha:g} asked for; revert it "
            f"with alpha={found.strength:.3g} (the --alpha it was applied with)"
            + ("" if found.clean else f", or its layer changed since ({found.describe()})")
        )
    if not force:
        raise SurgeryError(message + "; nothing was changed. Pass force=True (--force) to subtract it anyway")
    warnings.warn(message + "; subtracting it anyway (force)", SurgeryWarning, stacklevel=stacklevel + 1)
    return found, False


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
    edit_id = content_id(edit)
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
        for h in reversed(applied):  # always restored; a change made inside the block is reported
            _revert_handle(model, h, force=True, stacklevel=3)
