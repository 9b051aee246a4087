"""``surgery stats``: the key statistics of a layer over a folder of clean images, as a file."""

from __future__ import annotations

import argparse
from typing import Any

from surgery._files import refuse_overwrite
from surgery.cli.args import (
    add_image_args,
    add_model_args,
    add_stats_args,
    inputs_of,
    model_from_args,
    model_transform,
    write,
)
from surgery.editable import EditableLayer
from surgery.inputs.batches import count_images
from surgery.inputs.images import ImageFolder
from surgery.stats import KeyStats, collect_key_stats

__all__ = ["add_command", "collect_from_folder"]


def collect_from_folder(
    model: Any, layer: str | EditableLayer | list[EditableLayer], args: argparse.Namespace, transform: Any
) -> tuple[KeyStats | dict[str, KeyStats], int | None]:
    """Key statistics of ``layer`` (or of a list of layers, in one pass) over the image folder ``args.data``;
    returns (stats, images read)."""
    folder = ImageFolder(args.data, transform)
    stats = collect_key_stats(
        model,
        layer,
        folder,
        max_images=args.max_images,
        batch_size=args.batch_size,
        device=args.device,
        cache_dir=args.cache_dir,
        progress=True,
    )
    return stats, count_images(folder, args.max_images)


def _cmd_stats(args: argparse.Namespace) -> int:
    refuse_overwrite(args.output, inputs_of(args, "data"), what="the statistics file")
    model = model_from_args(args)
    transform = model_transform(model, args.size)
    stats, images = collect_from_folder(model, args.layer, args, transform)
    write("key statistics", args.output, stats.save)
    print(f"{stats.layer}: {images} images, {stats.count} key vectors, n={stats.n} ({stats.dtype}) -> {args.output}")
    return 0


def add_command(subparsers: Any) -> None:
    """Register ``stats``."""
    p = subparsers.add_parser(
        "stats",
        help="collect the key statistics of a layer over a folder of images",
        description="Collect the second moment of a layer's keys over every image (recursively) of a "
        "folder, and write it as a safetensors file for `surgery edit --stats`.",
    )
    add_model_args(p)
    add_image_args(p)
    p.add_argument("--data", required=True, metavar="DIR", help="a folder of clean images (searched recursively)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the statistics file to write (.safetensors)")
    add_stats_args(p)
    p.set_defaults(func=_cmd_stats)

