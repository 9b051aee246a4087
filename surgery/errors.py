"""The one error hierarchy of model-surgery.

Every error the library raises on bad input is a :class:`SurgeryError`, and its message names the
problem and the fix.
"""

from __future__ import annotations

__all__ = [
    "SurgeryError",
    "LayerNotFoundError",
    "UnsupportedModelError",
    "ModelLoadError",
    "EditFormatError",
    "IncompatibleEditError",
    "SurgeryWarning",
    "InterferenceWarning",
]


class SurgeryError(Exception):
    """Base class of every error raised by model-surgery on bad input or state."""


class LayerNotFoundError(SurgeryError, KeyError):
    """A module or editable layer name does not exist in the model."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(SurgeryError):
    """The model (or one of its layers) has a shape the adapters cannot edit."""


class ModelLoadError(SurgeryError):
    """A model spec, checkpoint or set of pretrained weights could not be loaded."""


class EditFormatError(SurgeryError):
    """An edit file is not a valid model-surgery edit (truncated, corrupted, foreign or hostile)."""


class IncompatibleEditError(SurgeryError):
    """An edit does not fit the model or checkpoint it is applied to (names, shapes, dtypes, architecture)."""


class SurgeryWarning(UserWarning):
    """Something works but may not do what you expect (e.g. an edit applied to other weights)."""


class InterferenceWarning(SurgeryWarning):
    """An edit is applied on a weight that already carries an edit whose key direction overlaps its own,
    so the earlier rule may no longer hold (:func:`surgery.edits.interference.key_overlap`)."""
