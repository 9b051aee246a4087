"""Edits on checkpoints on disk: apply and revert edit files on a state dict, without the model class.

A checkpoint is a ``.safetensors`` file or a state dict saved with ``torch.save`` (read with
``weights_only=True``; see :func:`surgery.models.read_checkpoint`). Every edit is checked (names,
shapes, dtypes, finiteness of the result) before anything is written, and the output, in the input's
format, is written atomically: a temporary file in the output's folder, then a rename. The model's
architecture cannot be checked without its class; names and shapes are.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from surgery._files import atomic_write, refuse_overwrite
from surgery.edits.apply import EditSource, as_edit
from surgery.edits.preflight import RevertReport, check_base, check_presence, plan_update
from surgery.edits.edit import Edit
from surgery.edits.file import read_edit_metadata
from surgery.errors import IncompatibleEditError, SurgeryError, SurgeryWarning
from surgery.identity import content_id, tensor_sha256
from surgery.models.checkpoints import TORCH_SUFFIXES, read_checkpoint

__all__ = ["apply_to_checkpoint", "inspect_edit", "revert_from_checkpoint"]

logger = logging.getLogger(__name__)


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    raise SurgeryError(
        f"{str(path)!r} has an unknown checkpoint type {suffix!r}; use .safetensors or one of "
        f"{', '.join(TORCH_SUFFIXES)}"
    )


def _check_paths(checkpoint: Path, out: Path, overwrite: bool, edits: Sequence[Any] = ()) -> str:
    """The checkpoint's format; refuses an output of another format, an edit file, or the input itself."""
    fmt = _format_of(checkpoint)
    if _format_of(out) != fmt:
        raise SurgeryError(
            f"the output {str(out)!r} must have the checkpoint's format ({checkpoint.suffix}); the output is "
            "written in the same format as the input"
        )
    refuse_overwrite(out, [e for e in edits if isinstance(e, (str, os.PathLike))], what="the output checkpoint")
    same = out.resolve() == checkpoint.resolve() or (out.exists() and checkpoint.exists() and out.samefile(checkpoint))
    if same and not overwrite:
        raise SurgeryError(
            f"the output {str(out)!r} is the input checkpoint; write to another file, or pass overwrite=True "
            "(--overwrite) to replace it"
        )
    return fmt


def _read(checkpoint: Path, fmt: str) -> tuple[dict[str, Any], dict[str, str] | None]:
    """The state dict and, for safetensors, the file's metadata."""
    state = read_checkpoint(checkpoint)
    metadata = None
    if fmt == "safetensors":
        from safetensors import safe_open

        with safe_open(str(checkpoint), framework="pt") as f:
            metadata = f.metadata()
    return state, metadata


def _lookup(state: Mapping[str, Any], where: str):
    def lookup(name: str) -> torch.Tensor:
        value = state.get(name)
        if value is None:
            near = difflib.get_close_matches(name, [k for k in state if isinstance(k, str)], n=3)
            hint = f" Similar names: {near}." if near else ""
            raise IncompatibleEditError(
                f"{where} has no tensor {name!r}, so the edit was made for another architecture.{hint}"
            )
        if not isinstance(value, torch.Tensor):
            raise IncompatibleEditError(f"{where}: {name!r} is a {type(value).__name__}, not a tensor")
        return value

    return lookup


def _write(out: Path, fmt: str, state: Mapping[str, Any], metadata: dict[str, str] | None) -> None:
    if fmt == "safetensors":
        from safetensors.torch import save_file

        tensors = {k: v.contiguous() for k, v in state.items()}

        def write(tmp: str) -> None:
            save_file(tensors, tmp, metadata=metadata)

    else:
        plain = dict(state)

        def write(tmp: str) -> None:
            torch.save(plain, tmp)

    try:
        atomic_write(out, write)
    except OSError as e:
        raise SurgeryError(f"cannot write the checkpoint {str(out)!r}: {e}") from None


