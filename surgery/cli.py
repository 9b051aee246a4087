"""The ``surgery`` command line.

    surgery layers timm:resnet50              # table of editable layers
    surgery layers open_clip:RN50 --input-size 224
    surgery demo                              # edit the testbed VGG: snow on grass, vs fine-tuning
    surgery demo --photos                     # the real EfficientNet-Lite0 on real photos
    surgery stats timm:resnet50 --layer layer3.1.conv3 --data val/ -o stats.safetensors
    surgery edit timm:resnet50 --layer layer3.1.conv3 --original x.png --transformed x2.png \\
        --stats stats.safetensors -o edit.safetensors
    surgery evaluate timm:resnet50 --edit edit.safetensors --data snowy/ --originals dry/ --clean val/
    surgery probe timm:resnet50 --data photos/ --masks masks/ --texture gravel
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._files import refuse_overwrite
from .errors import SurgeryError

__all__ = ["build_parser", "main"]

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

    return run_demo(top_k=args.top_k, photos=args.photos, out_dir=args.out)


# --------------------------------------------------------------------------------------------------
# stats and edit: shared helpers
# --------------------------------------------------------------------------------------------------


def _load_model(args: argparse.Namespace):
    """The model of ``args.model`` (with ``--checkpoint``/``--pretrained``), on ``--device``."""
    import torch

    from .models import load_model

    model = load_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained)
    device = getattr(args, "device", None)
    if device:
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise SurgeryError(f"unknown device {device!r} ({e}); use e.g. cpu, cuda or cuda:1") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SurgeryError(f"device {device!r} was asked for, but CUDA is not available here")
        try:
            model = model.to(dev)
        except (RuntimeError, AssertionError) as e:
            raise SurgeryError(f"cannot move the model to {device!r}: {e}") from None
    return model


def _transform(model, size: int | None) -> Callable[[Any], Any]:
    """The model's own eval preprocessing; with ``size``, its resize, center crop and normalization
    at ``size`` pixels instead of its input size."""
    from .class_folders import Preprocess
    from .models import preprocess

    if size is None:
        return preprocess(model)
    return Preprocess.from_model(model).model_input(size)


def _class_names(model, path: str | None, size: int) -> list[str]:
    """One name per model output: ``--class-names FILE`` (one per line), ImageNet's for 1000
    outputs, else the indices. The number of outputs comes from one forward at ``size`` px."""
    import torch

    from .models import imagenet_classes

    with torch.no_grad():
        out = model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise SurgeryError("the model must return logits (N, classes); wrap it so that it does")
    n_outputs = out.shape[1]
    if path is None:
        return imagenet_classes() if n_outputs == 1000 else [str(i) for i in range(n_outputs)]
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise SurgeryError(f"cannot read --class-names {path!r} as a text file, one name per line ({e})") from None
    if len(names) != n_outputs:
        raise SurgeryError(
            f"--class-names {path!r} has {len(names)} names but the model has {n_outputs} outputs; "
            "give one name per output, in output order"
        )
    return names


def _collect_stats(model, layer: str, args: argparse.Namespace, transform):
    """Key statistics of ``layer`` over the image folder ``args.data``; returns (stats, images)."""
    from .data import ImageFolder, count_images
    from .stats import collect_key_stats

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


def _check_files(paths: Sequence[str], what: str) -> None:
    for p in paths:
        if Path(p).is_dir():
            raise SurgeryError(f"{what} {p!r} is a folder, not a file; give the file itself")
        if not Path(p).is_file():
            raise SurgeryError(f"{what} file {p!r} does not exist; check the path")


def _aligned_masks(mask_paths: Sequence[str], image_paths: Sequence[str], transform) -> Any:
    """Masks ``(N, 1, H, W)`` in [0, 1] that went through the same resize and crop as their images.

    A mask is first resized to its original image's size (when they differ), then sent through the
    image transform as a gray RGB image; the transform's per-channel normalization is undone from
    the transforms of an all-black and an all-white image of the same size.
    """
    import numpy as np
    import torch
    from PIL import Image

    from .data import load_masks

    out = []
    for mask_path, image_path in zip(mask_paths, image_paths):
        try:
            with Image.open(image_path) as im:
                w, h = im.size
            with Image.open(mask_path) as im:
                mw, mh = im.size
        except OSError as e:
            raise SurgeryError(f"cannot read {image_path!r} or {mask_path!r} as an image ({e})") from None
        if (mw, mh) != (w, h):
            if abs(mw * h - mh * w) > max(w, h):  # not the same aspect ratio, to a pixel
                raise SurgeryError(
                    f"mask {mask_path!r} is {mw}x{mh} but its image {image_path!r} is {w}x{h}, another shape; "
                    "draw the mask on the image, at its size"
                )
            logger.warning("mask %s is %dx%d; resized to its image's %dx%d", mask_path, mw, mh, w, h)
        m = load_masks(mask_path, size=(h, w))[0, 0]
        gray = Image.fromarray((m.numpy() * 255.0).round().astype(np.uint8), mode="L").convert("RGB")
        t = transform(gray).float()
        lo = transform(Image.new("RGB", (w, h), (0, 0, 0))).float()
        hi = transform(Image.new("RGB", (w, h), (255, 255, 255))).float()
        aligned = ((t - lo) / (hi - lo)).mean(0).clamp_(0.0, 1.0)
        out.append(aligned[None, None])
    return torch.cat(out)


def _write(what: str, path: str, save: Callable[[str], Any]) -> None:
    """Call ``save(path)`` (which writes atomically), with a clear error when the folder is not writable."""
    try:
        save(path)
    except OSError as e:
        raise SurgeryError(f"cannot write the {what} to {path!r}: {e}") from None


def _inputs(args: argparse.Namespace, *names: str) -> list[str]:
    """The paths of ``args`` that a command reads (files or folders), for :func:`refuse_overwrite`."""
    found: list[str] = []
    for name in ("checkpoint", *names):
        value = getattr(args, name, None)
        if value is None:
            continue
        found.extend(value if isinstance(value, (list, tuple)) else [value])
    return found


# --------------------------------------------------------------------------------------------------
# surgery stats
# --------------------------------------------------------------------------------------------------


def _cmd_stats(args: argparse.Namespace) -> int:
    refuse_overwrite(args.output, _inputs(args, "data"), what="the statistics file")
    model = _load_model(args)
    transform = _transform(model, args.size)
    stats, images = _collect_stats(model, args.layer, args, transform)
    _write("key statistics", args.output, stats.save)
    print(
        f"{stats.layer}: {images} images, {stats.count} key vectors, n={stats.n} "
        f"({stats.dtype}) -> {args.output}"
    )
    return 0


# --------------------------------------------------------------------------------------------------
# surgery edit
# --------------------------------------------------------------------------------------------------


def _check_stats_weights(model, layer, stats, path: str, transform, image: str) -> None:
    """Warn when the statistics were collected on other weights upstream of the layer."""
    from .data import load_images
    from .stats import weights_fingerprint

    if not stats.fingerprint:
        return
    batch = load_images([image], transform)
    if weights_fingerprint(model, layer, batch) != stats.fingerprint:
        logger.warning(
            "the key statistics in %s were collected on a model whose weights up to %s differ from "
            "this one's (another checkpoint, or random weights?); recompute them with `surgery stats` "
            "unless this is intended",
            path,
            layer.name,
        )


def _cmd_edit(args: argparse.Namespace) -> int:
    from .layers import get_layer
    from .rewrite import rewrite
    from .stats import KeyStats

    originals, transformed, masks = args.original, args.transformed, args.mask
    if len(originals) != len(transformed):
        raise SurgeryError(
            f"{len(originals)} --original image(s) but {len(transformed)} --transformed image(s); "
            "give one transformed copy per original, in the same order"
        )
    if masks is not None and len(masks) != len(originals):
        raise SurgeryError(
            f"{len(masks)} --mask file(s) for {len(originals)} exemplar(s); give one mask per exemplar"
        )
    if args.use_mask and masks is None:
        raise SurgeryError("--use-mask needs masks: pass --mask with one mask per exemplar")
    _check_files(originals, "--original image")
    _check_files(transformed, "--transformed image")
    _check_files(masks or (), "--mask")
    if args.stats is not None:
        _check_files([args.stats], "--stats")
    refuse_overwrite(
        args.output, _inputs(args, "original", "transformed", "mask", "stats", "data"), what="the edit file"
    )

    model = _load_model(args)
    transform = _transform(model, args.size)
    layer = get_layer(model, args.layer)  # fail on a bad layer name before any long computation
    if args.stats is not None:
        stats = KeyStats.load(args.stats)
        if stats.layer != layer.name:
            raise SurgeryError(
                f"the key statistics in {args.stats!r} are of layer {stats.layer!r}, not {layer.name!r}; "
                f"compute them with: surgery stats {args.model} --layer {layer.name} --data DIR -o FILE"
            )
        _check_stats_weights(model, layer, stats, args.stats, transform, transformed[0])
    else:
        stats, images = _collect_stats(model, layer, args, transform)
        print(f"{layer.name}: key statistics from {images} images, {stats.count} key vectors, n={stats.n}")

    mask_tensor = None if masks is None else _aligned_masks(masks, originals, transform)
    edit = rewrite(
        model,
        layer,
        originals,
        transformed,
        mask_tensor,
        stats=stats,
        solver=args.solver,
        loss=args.loss,
        use_mask=args.use_mask,
        ridge=args.ridge,
        steps=args.steps,
        lr=args.lr,
        rank=args.rank,
        transform=transform,
        progress=args.solver == "reference",
    )
    if args.description is not None:
        if hasattr(edit, "description"):
            edit.description = args.description
        else:
            edit.info["description"] = args.description

    if edit.factored and not bool(edit.lam.abs().max() > 0):
        raise SurgeryError(
            f"the edit of {edit.layer} is zero, so it would change nothing; nothing was written. The block's "
            "value does not depend on this layer's weight along the edit direction (a zero-initialised "
            "BatchNorm after it, as timm ResNets have with random weights, or exemplars whose keys do not "
            "differ there): check the weights (--checkpoint/--pretrained) or edit another layer"
        )
    info = edit.info
    before, after = float(info["objective_before"]), float(info["objective"])
    change = f" ({100.0 * (after - before) / before:+.1f}%)" if before > 0 else ""
    norm = float(edit.lam.norm()) if edit.lam is not None else float(edit.delta().norm())
    print(
        f"edit {edit.layer}: {len(originals)} exemplar(s), {args.solver} solver, {args.loss} loss, "
        f"rank {args.rank}"
    )
    print(f"objective: {before:.6g} -> {after:.6g}{change}")
    print(f"||lam|| = {norm:.6g}, solver {float(info.get('seconds', 0.0)):.3f} s "
          f"(total {float(info.get('seconds_total', 0.0)):.3f} s)")
    _write("edit", args.output, edit.save)
    print(f"wrote {args.output}")
    return 0


# --------------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0.0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _nonnegative_float(text)
    if value == 0.0:
        raise argparse.ArgumentTypeError("must be positive, got 0")
    return value


def _add_model_args(p: argparse.ArgumentParser, *, optional: bool = False) -> None:
    text = "torchvision:NAME, timm:NAME, open_clip:NAME or surgery:efficientnet_lite0"
    if optional:
        p.add_argument("model", nargs="?", help=text + " (or use --testbed)")
    else:
        p.add_argument("model", help=text)
    p.add_argument("--checkpoint", help="weights to load (.safetensors, or .pth read with weights_only=True)")
    p.add_argument("--pretrained", action="store_true", help="download pretrained weights (needs network)")


def _add_image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layer", required=True, help="the editable layer (see `surgery layers MODEL`)")
    p.add_argument("--device", help="where to run, e.g. cpu, cuda or cuda:1 (default: cpu)")
    p.add_argument(
        "--size",
        type=_positive_int,
        help="crop images to SIZE px, with the model's own resize ratio and normalization "
        "(default: the model's input size)",
    )


def _add_folder_args(p: argparse.ArgumentParser) -> None:
    """Options of the commands that read labelled photo folders (``evaluate``, ``probe``)."""
    p.add_argument("--class-names", metavar="FILE", help="one class name per model output (default: ImageNet's "
                   "for 1000 outputs, else indices)")
    p.add_argument("--max-per-class", type=_positive_int, help="read at most this many photos per class and folder")
    p.add_argument("--device", help="where to run, e.g. cpu, cuda or cuda:1 (default: cpu)")
    p.add_argument("--size", type=_positive_int, help="crop size in pixels (default: the model's input size)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per forward (default 64)")


def _add_stats_args(p: argparse.ArgumentParser | Any) -> None:
    p.add_argument("--max-images", type=_positive_int, help="use at most this many images of the folder")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="images per forward (default 32)")
    p.add_argument(
        "--cache-dir", help="a folder to cache key statistics in (keyed by layer, data and weights)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``surgery`` command."""
    parser = argparse.ArgumentParser(
        prog="surgery",
        description="Edit a trained image classifier's prediction rules with rank-one weight updates.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("layers", help="list the editable layers of a model")
    _add_model_args(p)
    p.add_argument("--input-size", type=int, help="square input size for the shape columns")
    p.add_argument("--blocks-only", action="store_true", help="only layers valued at a block's end")
    p.set_defaults(func=_cmd_layers)

    p = sub.add_parser(
        "demo", help="edit a testbed classifier end to end and compare with fine-tuning (--photos: real weights)"
    )
    p.add_argument("--photos", action="store_true", help="the real EfficientNet-Lite0 on real photos instead")
    p.add_argument("--top-k", type=int, default=3, help="predictions shown per photo (--photos)")
    p.add_argument("--out", default="demo-output", help="folder for the edit file and the figure")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "stats",
        help="collect the key statistics of a layer over a folder of images",
        description="Collect the second moment of a layer's keys over every image (recursively) of a "
        "folder, and write it as a safetensors file for `surgery edit --stats`.",
    )
    _add_model_args(p)
    _add_image_args(p)
    p.add_argument(
        "--data", required=True, metavar="DIR", help="a folder of clean images (searched recursively)"
    )
    p.add_argument(
        "-o", "--output", required=True, metavar="FILE", help="the statistics file to write (.safetensors)"
    )
    _add_stats_args(p)
    p.set_defaults(func=_cmd_stats)

    p = sub.add_parser(
        "edit",
        help="compute a rank-one edit from exemplars and write it to a file",
        description="Compute the rank-one edit of a layer that makes the model see the transformed "
        "exemplars as it sees the originals, and write it as a safetensors file.",
    )
    _add_model_args(p)
    _add_image_args(p)
    p.add_argument("--original", nargs="+", required=True, metavar="IMAGE", help="original exemplar images")
    p.add_argument(
        "--transformed", nargs="+", required=True, metavar="IMAGE",
        help="the same images with the concept transformed, one per original, in the same order",
    )
    p.add_argument("--mask", nargs="+", metavar="IMAGE", help="concept masks (grayscale), one per exemplar")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--stats", metavar="FILE", help="key statistics written by `surgery stats`")
    source.add_argument(
        "--data", metavar="DIR", help="a folder of clean images to compute the key statistics from"
    )
    p.add_argument("--solver", choices=("fast", "reference"), default="fast", help="default: fast")
    p.add_argument("--loss", choices=("l1", "l2"), default="l1", help="default: l1 (the paper's)")
    p.add_argument("--use-mask", action="store_true", help="weight the loss by the masks")
    p.add_argument("--rank", type=_positive_int, default=1, help="number of directions (default 1)")
    p.add_argument(
        "--ridge", type=_nonnegative_float, default=0.0, help="fast solver: ridge on lambda (weaker edit)"
    )
    p.add_argument(
        "--steps", type=_positive_int,
        help="reference solver: Adam steps (default 20000); fast solver: most Gauss-Newton iterations",
    )
    p.add_argument("--lr", type=_positive_float, help="reference solver: Adam learning rate (default 1e-4)")
    p.add_argument("--description", help="free text stored in the edit file")
    p.add_argument(
        "-o", "--output", required=True, metavar="FILE", help="the edit file to write (.safetensors)"
    )
    _add_stats_args(p.add_argument_group("key statistics with --data"))
    p.set_defaults(func=_cmd_edit)
    from .cli_evaluate import add_command as add_evaluate
    from .cli_probe import add_command as add_probe

    add_evaluate(sub)
    add_probe(sub)

    from .cli_edits import add_commands

    add_commands(sub)  # inspect, apply, revert
    return parser


def _one_line(message: str) -> str:
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
        return args.func(args)
    except SurgeryError as e:
        print(f"surgery: error: {_one_line(str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
