"""The checks every apply and revert makes before touching a weight, on a model or on a checkpoint.

:func:`plan_update` computes the new values of the parameters an edit changes and refuses, before
anything is modified, tensors an edit must never change (buffers, counters, integer tensors), other
shapes or dtypes, non-finite results, and (warning, or refusing under ``strict``) updates far larger
than their weight. :func:`check_base` compares the weights with those the edit was made on;
:func:`check_presence` makes sure an edit is on the weights, at the given strength, before a revert
subtracts it; :class:`RevertReport` says what a revert did.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from surgery.edits.edit import Edit, Presence
from surgery.errors import IncompatibleEditError, SurgeryError, SurgeryWarning
from surgery.identity import tensor_sha256
from surgery.rank_one import add_scaled

__all__ = [
    "plan_update",
    "check_parameter",
    "check_base",
    "check_presence",
    "not_a_parameter",
    "RevertReport",
]


_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


_MAX_RELATIVE_UPDATE = 10.0


def not_a_parameter(name: str, where: str, why: str) -> IncompatibleEditError:
    return IncompatibleEditError(
        f"the edit changes {name!r}, which in {where} is {why}; edits change only floating-point "
        "parameters (weights and biases), so this file was not made by model-surgery for this model"
    )


def check_parameter(name: str, value: torch.Tensor, where: str) -> None:
    """Refuse tensors an edit must never change: integer tensors and BatchNorm statistics/counters."""
    if not value.is_floating_point():
        raise not_a_parameter(name, where, f"an integer tensor ({str(value.dtype).removeprefix('torch.')})")
    if name.rsplit(".", 1)[-1] in _BUFFER_SUFFIXES:
        raise not_a_parameter(name, where, "a BatchNorm buffer (running statistics or a counter)")


def _check_size(
    name: str, p: torch.Tensor, delta: torch.Tensor, alpha: float, made_here: Callable[[], bool], strict: bool, stacklevel: int
) -> None:
    """Warn (raise under ``strict``) when an update is far larger than it should be.

    An update made for other weights (or for none recorded) may be at most 10 times the norm of the weight.
    One made for exactly these weights (``made_here()``: their SHA-256 is the edit's base fingerprint, asked
    only for an update past 10 times the weight) is as large as its solver made it, and may be at most 10
    times that: a layer whose output a small layer scale multiplies (ConvNeXt's ``gamma`` after
    ``mlp.fc2``) takes legitimate updates of hundreds to tens of thousands of times its weight's norm
    (benchmarks/results/efficacy_ridge.md).
    """
    w = float(p.detach().to(torch.float64).norm())
    made = float(delta.detach().to(torch.float64).norm())
    d = abs(alpha) * made
    if w == 0 or d <= _MAX_RELATIVE_UPDATE * w:
        return
    if made_here():
        if d <= _MAX_RELATIVE_UPDATE * made:
            return
        why = f"at alpha {alpha:g} it is more than {_MAX_RELATIVE_UPDATE:g} times the update the edit was made as: a far too large alpha"
    else:
        why = (
            f"more than {_MAX_RELATIVE_UPDATE:g}x, and the edit was not made on these weights: a crafted edit, one "
            "made for other weights, or a far too large alpha"
        )
    message = f"the edit's update of {name!r} is {d / w:.3g} times the norm of the weight it changes ({why})"
    if strict:
        raise IncompatibleEditError(message + "; nothing was changed")
    warnings.warn(message + "; pass strict=True (--strict) to refuse such edits", SurgeryWarning, stacklevel=stacklevel + 1)


def _matches_base(expected: str | None, *weights: torch.Tensor | None) -> bool:
    """Whether one of ``weights`` has the SHA-256 ``expected`` (the edit's base fingerprint); each distinct
    tensor is hashed at most once, and none after a match."""
    if not expected:
        return False
    hashed: list[torch.Tensor] = []
    for w in weights:
        if w is None or any(w is h for h in hashed):
            continue
        hashed.append(w)
        if tensor_sha256(w) == expected:
            return True
    return False


def plan_update(
    lookup: Callable[[str], torch.Tensor],
    edit: Edit,
    alpha: float,
    sign: float = 1.0,
    where: str = "the model",
    *,
    strict: bool = False,
    stacklevel: int = 2,
    originals: Callable[[str], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """New values of every parameter the edit changes, from their current values ``lookup(name)``.

    Shared by the in-memory model and checkpoints on disk: checks alpha, that every changed tensor is a
    floating-point parameter, shapes, dtypes, the update's size (when applying) and finiteness, and
    raises before anything is modified; ``lookup`` raises for a missing name. ``originals(name)``: the
    weights before the edits this one is stacked on (the update's size is judged against the update its
    solver made when either they or the current weights are those the edit was made on).
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
            before = None if originals is None else originals(name)  # a lookup, no copy
            _check_size(name, p, delta, alpha, lambda: _matches_base(base.get("sha256"), p, before), strict, stacklevel + 1)
        new = add_scaled(p, delta, sign * alpha)
        if not torch.isfinite(new).all():
            raise SurgeryError(f"applying the edit would put non-finite values into {name!r}; nothing was changed")
        planned[name] = new
    return planned


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
        if not expected or _matches_base(expected, current, None if also is None else also.get(name)):
            continue
        message = (
            f"{name!r} in {where} differs from the weights the edit was made on (another checkpoint or a "
            "fine-tuned copy?); the edit may not do what it did there"
        )
        if strict:
            raise IncompatibleEditError(message + "; pass strict=False to apply it anyway")
        warnings.warn(message, SurgeryWarning, stacklevel=stacklevel + 1)


@dataclass(frozen=True)
class RevertReport:
    """What :func:`revert_edit` (and :func:`surgery.edits.on_checkpoints.revert_from_checkpoint`) did.

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
