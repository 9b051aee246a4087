"""The ``surgery`` command line.

    surgery layers timm:resnet50              # table of editable layers
    surgery layers open_clip:RN50 --input-size 224
    surgery demo                              # the real EfficientNet-Lite0 on real photos
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .errors import SurgeryError

__all__ = ["main", "build_parser"]

logger = logging.getLogger("surgery")


def _format_shape(shape: tuple[int, ...] | None) -> str:
    return "-" if shape is None else "x".join(str(d) for d in shape)


def format_layer_table(infos) -> str:
    """A plain-text table of :class:`surgery.LayerInfo` rows."""
    header = ("layer", "kind", "weight", "key", "value", "block")
    rows = [
        (
            i.layer.name,
            i.layer.kind,
            _format_shape(tuple(i.layer.weight.shape)),
            _format_shape(i.key_shape),
            _format_shape(i.value_shape),
            i.layer.block,
        )
        for i in infos
    ]
    widths = [max(len(str(r[c])) for r in (header, *rows)) for c in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in (header, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cmd_layers(args: argparse.Namespace) -> int:
    from .layers import describe_layers
    from .models import default_input_size, load_model

    model = load_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained)
    size = (3, args.input_size, args.input_size) if args.input_size else default_input_size(model)
    infos = describe_layers(model, size)
    if args.blocks_only:
        infos = [i for i in infos if i.layer.post is not None]
    print(f"{args.model}: {len(infos)} editable layers (input {_format_shape(tuple(size))})")
    print(format_layer_table(infos))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(top_k=args.top_k)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``surgery`` command."""
    parser = argparse.ArgumentParser(
        prog="surgery",
        description="Edit a trained image classifier's prediction rules with rank-one weight updates.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("layers", help="list the editable layers of a model")
    p.add_argument("model", help="torchvision:NAME, timm:NAME, open_clip:NAME or surgery:efficientnet_lite0")
    p.add_argument("--checkpoint", help="weights to load (.safetensors, or .pth read with weights_only=True)")
    p.add_argument("--pretrained", action="store_true", help="download pretrained weights (needs network)")
    p.add_argument("--input-size", type=int, help="square input size for the shape columns")
    p.add_argument("--blocks-only", action="store_true", help="only layers valued at a block's end")
    p.set_defaults(func=_cmd_layers)

    p = sub.add_parser("demo", help="the real EfficientNet-Lite0 on real photos, and its editable layers")
    p.add_argument("--top-k", type=int, default=3, help="predictions shown per photo")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``surgery`` console script."""
    args = build_parser().parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except SurgeryError as e:
        print(f"surgery: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
