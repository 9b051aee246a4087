"""The ``surgery probe`` command: which concepts does each class rely on?

    surgery probe timm:resnet50 --pretrained --data photos/ --masks masks/ --texture gravel
    surgery probe --testbed vgg

With a model, it reads labelled photos (``photos/<class>/*.jpg``) and concept masks drawn on them
(``masks/<concept>/<class>/<photo>.png``), transforms one concept at a time (pixel styles and pasted
textures) and writes the accuracy drop of every (class, concept) with bootstrap intervals: CSV, JSON,
markdown, a heatmap and per-class bar charts. With ``--testbed`` it probes a trained testbed
classifier of the repository's benchmarks instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from surgery._files import refuse_overwrite, write_text
from surgery.cli.args import (
    add_folder_args,
    add_model_args,
    inputs_of,
    model_class_names,
    model_from_args,
    positive_float,
    positive_int,
    write,
)
from surgery.concepts.paste import paste_texture
from surgery.errors import SurgeryError
from surgery.inputs.folders import load_concept_masks, load_labelled_photos
from surgery.inputs.photos import TEXTURE_NAMES, sample_textures
from surgery.inputs.preprocess import Preprocess, default_input_size
from surgery.probe import PIXEL_STYLES, StyleFn, probe

__all__ = ["add_command"]

def _texture_styles(specs: list[str], blend: float) -> dict[str, StyleFn]:
    """``NAME=FILE`` or a bundled texture name -> a style pasting it (images as float 0..255)."""

    styles: dict[str, StyleFn] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep:
            if spec not in TEXTURE_NAMES:
                raise SurgeryError(
                    f"--texture {spec!r}: give NAME=FILE (an image of the texture) or a bundled texture "
                    f"({', '.join(TEXTURE_NAMES)})"
                )
            texture: Any = sample_textures([spec])[spec]
        else:
            try:
                with Image.open(file) as im:
                    texture = im.convert("RGB")
            except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
                raise SurgeryError(f"--texture {spec!r}: cannot read {file!r} as an image ({e})") from None
        if not name or name in styles:
            raise SurgeryError(f"--texture {spec!r}: each texture needs its own, non-empty name")

        def paste(x: torch.Tensor, m: torch.Tensor, texture: Any = texture) -> torch.Tensor:
            return paste_texture(x / 255.0, m, texture, blend, seed=0) * 255.0

        styles[name] = paste
    return styles


def _probe_folders(args: argparse.Namespace) -> int:

    if not args.data or not args.masks:
        raise SurgeryError("surgery probe MODEL needs --data DIR (photos per class) and --masks DIR (per concept)")
    for flag, folder in (("--data", args.data), ("--masks", args.masks)):
        if not Path(folder).expanduser().is_dir():  # before loading a model that may take a while
            raise SurgeryError(f"{flag} {folder!r} does not exist or is not a folder")
    pixel = list(PIXEL_STYLES) if args.styles is None and not args.texture else (args.styles or "").split(",")
    pixel = [s for s in pixel if s]
    unknown = [s for s in pixel if s not in PIXEL_STYLES]
    if unknown:
        raise SurgeryError(f"unknown style(s) {', '.join(unknown)}; pixel styles: {', '.join(PIXEL_STYLES)}")
    styles: dict[str, StyleFn] = {s: PIXEL_STYLES[s] for s in pixel}
    for name, fn in _texture_styles(args.texture or [], args.blend).items():
        if name in styles:
            raise SurgeryError(f"--texture {name!r} has the name of a pixel style; name it otherwise")
        styles[name] = fn

    stem = Path(args.out) / "probe"
    inputs = inputs_of(args, "data", "masks", "class_names") + [t.partition("=")[2] for t in args.texture or [] if "=" in t]
    for suffix in (".json", ".csv", ".md", ".png", "_bars.png"):
        refuse_overwrite(f"{stem}{suffix}", inputs, what="the probe output")
    model = model_from_args(args).eval()
    pre = Preprocess.from_model(model)
    size = args.size or default_input_size(model)[1]
    names = model_class_names(model, args.class_names, size)
    photos = load_labelled_photos(args.data, [names], pre.pixels(size), max_per_class=args.max_per_class)
    masks = load_concept_masks(args.masks, photos, pre, size)
    images = (photos.images * 255).round().to(torch.uint8)  # a quarter of the memory of floats
    result = probe(
        model, images, photos.labels, masks, styles, preprocess=pre.normalize, class_names=names,
        n_boot=args.n_boot, min_images=args.min_images, batch_size=args.batch_size, progress=sys.stderr.isatty(),
    )
    if all(c.skipped for c in result.cells):
        raise SurgeryError(
            f"every (class, concept) cell has fewer than {args.min_images} photos showing the concept; "
            "add photos or masks, or lower --min-images"
        )
    result.meta.update({"model": args.model, "data": str(args.data), "masks": str(args.masks), "size": size})
    write("probe results", f"{stem}.json", result.to_json)
    result.to_csv(f"{stem}.csv")
    write_text(f"{stem}.md", f"# Probe: {args.model}\n\n{result.to_markdown(top_k=args.top_k)}\n")
    result.heatmap(f"{stem}.png", title=f"{args.model}\naccuracy drop (pp) when one concept is transformed\n(mean over {', '.join(styles)})")
    result.bar_charts(f"{stem}_bars.png")
    print(
        f"{len(photos.files)} photos of {len(photos.folders)} classes (clean accuracy "
        f"{result.meta['clean_accuracy']:.1f}%), {len(masks)} concepts, styles {', '.join(styles)}"
    )
    _print_rules(result, args.top_k)
    print(f"wrote {stem}.{{csv,json,md,png}} and {stem.name}_bars.png")
    return 0


def _print_rules(result: Any, top_k: int) -> None:
    rules = result.rules(top_k)
    if not rules:
        print(f"no rules: every (class, concept) cell has fewer than {result.meta['min_images']} images")
    for name, cells in rules.items():
        print(f"  {name}: " + ", ".join(f"{c.concept} {c.drop:+.1f} [{c.ci_low:+.1f}, {c.ci_high:+.1f}]" for c in cells))


def _probe_testbed(args: argparse.Namespace) -> int:
    # the testbed needs the [demo] extras (scipy, scikit-image, mlxtend): imported only here
    from surgery import testbed
    from surgery.testbed.models import ARCHS
    from surgery.testbed.probing import preferred_cells, probe_testbed
    from surgery.testbed.train import load_trained

    if args.testbed not in ARCHS:
        raise SurgeryError(f"--testbed {args.testbed!r}: choose from {', '.join(ARCHS)}")

    n = 2000 if args.n is None else args.n
    variant = 0 if args.variant is None else args.variant
    styles = args.styles.split(",") if args.styles else None
    unknown = [s for s in styles or () if s not in testbed.STYLES]
    if unknown:
        raise SurgeryError(f"unknown style(s) {', '.join(unknown)}; styles: {', '.join(testbed.STYLES)}")
    if not 0 <= variant < min(len(v) for v in testbed.STYLES.values()):
        raise SurgeryError(f"--variant must be in 0..{min(len(v) for v in testbed.STYLES.values()) - 1}")
    try:
        model, _ = load_trained(args.testbed, train_if_missing=False)
    except FileNotFoundError as e:
        raise SurgeryError(str(e)) from None
    stem = Path(args.out) / f"probe_{args.testbed}"
    tb = testbed.Testbed(testbed.TestbedConfig(), seed=0)
    result = probe_testbed(
        model, tb, n, styles=styles, variant=variant, n_boot=args.n_boot, min_images=args.min_images,
        progress=sys.stderr.isatty(),
    )
    result.meta.update({"arch": args.testbed})
    highlight = preferred_cells(tb)
    write("probe results", f"{stem}.json", result.to_json)
    result.to_csv(f"{stem}.csv")
    write_text(f"{stem}.md", f"# Probe: testbed {args.testbed}\n\n{result.to_markdown(top_k=args.top_k)}\n")
    result.heatmap(
        f"{stem}.png", highlight=highlight,
        title=f"testbed {args.testbed}: accuracy drop (pp) when one concept is restyled\n(boxes: generated preferences)",
    )
    result.bar_charts(f"{stem}_bars.png", highlight=highlight)
    print(f"rules of the testbed {args.testbed} (mean accuracy drop over styles, pp):")
    _print_rules(result, args.top_k)
    print(f"wrote {stem}.{{csv,json,md,png}} and {stem.name}_bars.png")
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    if (args.model is None) == (args.testbed is None):
        raise SurgeryError("give a MODEL (with --data and --masks) or --testbed ARCH, not both")
    if args.testbed is not None:
        given = [f"--{k.replace('_', '-')}" for k in ("data", "masks", "texture", "class_names", "checkpoint", "size")
                 if getattr(args, k)]
        if given:
            raise SurgeryError(f"{', '.join(given)} apply to MODEL, not to --testbed")
        return _probe_testbed(args)
    if args.n is not None or args.variant is not None:
        raise SurgeryError("--n and --variant apply to --testbed only")
    if not 0.0 < args.blend <= 1.0:
        raise SurgeryError(f"--blend must be in (0, 1], got {args.blend}")
    return _probe_folders(args)


def add_command(subparsers: Any) -> None:
    """Register ``probe`` on the ``surgery`` parser's subparsers."""
    p = subparsers.add_parser(
        "probe",
        help="find the concepts each class relies on (one concept transformed at a time)",
        description="Transform one concept at a time (the paper's Section 5) in your labelled photos, or in "
        "testbed scenes, and measure each class's accuracy drop with bootstrap 95% intervals; writes CSV, "
        "JSON, markdown, a heatmap and bar charts.",
        epilog="Layout: DATA/<class name or index>/*.jpg and MASKS/<concept>/<class folder>/<photo name>.png "
        "(white where the concept is; a photo without a mask does not show that concept).",
    )
    add_model_args(p, optional=True)
    p.add_argument("--data", metavar="DIR", help="labelled photos: one folder per class")
    p.add_argument("--masks", metavar="DIR", help="concept masks: MASKS/<concept>/<class folder>/<photo>.png")
    p.add_argument("--styles", help="comma-separated pixel styles gray,flat,blur (default: all three, "
                   "or none when --texture is given); with --testbed, testbed styles")
    p.add_argument("--texture", action="append", metavar="NAME=FILE",
                   help="paste this texture into the concept (repeatable; or a bundled one: grass, gravel, brick)")
    p.add_argument("--blend", type=positive_float, default=1.0, help="texture opacity in (0, 1] (default 1)")
    add_folder_args(p)
    # checked against surgery.testbed.models.ARCHS when used: the testbed is imported only then
    p.add_argument("--testbed", metavar="ARCH",
                   help="probe a trained testbed classifier instead (vgg, resnet, vit, convnext)")
    p.add_argument("--n", type=positive_int, help="--testbed: test scenes (default 2000)")
    p.add_argument("--variant", type=int, help="--testbed: variant of each style (default 0)")
    p.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument(
        "--min-images", type=positive_int, default=5, help="skip class-concept cells with fewer images (default 5)"
    )
    p.add_argument("--top-k", type=positive_int, default=3, help="concepts printed per class (default 3)")
    p.add_argument("--out", default="probe-output", help="folder for the results (default probe-output)")
    p.set_defaults(func=_cmd_probe)
