"""The ``surgery`` command line: one module per command in :mod:`surgery.cli`, shared options in
:mod:`surgery.cli.args`.

    surgery layers timm:resnet50              # table of editable layers
    surgery demo                              # edit the testbed VGG and compare with fine-tuning
    surgery demo --photos                     # the real EfficientNet-Lite0 on real photos
    surgery stats timm:resnet50 --layer layer3.1.conv3 --data val/ -o stats.safetensors
    surgery edit timm:resnet50 --layer layer3.1.conv3 --original x.png --transformed x2.png \\
        --stats stats.safetensors -o edit.safetensors
    surgery evaluate timm:resnet50 --edit edit.safetensors --data snowy/ --originals dry/ --clean val/
    surgery probe timm:resnet50 --data photos/ --masks masks/ --texture gravel
    surgery inspect edit.safetensors
    surgery apply model.safetensors edit.safetensors -o edited.safetensors
    surgery revert edited.safetensors edit.safetensors -o model_again.safetensors
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from surgery.cli import demo, edit, edit_files, evaluate, layers, probe, stats
from surgery.errors import SurgeryError

__all__ = ["build_parser", "main"]

COMMANDS = (layers, demo, stats, edit, evaluate, probe, edit_files)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``surgery`` command."""
    parser = argparse.ArgumentParser(
        prog="surgery",
        description="Edit a trained image classifier's prediction rules with rank-one weight updates.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_command(sub)
    return parser


def one_line(message: str) -> str:
    """A possibly multi-line error message on one line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    out = lines[0] if lines else ""
    for line in lines[1:]:
        out += (" " if out.endswith(":") else "; ") + line
    return out


def _check_single_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject ``--opt=--``: argparse strips the ``--`` and stores an empty list, unconverted."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = sub.choices[args.command]
    for action in command._actions:
        if action.type is not None and action.nargs is None and isinstance(getattr(args, action.dest, None), list):
            command.error(f"argument {'/'.join(action.option_strings)}: expected one value")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``surgery`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_single_values(parser, args)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe can still be told apart from an error
        return code
    except SurgeryError as e:
        print(f"surgery: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader stopped early (`surgery layers MODEL | head`): not an error; point stdout at devnull so
        # that the flush at exit does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
