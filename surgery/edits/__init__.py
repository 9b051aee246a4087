"""Edits: what an edit is, its file, patching a model with it and taking it off, and checkpoints.

:class:`~surgery.edits.edit.Edit` (factors or dense deltas, with provenance), its safetensors file
(:mod:`surgery.edits.file`, docs/edit-format.md), :func:`~surgery.edits.apply.apply_edit` /
:func:`~surgery.edits.apply.revert_edit` on a loaded model, and the same on checkpoint files
(:mod:`surgery.edits.on_checkpoints`); :func:`~surgery.edits.interference.key_overlap`, how much two edits
of one weight share a key direction (an overlapping stack warns on apply).
"""

from surgery.edits.apply import EditHandle, apply_edit, edited, list_edits, revert_edit
from surgery.edits.interference import key_overlap
from surgery.edits.on_checkpoints import apply_to_checkpoint, inspect_edit, revert_from_checkpoint
from surgery.edits.preflight import RevertReport
from surgery.edits.edit import Edit, Presence

__all__ = [
    "Edit",
    "Presence",
    "apply_edit",
    "revert_edit",
    "edited",
    "list_edits",
    "EditHandle",
    "RevertReport",
    "apply_to_checkpoint",
    "revert_from_checkpoint",
    "inspect_edit",
    "key_overlap",
]
