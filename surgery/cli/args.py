"""What the ``surgery`` commands share: option declarations, argument types, loading the model from the
options, the model's transform, class names, input checks, safe writes and warnings on stderr.

Every command module registers itself with ``add_command(subparsers)``; its function returns the exit
status and lets :class:`~surgery.errors.SurgeryError` propagate to :func:`surgery.cli.main.main`.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from surgery.errors import SurgeryError, SurgeryWarning
from surgery.inputs.preprocess import Preprocess
from surgery.models.loading import imagenet_classes, load_model

__all__ = [
    "positive_int",
    "nonnegative_float",
    "positive_float",
    "finite_float",
    "add_model_args",
    "add_image_args",
    "add_device_arg",
    "add_folder_args",
    "add_stats_args",
    "add_exemplar_args",
    "check_exemplars",
    "model_from_args",
    "model_transform",
    "model_class_names",
    "check_files",
    "inputs_of",
    "write",
    "warnings_on_stderr",
    "format_shape",
]

logger = logging.getLogger("surgery")

MODEL_FORMS = "torchvision:NAME, timm:NAME, open_clip:NAME or surgery:efficientnet_lite0"


# --------------------------------------------------------------------------------------- types


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0.0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = nonnegative_float(text)
    if value == 0.0:
        raise argparse.ArgumentTypeError("must be positive, got 0")
    return value


# ------------------------------------------------------------------------------------- options


def add_model_args(p: argparse.ArgumentParser, *, optional: bool = False) -> None:
    if optional:
        p.add_argument("model", nargs="?", help=MODEL_FORMS + " (or use --testbed)")
    else:
        p.add_argument("model", help=MODEL_FORMS)
    p.add_argument("--checkpoint", help="weights to load (.safetensors, or .pth read with weights_only=True)")
    p.add_argument("--pretrained", action="store_true", help="download pretrained weights (needs network)")


def add_device_arg(p: argparse.ArgumentParser | Any) -> None:
    """``--device``, read by :func:`model_from_args`."""
    p.add_argument("--device", help="where to run, e.g. cpu, cuda or cuda:1 (default: cpu)")


def _add_device_and_size(p: argparse.ArgumentParser, size_help: str) -> None:
    add_device_arg(p)
    p.add_argument("--size", type=positive_int, help=size_help)


def add_image_args(p: argparse.ArgumentParser, *, span: bool = False) -> None:
    """``--layer``, ``--device``, ``--size``: the commands that compute on a layer (stats, edit); with ``span``,
    ``--layer`` may be repeated (a list)."""
    if span:
        p.add_argument(
            "--layer", required=True, action="append",
            help="the editable layer (see `surgery layers MODEL`); repeat it for one edit spread over layers of "
            "consecutive residual blocks, in forward order (a span edit)",
        )
    else:
        p.add_argument("--layer", required=True, help="the editable layer (see `surgery layers MODEL`)")
    _add_device_and_size(
        p,
        "crop images to SIZE px, with the model's own resize ratio and normalization (default: the model's input size)",
    )


def add_folder_args(p: argparse.ArgumentParser) -> None:
    """Options of the commands that read labelled photo folders (``evaluate``, ``probe``)."""
    p.add_argument("--class-names", metavar="FILE", help="one class name per model output (default: ImageNet's "
                   "for 1000 outputs, else indices)")
    p.add_argument("--max-per-class", type=positive_int, help="read at most this many photos per class and folder")
    _add_device_and_size(p, "crop size in pixels (default: the model's input size)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward (default 64)")


def add_exemplar_args(p: argparse.ArgumentParser | Any, *, required: bool = True) -> None:
    """``--original``, ``--transformed``, ``--mask``: exemplar images (checked by :func:`check_exemplars`)."""
    p.add_argument("--original", nargs="+", required=required, metavar="IMAGE", help="original exemplar images")
    p.add_argument(
        "--transformed", nargs="+", required=required, metavar="IMAGE",
        help="the same images with the concept transformed, one per original, in the same order",
    )
    p.add_argument("--mask", nargs="+", metavar="IMAGE", help="concept masks (grayscale), one per exemplar")


def check_exemplars(args: argparse.Namespace) -> None:
    """One ``--transformed`` copy and, when masks are given, one ``--mask`` per ``--original``; every file exists."""
    originals, transformed, masks = args.original, args.transformed, args.mask
    if originals is None or transformed is None:
        raise SurgeryError("exemplars need both --original and --transformed images, one transformed copy per original")
    if len(originals) != len(transformed):
        raise SurgeryError(
            f"{len(originals)} --original image(s) but {len(transformed)} --transformed image(s); "
            "give one transformed copy per original, in the same order"
        )
    if masks is not None and len(masks) != len(originals):
        raise SurgeryError(f"{len(masks)} --mask file(s) for {len(originals)} exemplar(s); give one mask per exemplar")
    check_files(originals, "--original image")
    check_files(transformed, "--transformed image")
    check_files(masks or (), "--mask")


def add_stats_args(p: argparse.ArgumentParser | Any) -> None:
    p.add_argument("--max-images", type=positive_int, help="use at most this many images of the folder")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward (default 32)")
    p.add_argument("--cache-dir", help="a folder to cache key statistics in (keyed by layer, data and weights)")


# ------------------------------------------------------------------------------ model and inputs


def model_from_args(args: argparse.Namespace) -> nn.Module:
    """The model of ``args.model`` (with ``--checkpoint``/``--pretrained``), on ``--device``."""
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


def model_transform(model: nn.Module, size: int | None) -> Callable[[Image.Image], torch.Tensor]:
    """The model's own eval preprocessing, at ``size`` pixels when given (same resize ratio and
    normalization), else at its input size."""
    return Preprocess.from_model(model).model_input(size)


def model_class_names(model: nn.Module, path: str | None, size: int) -> list[str]:
    """One name per model output: ``--class-names FILE`` (one per line), ImageNet's for 1000 outputs,
    else the indices. The number of outputs comes from one forward at ``size`` px."""
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


def check_files(paths: Sequence[str], what: str) -> None:
    for p in paths:
        if Path(p).is_dir():
            raise SurgeryError(f"{what} {p!r} is a folder, not a file; give the file itself")
        if not Path(p).is_file():
            raise SurgeryError(f"{what} file {p!r} does not exist; check the path")


def inputs_of(args: argparse.Namespace, *names: str) -> list[str]:
    """The paths of ``args`` that a command reads (files or folders; the checkpoint always), for
    :func:`surgery._files.refuse_overwrite`."""
    found: list[str] = []
    for name in ("checkpoint", *names):
        value = getattr(args, name, None)
        if value is None:
            continue
        found.extend(value if isinstance(value, (list, tuple)) else [value])
    return found


def write(what: str, path: str, save: Callable[[str], Any]) -> None:
    """Call ``save(path)`` (which writes atomically), with a clear error when the folder is not writable."""
    try:
        save(path)
    except OSError as e:
        raise SurgeryError(f"cannot write the {what} to {path!r}: {e}") from None


@contextmanager
def warnings_on_stderr() -> Iterator[None]:
    """Show :class:`SurgeryWarning` as ``surgery: warning: ...`` lines; other warnings pass through.

    Warnings are collected while the block runs and shown once it has ended, outside the recording
    context: re-emitting inside it would record each warning again, forever.
    """
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as recorded:
            warnings.simplefilter("always", SurgeryWarning)
            try:
                yield
            finally:
                caught = list(recorded)
    finally:
        for w in caught:
            if issubclass(w.category, SurgeryWarning):
                print(f"surgery: warning: {w.message}", file=sys.stderr)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def format_shape(shape: tuple[int, ...] | None) -> str:
    return "-" if shape is None else "x".join(str(d) for d in shape)
