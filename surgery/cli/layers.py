"""``surgery layers MODEL``: the editable layers of a model, with their key and value shapes and whether
a skip connection bypasses each (``site``: ``residual`` or ``skip-free``)."""

from __future__ import annotations

import argparse
from typing import Any

from surgery.cli.args import add_model_args, format_shape
from surgery.inputs.preprocess import default_input_size
from surgery.layers import describe_layers, format_layer_table
from surgery.models.loading import load_model

__all__ = ["add_command"]


def _cmd_layers(args: argparse.Namespace) -> int:
    model = load_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained)
    size = (3, args.input_size, args.input_size) if args.input_size else default_input_size(model)
    infos = describe_layers(model, size)
    if args.blocks_only:
        infos = [i for i in infos if i.layer.post is not None]
    free = sum(1 for i in infos if not i.layer.skip)
    print(f"{args.model}: {len(infos)} editable layers, {free} skip-free (input {format_shape(tuple(size))})")
    print(format_layer_table(infos))
    return 0


def add_command(subparsers: Any) -> None:
    """Register ``layers``."""
    p = subparsers.add_parser("layers", help="list the editable layers of a model")
    add_model_args(p)
    p.add_argument("--input-size", type=int, help="square input size for the shape columns")
    p.add_argument("--blocks-only", action="store_true", help="only layers valued at a block's end")
    p.set_defaults(func=_cmd_layers)
