"""The ``surgery inspect``, ``surgery apply`` and ``surgery revert`` commands (edit files on checkpoints).

    surgery inspect edit.safetensors
    surgery apply model.safetensors edit1.safetensors edit2.safetensors -o edited.safetensors
    surgery revert edited.safetensors edit2.safetensors -o model_again.safetensors

:func:`add_commands` registers them on the ``surgery`` parser's subparsers; every command function
returns the exit status and lets :class:`~surgery.errors.SurgeryError` propagate to ``main``.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .errors import SurgeryWarning

__all__ = ["add_commands"]


@contextmanager
def _warnings_on_stderr() -> Iterator[None]:
    """Show :class:`SurgeryWarning` as ``surgery: warning: ...`` lines; other warnings pass through."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SurgeryWarning)
        try:
            yield
        finally:
            for w in caught:
                if issubclass(w.category, SurgeryWarning):
                    print(f"surgery: warning: {w.message}", file=sys.stderr)
                else:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .checkpoint import inspect_edit

    print(inspect_edit(args.edit))
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    from .checkpoint import apply_to_checkpoint

    with _warnings_on_stderr():
        changed = apply_to_checkpoint(
            args.checkpoint, args.edits, args.output, alpha=args.alpha, strict=args.strict, overwrite=args.overwrite
        )
    print(
        f"applied {len(args.edits)} edit(s) (alpha={args.alpha:g}) to {args.checkpoint}: "
        f"{', '.join(changed) or 'nothing'} changed -> {args.output}"
    )
    return 0


def _cmd_revert(args: argparse.Namespace) -> int:
    from .checkpoint import revert_from_checkpoint

    with _warnings_on_stderr():
        exact = revert_from_checkpoint(
            args.checkpoint, args.edit, args.output, alpha=args.alpha, overwrite=args.overwrite
        )
    how = (
        "the original weights restored exactly"
        if exact
        else "the result differs from the original weights by rounding (or the edit was not applied to them)"
    )
    print(f"reverted {args.edit} from {args.checkpoint}: {how} -> {args.output}")
    return 0


def add_commands(subparsers: Any) -> None:
    """Register ``inspect``, ``apply`` and ``revert`` on the ``surgery`` parser's subparsers."""
    p = subparsers.add_parser(
        "inspect",
        help="show an edit file's metadata, factors and size",
        description="Validate an edit file and summarize it: metadata, factor shapes and norms, rank, "
        "its size and the size of the dense update it encodes.",
    )
    p.add_argument("edit", help="the edit file (.safetensors)")
    p.set_defaults(func=_cmd_inspect)

    p = subparsers.add_parser(
        "apply",
        help="apply edit files to a checkpoint and write the edited checkpoint",
        description="Apply one or more edit files, in order, to a checkpoint (.safetensors, or a state "
        "dict saved with torch.save, read with weights_only=True) and write the result, in the same "
        "format, atomically. Every edit is checked before anything is written.",
    )
    p.add_argument("checkpoint", help="the checkpoint to edit (.safetensors or .pth)")
    p.add_argument("edits", nargs="+", metavar="EDIT", help="edit files, applied in order")
    p.add_argument("-o", "--output", required=True, help="the checkpoint to write (same format as the input)")
    p.add_argument("--alpha", type=_finite_float, default=1.0, help="strength of every edit (default 1)")
    p.add_argument("--strict", action="store_true", help="refuse weights other than those the edits were made on")
    p.add_argument("--overwrite", action="store_true", help="allow the output to be the input checkpoint")
    p.set_defaults(func=_cmd_apply)

    p = subparsers.add_parser(
        "revert",
        help="take an edit file off a checkpoint and write the result",
        description="Subtract an edit from a checkpoint and write the result atomically, reporting "
        "whether the original weights (the edit's base fingerprint) were restored exactly.",
    )
    p.add_argument("checkpoint", help="the edited checkpoint (.safetensors or .pth)")
    p.add_argument("edit", help="the edit file to take off")
    p.add_argument("-o", "--output", required=True, help="the checkpoint to write (same format as the input)")
    p.add_argument("--alpha", type=_finite_float, default=1.0, help="the strength it was applied with (default 1)")
    p.add_argument("--overwrite", action="store_true", help="allow the output to be the input checkpoint")
    p.set_defaults(func=_cmd_revert)
