"""Vehicles on snow (Santurkar et al. 2021, Sec. 3.1): teach an ImageNet VGG16-BN that a snowy road is a road.

One exemplar: an image with a road (the paper used a "police van" photo), the same image with snow
pasted inside a road mask, and the mask. The edit maps "snowy road" to "road" at ``features.40`` (the
paper's layer 12, with its max-pool); local and global fine-tuning on the same exemplar, labelled with
its class, are the baselines. The test set is a folder of photos of vehicles on snowy roads, one folder
per ImageNet class (the paper: racer, tank, fire engine, car wheel, traffic light, school bus, motor
scooter, ~20 Flickr photos each). Reported: accuracy per class before and after, % errors corrected on
the snowy photos, and the accuracy on clean photos (``--clean DIR``, same layout) that each method costs.

Usage::

    python -m benchmarks.scenarios.snow --photos snowy/ --clean clean/ --pretrained \\
        --exemplar van.jpg --mask van-road.png --exemplar-class "police van" --out results/snow
    python -m benchmarks.scenarios.snow --photos snowy/ --size 96 --max-steps 5   # random weights

Exemplar: ``--exemplar IMG --exemplar-transformed IMG --mask PNG`` (your own snow), ``--exemplar IMG
--mask PNG`` (snow pasted here inside the mask: ``--snow-texture IMG`` or a procedural texture), or
nothing (a synthetic road scene: proves the code path, nothing more). Key statistics come from the
photos (``--stats-data DIR`` for another folder).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import nn

from surgery.concepts.paste import paste_texture
from surgery.inputs.folders import load_labelled_photos, resolve_class
from surgery.inputs.images import ImageFolder, load_images
from surgery.inputs.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from surgery.models.loading import imagenet_classes, load_model

from . import common
from .common import Exemplar, PretrainedWeights, ScenarioError

__all__ = ["PREPROCESS", "SPEC", "build_parser", "main", "run", "synthetic_road_scene", "vgg16_bn_weights"]

logger = logging.getLogger(__name__)

SPEC = "torchvision:vgg16_bn"
LAYER = "features.40"
PREPROCESS = Preprocess(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875, interpolation="bilinear")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.scenarios.snow",
        description="Vehicles on snow: edit VGG16-BN to see a snowy road as a road, from one exemplar, "
        "and compare with local/global fine-tuning on the same exemplar.",
    )
    common.add_common_arguments(p, layer=LAYER, finetune_steps=400, finetune_lr=1e-4)
    p.add_argument("--clean", type=Path, default=None,
                   help="clean photos (same layout as --photos) for the clean accuracy each method costs")
    p.add_argument("--snow-texture", type=Path, default=None,
                   help="an image of snow to paste inside the mask (default: a procedural texture)")
    p.add_argument("--blend", type=float, default=1.0, help="opacity of the pasted snow, in [0, 1]")
    return p


def vgg16_bn_weights() -> PretrainedWeights:
    """The torchvision weights the scenario loads, and where torchvision looks for them."""
    import torchvision

    weights = torchvision.models.VGG16_BN_Weights.IMAGENET1K_V1
    filename = weights.url.rsplit("/", 1)[-1]
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return PretrainedWeights(
        name="torchvision VGG16_BN_Weights.IMAGENET1K_V1 (VGG16-BN, ImageNet-1k, 528 MB)",
        url=weights.url,
        where=f"at {hub / filename}\n(torch.hub.get_dir()/checkpoints; set TORCH_HOME to use another folder).",
        instructions="Or pass --checkpoint PATH with that file (or any VGG16-BN state dict, .pth or .safetensors).",
    )


def load_classifier(args: argparse.Namespace) -> tuple[nn.Module, str]:
    """The VGG16-BN to edit, and what its weights are (``pretrained``, ``checkpoint`` or ``random``)."""
    if args.checkpoint is not None:
        return load_model(SPEC, checkpoint=args.checkpoint), "checkpoint"
    if args.pretrained:
        w = vgg16_bn_weights()
        cached = Path(torch.hub.get_dir(), "checkpoints", w.url.rsplit("/", 1)[-1]).is_file()
        model = common.load_pretrained(w, lambda: load_model(SPEC, pretrained=True), cached=cached)
        return model, "pretrained"
    torch.manual_seed(args.seed)
    return load_model(SPEC), "random"


def synthetic_road_scene(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A drawn road scene ``(1, 3, S, S)`` in ``[0, 1]`` and its road mask ``(1, 1, S, S)``.

    Sky, fields, an asphalt road narrowing to the horizon with a dashed line, and a red van on it
    (not part of the mask). For random-weight runs: it proves the code path, it is no real exemplar.
    """
    s = size
    im = Image.new("RGB", (s, s))
    d = ImageDraw.Draw(im)
    horizon = int(0.42 * s)
    for y in range(horizon):
        t = y / max(1, horizon)
        d.line([(0, y), (s, y)], fill=(int(120 + 80 * t), int(160 + 60 * t), int(215 + 30 * t)))
    d.rectangle([0, horizon, s, s], fill=(96, 110, 70))
    road = [(int(0.05 * s), s), (int(0.95 * s), s), (int(0.54 * s), horizon), (int(0.46 * s), horizon)]
    d.polygon(road, fill=(88, 88, 92))
    for k in range(6):
        y0 = horizon + (s - horizon) * k / 6
        y1 = y0 + (s - horizon) / 14
        w = max(1, int(0.004 * s + 0.012 * s * (y0 - horizon) / (s - horizon)))
        d.rectangle([s // 2 - w, int(y0), s // 2 + w, int(y1)], fill=(235, 235, 225))
    mask_im = Image.new("L", (s, s))
    ImageDraw.Draw(mask_im).polygon(road, fill=255)
    van = [int(0.36 * s), int(0.55 * s), int(0.64 * s), int(0.78 * s)]
    d.rectangle(van, fill=(180, 30, 30))
    d.rectangle([van[0] + s // 30, van[1] + s // 30, van[2] - s // 30, van[1] + s // 9], fill=(60, 80, 100))
    for cx in (van[0] + s // 16, van[2] - s // 16):
        r = max(1, s // 28)
        d.ellipse([cx - r, van[3] - r, cx + r, van[3] + r], fill=(20, 20, 20))
    ImageDraw.Draw(mask_im).rectangle([van[0], van[1], van[2], van[3] + s // 28], fill=0)
    x = load_images(im)
    g = torch.Generator().manual_seed(seed)
    x = (x + 0.03 * torch.randn(x.shape, generator=g)).clamp(0.0, 1.0)
    mask = load_images(mask_im.convert("RGB"))[:, :1]
    return x, mask


def build_exemplar(args: argparse.Namespace) -> Exemplar:
    """The exemplar from the user's files, with snow pasted here where no transformed image is given."""
    size = args.size
    original, transformed, mask = common.load_exemplar_files(args, PREPROCESS, size)
    if original is None:
        original, mask = synthetic_road_scene(size, args.seed)
        source = "synthetic road scene"
    else:
        source = f"{args.exemplar}"
    if transformed is None:
        if mask is None:
            raise ScenarioError(
                "to paste snow on --exemplar, give --mask (a PNG of the road, white on black), or give "
                "your own snowy version with --exemplar-transformed"
            )
        if args.snow_texture is not None:
            texture = load_images([args.snow_texture], PREPROCESS.pixels(size))[0]
            what = f"snow from {args.snow_texture}"
        else:
            texture = common.snow_texture(size, seed=args.seed)
            what = "procedural snow"
        if not 0.0 <= args.blend <= 1.0:
            raise ScenarioError(f"--blend must lie in [0, 1], got {args.blend}")
        transformed = paste_texture(original, mask, texture, blend=args.blend)
        source += f", {what} pasted inside the road mask"
    else:
        source += f" -> {args.exemplar_transformed}"
    return Exemplar(original=original, transformed=transformed, mask=mask, source=source)


def run(args: argparse.Namespace, model: nn.Module | None = None) -> dict[str, Any]:
    """Run the scenario; returns the results (also printed, and written under ``--out``)."""
    class_names = imagenet_classes()
    if model is None:
        model, weights = load_classifier(args)
    else:
        weights = "given"
    if weights == "random":
        print(common.RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    model = model.to(common.pick_device(args.device)).eval()

    photos = load_labelled_photos(args.photos, [class_names], PREPROCESS.pixels(args.size), max_per_class=args.max_per_class)
    extra = {}
    notes = []
    if args.clean is not None:
        extra["clean"] = load_labelled_photos(
            args.clean, [class_names], PREPROCESS.pixels(args.size), max_per_class=args.max_per_class
        )
    else:
        notes.append("no clean accuracy: pass --clean DIR (clean photos, one folder per class)")
    exemplar = build_exemplar(args)
    label = None if args.exemplar_class is None else resolve_class(args.exemplar_class, class_names)
    stats_data = None if args.stats_data is None else ImageFolder(args.stats_data, PREPROCESS.model_input(args.size))
    if weights == "random":
        notes.insert(0, "random weights: these numbers are meaningless")
    comparison = common.compare_methods(
        model,
        args=args,
        pre=PREPROCESS,
        exemplar=exemplar,
        label=label,
        class_names=class_names,
        photos=photos,
        conditions={"snowy": photos.images},
        target="snowy",
        stats_data=stats_data,
        extra=extra,
        meta={
            "scenario": "snow",
            "title": "Vehicles on snow ('snowy road' -> 'road')",
            "model": SPEC,
            "weights": weights,
            "notes": notes,
        },
    )
    common.report(comparison, args.out)
    return comparison.results


def main(argv: Sequence[str] | None = None, *, model: nn.Module | None = None) -> int:
    """Command-line entry point; ``model`` replaces the VGG16-BN (tests pass a small one)."""
    return common.run_cli(lambda args: run(args, model), build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
