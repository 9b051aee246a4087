"""``surgery edit``: compute a rank-one edit from exemplar images and write it to a file."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from surgery._files import refuse_overwrite
from surgery.cli.args import (
    add_exemplar_args,
    add_image_args,
    add_model_args,
    add_stats_args,
    check_exemplars,
    check_files,
    inputs_of,
    model_from_args,
    model_transform,
    nonnegative_float,
    positive_float,
    positive_int,
    write,
)
from surgery.cli.stats import collect_from_folder
from surgery.editable import EditableLayer
from surgery.errors import SurgeryError
from surgery.inputs.images import load_images
from surgery.inputs.masks import load_masks
from surgery.inputs.preprocess import Preprocess
from surgery.layers import get_layer
from surgery.rewrite import rewrite
from surgery.stats import KeyStats, weights_fingerprint

__all__ = ["add_command", "masks_for_inputs"]

logger = logging.getLogger("surgery")


def masks_for_inputs(mask_paths: Sequence[str], image_paths: Sequence[str], pre: Preprocess, size: int | None) -> torch.Tensor:
    """Masks ``(N, 1, S, S)`` drawn on their images, through the images' resize and crop.

    A mask of its image's shape but another size is resized to it (with a logged warning); one of
    another shape is an error.
    """
    out = []
    for mask_path, image_path in zip(mask_paths, image_paths):
        try:
            with Image.open(image_path) as im:
                w, h = im.size
            with Image.open(mask_path) as im:
                mw, mh = im.size
        except OSError as e:
            raise SurgeryError(f"cannot read {image_path!r} or {mask_path!r} as an image ({e})") from None
        mask = load_masks(mask_path, size=(h, w))
        if (mw, mh) != (w, h):
            logger.warning("mask %s is %dx%d; resized to its image's %dx%d", mask_path, mw, mh, w, h)
        out.append(pre.mask_pixels(mask, size))
    return torch.cat(out)


def _check_stats_weights(model: Any, layer: EditableLayer, stats: KeyStats, path: str, transform: Any, image: str) -> None:
    """Warn when the statistics were collected on other weights upstream of the layer."""
    if not stats.fingerprint:
        return
    if weights_fingerprint(model, layer, load_images([image], transform)) != stats.fingerprint:
        logger.warning(
            "the key statistics in %s were collected on a model whose weights up to %s differ from this one's "
            "(another checkpoint, or random weights?); recompute them with `surgery stats` unless this is intended",
            path,
            layer.name,
        )


def _cmd_edit(args: argparse.Namespace) -> int:
    originals, transformed, masks = args.original, args.transformed, args.mask
    check_exemplars(args)
    if args.use_mask and masks is None:
        raise SurgeryError("--use-mask needs masks: pass --mask with one mask per exemplar")
    if args.stats is not None:
        if len(args.stats) != len(args.layer):
            raise SurgeryError(
                f"{len(args.stats)} --stats file(s) for {len(args.layer)} --layer(s): give one statistics file per "
                "layer, in the same order"
            )
        check_files(args.stats, "--stats")
    refuse_overwrite(args.output, inputs_of(args, "original", "transformed", "mask", "stats", "data"), what="the edit file")

    model = model_from_args(args)
    transform = model_transform(model, args.size)
    layers = [get_layer(model, name) for name in args.layer]  # fail on a bad layer name before any long computation
    stats: dict[str, KeyStats] = {}
    if args.stats is not None:
        for i, layer in enumerate(layers):
            stats[layer.name] = KeyStats.load(args.stats[i])
            if stats[layer.name].layer != layer.name:
                raise SurgeryError(
                    f"the key statistics in {args.stats[i]!r} are of layer {stats[layer.name].layer!r}, not "
                    f"{layer.name!r}; compute them with: surgery stats {args.model} --layer {layer.name} --data DIR -o FILE"
                )
            _check_stats_weights(model, layer, stats[layer.name], args.stats[i], transform, transformed[0])
    else:  # every layer's statistics from one pass over the folder
        stats, images = collect_from_folder(model, layers, args, transform)  # a list: {layer: KeyStats}
        for name, one in stats.items():
            print(f"{name}: key statistics from {images} images, {one.count} key vectors, n={one.n}")

    mask_tensor = None if masks is None else masks_for_inputs(masks, originals, Preprocess.from_model(model), args.size)
    edit = rewrite(
        model, [layer.name for layer in layers] if len(layers) > 1 else layers[0], originals, transformed, mask_tensor,
        stats=stats if len(layers) > 1 else stats[layers[0].name], solver=args.solver, loss=args.loss,
        use_mask=args.use_mask, ridge=args.ridge, steps=args.steps, lr=args.lr, rank=args.rank,
        transform=transform, progress=True if args.solver == "reference" else None,
    )
    if args.description is not None:
        edit.description = args.description
    if edit.factored and not any(bool(lam.abs().max() > 0) for lam, _ in edit.factors().values()):
        raise SurgeryError(
            f"the edit of {' + '.join(edit.layers)} is zero, so it would change nothing; nothing was written. The block's "
            "value does not depend on this layer's weight along the edit direction (a zero-initialised "
            "BatchNorm after it, as timm ResNets have with random weights, or exemplars whose keys do not "
            "differ there): check the weights (--checkpoint/--pretrained) or edit another layer"
        )
    info = edit.info
    print(
        f"edit {' + '.join(edit.layers)}: {len(originals)} exemplar(s), {edit.hparams['solver']} solver, "
        f"{args.loss} loss, rank {args.rank}"
    )
    for part in info.get("layers", [info]):  # a span edit reports each layer's solve
        before, after = float(part["objective_before"]), float(part["objective"])
        change = f" ({100.0 * (after - before) / before:+.1f}%)" if before > 0 else ""
        print(f"objective{' of ' + part['layer'] if 'layer' in part else ''}: {before:.6g} -> {after:.6g}{change}")
    if edit.span:
        gaps = info["gap_at_last"]
        print(f"mean |gap| at {edit.layers[-1]}: {gaps[0]:.6g} -> {gaps[-1]:.6g}")
    norm = sum(float(lam.norm()) ** 2 for lam, _ in edit.factors().values()) ** 0.5 if edit.factored else float(edit.delta().norm())
    print(
        f"||lam|| = {norm:.6g}, solver {float(info.get('seconds', 0.0)):.3f} s "
        f"(total {float(info.get('seconds_total', 0.0)):.3f} s)"
    )
    write("edit", args.output, edit.save)
    print(f"wrote {args.output}")
    return 0


def add_command(subparsers: Any) -> None:
    """Register ``edit``."""
    p = subparsers.add_parser(
        "edit",
        help="compute a rank-one edit from exemplars and write it to a file",
        description="Compute the rank-one edit of a layer that makes the model see the transformed "
        "exemplars as it sees the originals, and write it as a safetensors file.",
    )
    add_model_args(p)
    add_image_args(p, span=True)
    add_exemplar_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--stats", nargs="+", metavar="FILE", help="key statistics written by `surgery stats`, one per --layer, in order"
    )
    source.add_argument("--data", metavar="DIR", help="a folder of clean images to compute the key statistics from")
    p.add_argument("--solver", choices=("fast", "reference"), default="fast", help="default: fast")
    p.add_argument("--loss", choices=("l1", "l2"), default="l1", help="default: l1 (the paper's)")
    p.add_argument("--use-mask", action="store_true", help="weight the loss by the masks")
    p.add_argument("--rank", type=positive_int, default=1, help="number of directions (default 1)")
    p.add_argument("--ridge", type=nonnegative_float, help="fast solver: ridge on lambda (weaker edit; default 0)")
    p.add_argument(
        "--steps", type=positive_int,
        help="reference solver: Adam steps (default 20000); fast solver: most Gauss-Newton iterations",
    )
    p.add_argument("--lr", type=positive_float, help="reference solver: Adam learning rate (default 1e-4)")
    p.add_argument("--description", help="free text stored in the edit file")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the edit file to write (.safetensors)")
    add_stats_args(p.add_argument_group("key statistics with --data"))
    p.set_defaults(func=_cmd_edit)
