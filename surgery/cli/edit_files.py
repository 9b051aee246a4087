"""The ``surgery inspect``, ``surgery apply`` and ``surgery revert`` commands (edit files on checkpoints).

    surgery inspect edit.safetensors
    surgery apply model.safetensors edit1.safetensors edit2.safetensors -o edited.safetensors
    surgery revert edited.safetensors edit2.safetensors -o model_again.safetensors

:func:`add_commands` registers them on the ``surgery`` parser's subparsers; every command function
returns the exit status and lets :class:`~surgery.errors.SurgeryError` propagate to ``main``.
"""

from __future__ import annotations

import argparse
from typing import Any

from surgery.cli.args import finite_float, warnings_on_stderr
from surgery.edits.apply import as_edit, edit_identity
from surgery.edits.interference import describe_edit, warn_interference
from surgery.edits.on_checkpoints import apply_to_checkpoint, inspect_edit, revert_from_checkpoint
from surgery.errors import SurgeryError

__all__ = ["add_command"]


def _cmd_inspect(args: argparse.Namespace) -> int:
    print(inspect_edit(args.edit))
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    if args.alpha == 0.0:
        raise SurgeryError("--alpha 0 applies nothing; nothing was written. Give the strength to apply (default 1)")
    with warnings_on_stderr():
        changed = apply_to_checkpoint(
            args.checkpoint, args.edits, args.output, alpha=args.alpha, strict=args.strict, overwrite=args.overwrite
        )
        # A checkpoint records no edits applied to it before; the stack checked is this command's edits.
        stack = [as_edit(path) for path in args.edits]
        ids = [edit_identity(e) for e in stack]
        for i, edit in enumerate(stack):  # an edit given twice has its own warning
            warn_interference([e for e, id_ in zip(stack[:i], ids) if id_ != ids[i]], edit)
    what = f"{', '.join(changed)} changed" if changed else "no tensor changed (the updates round away)"
    print(f"applied {len(args.edits)} edit(s) (alpha={args.alpha:g}) to {args.checkpoint}: {what} -> {args.output}")
    if len(stack) > 1:
        for i, (path, edit) in enumerate(zip(args.edits, stack), 1):
            print(f"  {i}. {describe_edit(edit)} from {path}")
    return 0


def _cmd_revert(args: argparse.Namespace) -> int:
    if args.alpha == 0.0:
        raise SurgeryError("--alpha 0 reverts nothing; nothing was written. Give the strength the edit was applied with")
    with warnings_on_stderr():
        report = revert_from_checkpoint(
            args.checkpoint, args.edit, args.output, alpha=args.alpha, overwrite=args.overwrite, force=args.force
        )
    print(f"reverted {args.edit} from {args.checkpoint}: {report.describe()} -> {args.output}")
    return 0


def add_command(subparsers: Any) -> None:
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
        "format, atomically. Every edit is checked before anything is written. Several edits are listed "
        "in the order they were applied, with a warning where a later one's key direction overlaps an "
        "earlier one's on the same weight (the earlier rule may no longer hold); a checkpoint does not "
        "record edits applied to it before, so only the edits of one command are compared.",
    )
    p.add_argument("checkpoint", help="the checkpoint to edit (.safetensors or .pth)")
    p.add_argument("edits", nargs="+", metavar="EDIT", help="edit files, applied in order")
    p.add_argument("-o", "--output", required=True, help="the checkpoint to write (same format as the input)")
    p.add_argument("--alpha", type=finite_float, default=1.0, help="strength of every edit (default 1)")
    p.add_argument("--strict", action="store_true", help="refuse weights other than those the edits were made on, and oversized updates")
    p.add_argument("--overwrite", action="store_true", help="allow the output to be the input checkpoint")
    p.set_defaults(func=_cmd_apply)

    p = subparsers.add_parser(
        "revert",
        help="take an edit file off a checkpoint and write the result",
        description="Subtract an edit from a checkpoint and write the result atomically. The edit must be on "
        "the checkpoint at the given strength (the edit file records the original weights along the edit); "
        "the result is within float rounding of the original weights (each element within 1 ulp), and "
        "exactly them when the base fingerprint matches.",
    )
    p.add_argument("checkpoint", help="the edited checkpoint (.safetensors or .pth)")
    p.add_argument("edit", help="the edit file to take off")
    p.add_argument("-o", "--output", required=True, help="the checkpoint to write (same format as the input)")
    p.add_argument("--alpha", type=finite_float, default=1.0, help="the strength it was applied with (default 1)")
    p.add_argument("--overwrite", action="store_true", help="allow the output to be the input checkpoint")
    p.add_argument(
        "--force", action="store_true",
        help="subtract the edit even when the checkpoint does not hold it at this strength (not applied, "
        "applied with another --alpha, or its layer changed since)",
    )
    p.set_defaults(func=_cmd_revert)