def _edits(edits: EditSource | Sequence[EditSource]) -> list[Edit]:
    if isinstance(edits, (Edit, str, os.PathLike)):
        edits = [edits]
    loaded = [as_edit(e) for e in edits]
    if not loaded:
        raise SurgeryError("no edit to apply; give at least one edit file")
    return loaded


def apply_to_checkpoint(
    checkpoint: str | os.PathLike[str],
    edits: EditSource | Sequence[EditSource],
    out: str | os.PathLike[str],
    *,
    alpha: float = 1.0,
    strict: bool = False,
    overwrite: bool = False,
) -> list[str]:
    """Apply edits, in order, to a checkpoint on disk and write the result to ``out``.

    The output has the input's format: safetensors (its metadata kept) or a ``torch.save`` of the
    plain state dict (a wrapper such as ``{"state_dict": ...}`` is dropped). In both, a ``module.`` or
    ``_orig_mod.`` prefix on every key is dropped, as :func:`surgery.models.read_checkpoint` does.

    Args:
        checkpoint: a ``.safetensors`` or ``.pth``/``.pt``/``.bin``/``.ckpt`` state dict.
        edits: one or more :class:`Edit` or edit files, applied in order (they stack).
        out: the file to write; must differ from ``checkpoint`` unless ``overwrite``.
        alpha: strength of every edit.
        strict: raise instead of warning when the checkpoint's weights differ from those an edit was
            made on, or an update is oversized (as :func:`~surgery.edits.apply.apply_edit` says).
        overwrite: allow ``out`` to be ``checkpoint`` (replaced atomically).

    Returns:
        The names of the tensors that changed.

    Raises:
        IncompatibleEditError: a missing tensor, another shape or dtype (or, under ``strict``, other
            weights or an oversized update). Nothing is written.
        EditFormatError: a bad edit file. ModelLoadError: an unreadable or pickled checkpoint.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    sources = [edits] if isinstance(edits, (Edit, str, os.PathLike)) else list(edits)
    fmt = _check_paths(checkpoint, out, overwrite, sources)
    if not math.isfinite(alpha):
        raise SurgeryError(f"alpha must be a finite number, got {alpha}")
    loaded = _edits(edits)
    state, metadata = _read(checkpoint, fmt)
    where = f"checkpoint {str(checkpoint)!r}"
    current = dict(state)
    seen: set[str] = set()
    for edit in loaded:
        planned = plan_update(
            _lookup(current, where), edit, alpha, where=where, strict=strict, stacklevel=3, originals=_lookup(state, where)
        )
        check_base(edit, {name: state[name] for name in planned}, strict, where=where, also=current)
        edit_id = content_id(edit.layer, edit.method, edit.parameter_deltas())
        if edit_id in seen:
            warnings.warn(
                f"the edit of {edit.layer!r} is given twice; applying it again stacks it", SurgeryWarning, stacklevel=2
            )
        seen.add(edit_id)
        current.update(planned)
    changed = [name for name in state if current[name] is not state[name] and not torch.equal(current[name], state[name])]
    _write(out, fmt, current, metadata)
    logger.info("applied %d edit(s) to %s -> %s (%s)", len(loaded), checkpoint, out, ", ".join(changed) or "nothing changed")
    return changed


def revert_from_checkpoint(
    checkpoint: str | os.PathLike[str],
    edit: EditSource,
    out: str | os.PathLike[str],
    *,
    alpha: float = 1.0,
    overwrite: bool = False,
    force: bool = False,
) -> RevertReport:
    """Subtract an edit from a checkpoint on disk and write the result to ``out`` (see
    :func:`apply_to_checkpoint` for the formats).

    The edit must be on the checkpoint at strength ``alpha``: the edit file records its original
    weights along the edit, so reverting an edit that was never applied, was applied with another
    ``alpha``, or whose layer was changed since (e.g. by another edit of the same layer applied after
    it) raises before anything is written; ``force=True`` subtracts it anyway.

    Returns:
        A :class:`~surgery.edits.preflight.RevertReport`: truthy when every reverted tensor has exactly the bytes
        the edit was made on (its base fingerprint); otherwise float rounding left differences (each
        element within 1 ulp), and ``report.after`` measures the deviation along the edit.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    fmt = _check_paths(checkpoint, out, overwrite, [edit])
    edit = as_edit(edit)
    state, metadata = _read(checkpoint, fmt)
    where = f"checkpoint {str(checkpoint)!r}"
    planned = plan_update(_lookup(state, where), edit, alpha, sign=-1.0, where=where)
    found, passed = check_presence(
        edit, {name: state[name] for name in planned}, alpha, force=force, where=where, stacklevel=3
    )
    expected = edit.base_fingerprints
    exact = all(tensor_sha256(new) == expected.get(name) for name, new in planned.items())
    _write(out, fmt, {**state, **planned}, metadata)
    report = RevertReport(
        exact=exact,
        through_handle=False,
        found=found,
        after=edit.presence(planned),
        forced=not passed,
    )
    logger.info("reverted %r from %s: %s", edit, checkpoint, report.describe())
    return report


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def inspect_edit(path: str | os.PathLike[str]) -> str:
    """A readable summary of an edit file: metadata, factor shapes and norms, rank, and sizes."""
    path = Path(path)
    edit = Edit.load(path)
    meta = read_edit_metadata(path)
    file_size = path.stat().st_size
    kind = f"factored, rank {edit.rank}" if edit.factored else "dense"
    lines = [
        f"edit file:     {path} ({_size(file_size)})",
        (
            f"format:        {meta['format']} version {meta['format_version']}, written by model-surgery "
            f"{meta.get('library_version', '?')}"
        ),
        f"layer:         {edit.layer}" if not edit.span else f"layers:        {', '.join(edit.layers)} (a span edit)",
        f"method:        {edit.method} ({kind})",
        f"architecture:  {edit.architecture or '-'}",
        f"created:       {edit.created or '-'}",
    ]
    if edit.description:
        lines.append(f"description:   {edit.description}")
    dense_bytes = 0
    for name, delta in edit.parameter_deltas().items():
        rec = edit.base.get(name, {})
        dtype = rec.get("dtype", str(delta.dtype).removeprefix("torch."))
        as_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else None
        itemsize = as_dtype.itemsize if isinstance(as_dtype, torch.dtype) else delta.element_size()
        dense_bytes += delta.numel() * itemsize
        lines.append(
            f"parameter:     {name} {_shape(rec.get('shape', delta.shape))} {dtype}, "
            f"base sha256 {str(rec.get('sha256', '?'))[:16]}..."
        )
        lines.append(f"  update:      norm {float(delta.double().norm()):.6g}")
        for label, t in zip(("lambda", "u"), edit.factors().get(name, ())):
            norms = ", ".join(f"{float(x):.6g}" for x in t.double().flatten(1).norm(dim=1))
            lines.append(
                f"  {label + ':':<12} {_shape(t.shape)} {str(t.dtype).removeprefix('torch.')}, row norms {norms}"
            )
    if not edit.factored:
        for name, delta in edit.deltas.items():
            lines.append(f"  delta:       {name} {_shape(delta.shape)} {str(delta.dtype).removeprefix('torch.')}")
    lines.append(
        "revert check:  the original weights along the edit are recorded"
        if edit.base_along
        else "revert check:  none (the original weights along the edit are not recorded; reverts need --force)"
    )
    ratio = f" ({100.0 * file_size / dense_bytes:.2f}% of it)" if dense_bytes else ""
    lines.append(
        f"size:          {_size(file_size)} on disk; the dense update it encodes is {_size(dense_bytes)}{ratio}"
    )
    for label, value in (("hparams", edit.hparams), ("info", edit.info)):
        if value:
            lines.append(f"{label + ':':<14} {json.dumps(value, sort_keys=True, default=str)}")
    return "\n".join(lines)
