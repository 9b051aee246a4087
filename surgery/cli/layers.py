"""``surgery layers MODEL``: the editable layers of a model, with their key and value shapes and whether
a skip connection bypasses each (``site``: ``residual`` or ``skip-free``).

With exemplars (``--original``/``--transformed``, optionally ``--mask`` and ``--data``), it measures
where to edit instead: :func:`surgery.evaluation.layer_ranking.rank_layers` gives each of the model's
first candidate layers the default edit and ranks them by how far it moves the left-out exemplars'
logits toward their originals'.
"""

from __future__ import annotations

import argparse
from typing import Any

from torch.utils.data import Subset

from surgery.cli.args import (
    add_device_arg,
    add_exemplar_args,
    add_model_args,
    check_exemplars,
    format_shape,
    model_from_args,
    model_transform,
    positive_int,
)
from surgery.cli.edit import masks_for_inputs
from surgery.errors import SurgeryError
from surgery.evaluation.layer_ranking import rank_layers, recommended_layers
from surgery.inputs.batches import count_images
from surgery.inputs.images import ImageFolder, load_images
from surgery.inputs.preprocess import Preprocess, default_input_size
from surgery.layers import describe_layers, format_layer_table, format_table, site_kind

__all__ = ["add_command"]


def _cmd_layers(args: argparse.Namespace) -> int:
    model = model_from_args(args)
    if args.original is not None or args.transformed is not None:
        return _rank(model, args)
    if args.mask is not None or args.data is not None:
        raise SurgeryError("--mask and --data rank layers on exemplars: pass --original and --transformed too")
    size = (3, args.input_size, args.input_size) if args.input_size else default_input_size(model)
    infos = describe_layers(model, size)
    if args.blocks_only:
        infos = [i for i in infos if i.layer.post is not None]
    free = sum(1 for i in infos if not i.layer.skip)
    print(f"{args.model}: {len(infos)} editable layers, {free} skip-free (input {format_shape(tuple(size))})")
    print(format_layer_table(infos))
    return 0


def _rank(model: Any, args: argparse.Namespace) -> int:
    """The measured ranking of the model's first ``--pool`` candidate layers on the exemplars."""
    check_exemplars(args)
    if args.blocks_only:
        raise SurgeryError("--blocks-only lists layers; with exemplars the candidates are the adapter's, so drop it")
    transform = model_transform(model, args.input_size)
    x = load_images(args.original, transform)
    x2 = load_images(args.transformed, transform)
    masks = None
    if args.mask is not None:
        masks = masks_for_inputs(args.mask, args.original, Preprocess.from_model(model), args.input_size)
    data, images = None, 0
    if args.data is not None:
        data = ImageFolder(args.data, transform)
        images = count_images(data, args.max_images)
        if args.max_images is not None:
            data = Subset(data, range(images))
    candidates = recommended_layers(model, k=args.pool)  # the family's order: the first --pool candidates
    ranked = rank_layers(model, x, x2, masks, layers=candidates, data=data, progress=True)
    stats = f"key statistics from {images} images of {args.data}" if data is not None else (
        "key statistics: the originals' own keys plus a 1% ridge (pass --data DIR of clean images for real ones)"
    )
    print(f"{args.model}: {len(ranked)} candidate layers measured on {len(args.original)} exemplar(s); {stats}")
    rows = [(i + 1, layer.name, site_kind(layer), f"{ratio:.3f}") for i, (layer, ratio) in enumerate(ranked)]
    print(format_table(("rank", "layer", "site", "logit distance left"), rows))
    print(
        "logit distance left: the left-out exemplars' logit distance to their originals' with the layer's default "
        "edit, over the distance before (lower is better; 1.000: the edit moves nothing)"
    )
    return 0


def add_command(subparsers: Any) -> None:
    """Register ``layers``."""
    p = subparsers.add_parser(
        "layers",
        help="list the editable layers of a model, or rank them on exemplars",
        description="List the editable layers of a model. With --original and --transformed exemplars, "
        "measure instead where an edit moves them most: each candidate layer gets the default edit, fitted "
        "on all exemplars but one and scored on the one left out.",
    )
    add_model_args(p)
    p.add_argument(
        "--input-size", type=positive_int,
        help="square input size for the shape columns (with exemplars: the size the images are cropped to)",
    )
    p.add_argument("--blocks-only", action="store_true", help="only layers valued at a block's end")
    add_device_arg(p)
    ranking = p.add_argument_group("ranking the candidate layers on exemplars")
    add_exemplar_args(ranking, required=False)
    ranking.add_argument("--data", metavar="DIR", help="a folder of clean images for the edits' key statistics")
    ranking.add_argument("--max-images", type=positive_int, help="use at most this many images of the folder")
    ranking.add_argument(
        "--pool", type=positive_int, default=12, help="how many of the model's candidate layers to measure (default 12)"
    )
    p.set_defaults(func=_cmd_layers)
