"""Patch a loaded model with an :class:`Edit` in place, and take the patch off again.

``apply_edit`` keeps a copy of the original bytes of every parameter it changes, so reverting through
the returned handle restores them exactly. ``edited`` is a context manager that always restores.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .edit import Edit, tensor_sha256
from .errors import SurgeryError

__all__ = ["EditHandle", "apply_edit", "revert_edit", "edited", "list_edits"]

logger = logging.getLogger(__name__)

_REGISTRY_ATTR = "_surgery_edits"


@dataclass(eq=False)
class EditHandle:
    """What :func:`apply_edit` returns: the edit, its strength, and the original parameter bytes."""

    edit: Edit
    alpha: float
    originals: dict[str, torch.Tensor] = field(repr=False)
    active: bool = True


def _handles(model: nn.Module) -> list[EditHandle]:
    handles = model.__dict__.get(_REGISTRY_ATTR)
    if handles is None:
        handles = []
        model.__dict__[_REGISTRY_ATTR] = handles  # not a submodule/buffer: invisible to state_dict
    return handles


def _parameter(model: nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:
        raise SurgeryError(
            f"model {type(model).__name__} has no parameter {name!r}; was the edit made for another "
            "architecture? Check the names with dict(model.named_parameters())"
        ) from None


def apply_edit(model: nn.Module, edit: Edit, *, alpha: float = 1.0) -> EditHandle:
    """Add ``alpha`` times the edit's update to the model's weights, in place.

    Every parameter is checked (exists, same shape, finite update) before any is changed.
    """
    deltas = edit.parameter_deltas()
    planned: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name, delta in deltas.items():
        p = _parameter(model, name)
        if tuple(delta.shape) != tuple(p.shape):
            raise SurgeryError(
                f"edit update for {name!r} has shape {tuple(delta.shape)} but the model's parameter has "
                f"{tuple(p.shape)}; the edit was made for a different architecture"
            )
        new = (p.detach().to(torch.float64) + alpha * delta.detach().to(p.device, torch.float64)).to(p.dtype)
        if not torch.isfinite(new).all():
            raise SurgeryError(f"applying the edit would put non-finite values into {name!r}; nothing was changed")
        planned.append((p, new))
    expected = edit.base_fingerprints
    for name, p in zip(deltas, (p for p, _ in planned)):
        if name in expected and expected[name] != tensor_sha256(p):
            logger.warning("parameter %s differs from the weights the edit was made on", name)
    originals = {name: p.detach().clone() for name, (p, _) in zip(deltas, planned)}
    with torch.no_grad():
        for p, new in planned:
            p.copy_(new)
    handle = EditHandle(edit=edit, alpha=alpha, originals=originals)
    _handles(model).append(handle)
    return handle


def revert_edit(model: nn.Module, handle: EditHandle) -> None:
    """Restore the exact bytes the parameters had before ``handle``'s edit was applied.

    Only the most recent of several edits touching the same parameter restores exact bytes; reverting
    an older one subtracts its update instead.
    """
    handles = _handles(model)
    if not handle.active or handle not in handles:
        raise SurgeryError("this edit handle is not active on this model (already reverted?)")
    later = handles[handles.index(handle) + 1 :]
    touched_later = {n for h in later for n in h.originals}
    with torch.no_grad():
        for name, original in handle.originals.items():
            p = _parameter(model, name)
            if name in touched_later:
                d = handle.edit.parameter_deltas()[name].to(p.device, torch.float64)
                p.copy_((p.to(torch.float64) - handle.alpha * d).to(p.dtype))
                for h in later:  # later edits now sit on the restored base
                    if name in h.originals:
                        h.originals[name] = (h.originals[name].to(torch.float64) - handle.alpha * d.to(h.originals[name].device)).to(p.dtype)
                        break
            else:
                p.copy_(original)
    handle.active = False
    handles.remove(handle)


def list_edits(model: nn.Module) -> list[EditHandle]:
    """The handles of the edits applied to ``model``, oldest first."""
    return list(_handles(model))


@contextmanager
def edited(model: nn.Module, *edits: Edit, alpha: float = 1.0) -> Iterator[nn.Module]:
    """Apply ``edits`` for the duration of a ``with`` block and always restore the model."""
    applied: list[EditHandle] = []
    try:
        for e in edits:
            applied.append(apply_edit(model, e, alpha=alpha))
        yield model
    finally:
        for h in reversed(applied):
            revert_edit(model, h)
