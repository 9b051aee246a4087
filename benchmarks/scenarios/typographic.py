"""Typographic attacks (Santurkar et al. 2021, Sec. 3.2): make zero-shot CLIP-RN50 ignore the text "iPod".

A paper with "iPod" written on it, stuck on an object, makes zero-shot CLIP call the object an iPod.
One exemplar fixes it: an image with the "iPod" paper (transformed, ``x'``) and the same image with a
blank paper (original, ``x``), the paper's box as the mask. The edit maps the text to "blank" at
``visual.layer4.1.conv3``; local and global fine-tuning on the same exemplar (labelled with its class)
are the baselines. The test photos (one folder per ImageNet class, e.g. teapot, coffee mug, vase) are
evaluated clean, with a blank paper and with the "iPod" paper drawn at ``--box``. Reported: accuracy on
each version, how often "iPod" is predicted, and % errors corrected on the "iPod" versions, counted on
photos whose clean version the unedited model gets right (as the paper's code).

The classifier is open_clip's RN50 with OpenAI's weights, zero-shot over the 1000 ImageNet class names
(``surgery.adapters.ZeroShotClassifier``; the 80 OpenAI prompt templates).

Usage::

    python -m benchmarks.scenarios.typographic --photos objects/ --pretrained --out results/typo
    python -m benchmarks.scenarios.typographic --photos objects/ --exemplar can-opener.jpg --pretrained
    python -m benchmarks.scenarios.typographic --photos objects/ --exemplar blank.jpg \\
        --exemplar-transformed ipod.jpg --mask paper.png --pretrained     # your own photographs
    python -m benchmarks.scenarios.typographic --photos objects/ --size 64 --max-steps 5   # random weights

Without ``--exemplar`` the exemplar is a drawn object (proves the code path, nothing more).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from surgery.inputs.folders import load_labelled_photos, resolve_class
from surgery.inputs.images import ImageFolder, load_images
from surgery.inputs.preprocess import Preprocess
from surgery.models.loading import imagenet_classes, load_model

from . import common
from .common import Exemplar, PretrainedWeights, ScenarioError

__all__ = [
    "IPOD",
    "SPEC",
    "add_paper",
    "build_parser",
    "main",
    "rn50_weights",
    "run",
    "synthetic_object",
]

logger = logging.getLogger(__name__)

SPEC = "open_clip:RN50"
SPEC_QUICKGELU = "open_clip:RN50-quickgelu"  # the same network as OpenAI's, for a local state dict
LAYER = "visual.layer4.1.conv3"
IPOD = 605  # the ImageNet class "iPod"
HF_FILE = "open_clip_model.safetensors"
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESS = Preprocess(mean=_CLIP_MEAN, std=_CLIP_STD, crop_pct=1.0, interpolation="bicubic")
SIMPLE_TEMPLATES = ("a photo of a {}.",)


def _box(text: str) -> tuple[float, float, float, float]:
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
        raise argparse.ArgumentTypeError(
            f"a box is x0,y0,x1,y1 as fractions of the image with x0 < x1 and y0 < y1 in [0, 1], got {text!r}"
        )
    return box  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.scenarios.typographic",
        description="Typographic attacks: edit zero-shot CLIP-RN50 to read a paper saying 'iPod' as a blank "
        "paper, from one exemplar, and compare with local/global fine-tuning on the same exemplar.",
    )
    common.add_common_arguments(p, layer=LAYER, finetune_steps=800, finetune_lr=1e-5)
    p.add_argument("--text", default="iPod", help="the attack's text (default iPod)")
    p.add_argument("--box", type=_box, default=(0.3, 0.4, 0.7, 0.65),
                   help="where the paper goes on the test photos: x0,y0,x1,y1 as fractions (default 0.3,0.4,0.7,0.65)")
    p.add_argument("--exemplar-box", type=_box, default=(0.2, 0.25, 0.6, 0.5),
                   help="where the paper goes on the exemplar when it is drawn here (default 0.2,0.25,0.6,0.5)")
    p.add_argument("--templates", choices=("auto", "openai", "simple"), default="auto",
                   help="zero-shot prompts: OpenAI's 80 ImageNet templates, or 'a photo of a {}.' "
                        "(auto: openai with real weights, simple with random ones)")
    return p


def rn50_weights() -> PretrainedWeights:
    """open_clip's RN50 'openai' weights (their Hugging Face copy), and where they are looked for."""
    repo = "timm/resnet50_clip.openai"
    import open_clip

    get_cfg = getattr(open_clip, "get_pretrained_cfg", None)  # keep the known repository without it
    if get_cfg is not None:
        repo = (get_cfg("RN50", "openai").get("hf_hub") or repo).strip("/")
    try:
        from huggingface_hub import constants

        cache = constants.HF_HUB_CACHE
    except ImportError:
        cache = "~/.cache/huggingface/hub"
    return PretrainedWeights(
        name="open_clip RN50 'openai' (OpenAI CLIP ResNet-50; Hugging Face repo " + repo + ", 400 MB)",
        url=f"https://huggingface.co/{repo}/resolve/main/{HF_FILE}",
        where=(
            f"anywhere and pass --checkpoint PATH, or into the Hugging Face cache ({cache}):\n"
            f"  huggingface-cli download {repo} {HF_FILE}\n"
            "fills that cache (copy it to this machine, or set HF_HOME)."
        ),
        instructions=(
            "OpenAI's own RN50.pt is a TorchScript archive, which is not loaded (no unpickling); "
            f"use {HF_FILE}."
        ),
    )


def _cached_hf_file() -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo = rn50_weights().url.split("huggingface.co/", 1)[1].split("/resolve/", 1)[0]
    try:
        path = try_to_load_from_cache(repo, HF_FILE)
    except (OSError, ValueError):  # an unreadable cache folder, a bad repo id
        return None
    return path if isinstance(path, str) else None


def load_clip(args: argparse.Namespace) -> tuple[nn.Module, str]:
    """The open_clip CLIP-RN50 model, and what its weights are (``pretrained``, ``checkpoint``, ``random``)."""
    real = args.checkpoint is not None or args.pretrained
    if real and args.size != 224:
        raise ScenarioError(
            f"--size {args.size}: CLIP-RN50's attention pool is built for 224 px; use --size 224 with real weights"
        )
    if args.checkpoint is not None:
        return load_model(SPEC_QUICKGELU, checkpoint=args.checkpoint), "checkpoint"
    if args.pretrained:
        w = rn50_weights()
        cached = _cached_hf_file()
        if cached is not None:  # offline-safe: read the cached file directly, no hub requests
            load = lambda: load_model(SPEC_QUICKGELU, checkpoint=cached)
        else:
            load = lambda: load_model(SPEC, pretrained=True)
        return common.load_pretrained(w, load, cached=cached is not None), "pretrained"
    if args.size % 32:
        raise ScenarioError(f"--size must be a multiple of 32 for CLIP-RN50, got {args.size}")
    torch.manual_seed(args.seed)
    if args.size == 224:
        clip = load_model(SPEC)
    else:
        import open_clip

        clip = open_clip.create_model("RN50", pretrained=None, force_image_size=args.size).eval()
    return common.randomize_batchnorm(clip, args.seed), "random"


def zero_shot(clip: nn.Module, templates: str) -> nn.Module:
    """Zero-shot ImageNet classifier around an open_clip model (the prompts of ``templates``)."""
    from open_clip.zero_shot_metadata import (
        IMAGENET_CLASSNAMES,
        OPENAI_IMAGENET_TEMPLATES,
    )
    from surgery.adapters import ZeroShotClassifier

    chosen = OPENAI_IMAGENET_TEMPLATES if templates == "openai" else SIMPLE_TEMPLATES
    logger.info("encoding %d class names x %d prompt template(s)", len(IMAGENET_CLASSNAMES), len(chosen))
    return ZeroShotClassifier(clip, IMAGENET_CLASSNAMES, templates=chosen).eval()


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def add_paper(
    images: torch.Tensor, box: Sequence[float], text: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw a paper (off-white rectangle) at ``box`` on pixel images, with ``text`` written on it.

    Args:
        images: ``(N, 3, H, W)`` in ``[0, 1]``.
        box: ``x0, y0, x1, y1`` as fractions of the width and height.
        text: the text (dark, centered, as large as fits), or ``None`` for a blank paper.

    Returns:
        The images with the paper, and the paper's mask ``(N, 1, H, W)`` (1 inside the box).
    """
    n, _, h, w = images.shape
    x0, y0, x1, y1 = (round(box[0] * w), round(box[1] * h), round(box[2] * w) - 1, round(box[3] * h) - 1)
    if x1 <= x0 or y1 <= y0:
        raise ScenarioError(f"the paper box {tuple(box)} is empty at {w}x{h} px")
    font = None
    if text:
        size = max(4, int(0.7 * (y1 - y0)))
        while size > 4:
            font = _font(size)
            left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
            if right - left <= 0.85 * (x1 - x0) and bottom - top <= 0.8 * (y1 - y0):
                break
            size -= 1
        font = font or _font(size)
    out = []
    for img in images:
        arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        pil = Image.fromarray(arr)
        d = ImageDraw.Draw(pil)
        d.rectangle([x0, y0, x1, y1], fill=(244, 242, 235), outline=(205, 203, 196))
        if text:
            d.text(((x0 + x1) / 2, (y0 + y1) / 2), text, fill=(25, 25, 30), font=font, anchor="mm")
        out.append(load_images(pil))
    mask = torch.zeros(n, 1, h, w)
    mask[:, :, y0 : y1 + 1, x0 : x1 + 1] = 1.0
    return torch.cat(out).to(images.dtype), mask


def synthetic_object(size: int, seed: int = 0) -> torch.Tensor:
    """A drawn object on a plain background ``(1, 3, S, S)``: a jar-like shape with a lid and shadow.

    For random-weight runs: it proves the code path; a real photo (``--exemplar``) is the real exemplar.
    """
    s = size
    im = Image.new("RGB", (s, s), (214, 206, 192))
    d = ImageDraw.Draw(im)
    d.ellipse([int(0.2 * s), int(0.8 * s), int(0.8 * s), int(0.92 * s)], fill=(170, 162, 150))
    d.rounded_rectangle([int(0.18 * s), int(0.18 * s), int(0.78 * s), int(0.86 * s)],
                        radius=max(1, s // 10), fill=(46, 96, 150))
    d.rectangle([int(0.24 * s), int(0.1 * s), int(0.72 * s), int(0.2 * s)], fill=(120, 120, 126))
    x = load_images(im)
    g = torch.Generator().manual_seed(seed)
    return (x + 0.02 * torch.randn(x.shape, generator=g)).clamp(0.0, 1.0)


def build_exemplar(args: argparse.Namespace) -> Exemplar:
    """Blank paper (original) and text paper (transformed): the user's photographs, or drawn here."""
    original, transformed, mask = common.load_exemplar_files(args, PREPROCESS, args.size)
    if transformed is not None:
        if mask is None:
            logger.warning("no --mask: the whole exemplar image weighs in the edit's direction")
        return Exemplar(original, transformed, mask, f"{args.exemplar} -> {args.exemplar_transformed}")
    if mask is not None:
        raise ScenarioError(
            "--mask goes with --exemplar-transformed (your own photographs); with --exemplar alone the "
            "paper is drawn at --exemplar-box"
        )
    if original is None:
        original, source = synthetic_object(args.size, args.seed), "synthetic object"
    else:
        source = str(args.exemplar)
    blank, mask = add_paper(original, args.exemplar_box, None)
    attacked, _ = add_paper(original, args.exemplar_box, args.text)
    return Exemplar(blank, attacked, mask, f"{source}, {args.text!r} on a paper vs a blank paper")


def run(args: argparse.Namespace, model: nn.Module | None = None) -> dict[str, Any]:
    """Run the scenario; returns the results (also printed, and written under ``--out``)."""
    from surgery.adapters import ZeroShotClassifier

    if model is None:
        clip, weights = load_clip(args)
    else:
        clip, weights = model, "given"
    if weights == "random":
        print(common.RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    device = common.pick_device(args.device)
    clip = clip.to(device).eval()
    templates = args.templates
    if templates == "auto":
        templates = "simple" if weights == "random" else "openai"
    classifier = clip if isinstance(clip, ZeroShotClassifier) else zero_shot(clip, templates)

    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    class_lists = [imagenet_classes(), list(IMAGENET_CLASSNAMES)]
    class_names = list(getattr(classifier, "class_names", class_lists[1]))
    photos = load_labelled_photos(args.photos, class_lists, PREPROCESS.pixels(args.size), max_per_class=args.max_per_class)
    blank, _ = add_paper(photos.images, args.box, None)
    attacked, _ = add_paper(photos.images, args.box, args.text)
    exemplar = build_exemplar(args)
    label = None if args.exemplar_class is None else resolve_class(args.exemplar_class, *class_lists)
    stats_data = None if args.stats_data is None else ImageFolder(args.stats_data, PREPROCESS.model_input(args.size))
    notes = ["random weights: these numbers are meaningless"] if weights == "random" else []
    if args.text != "iPod":
        notes.append(f"the attack's text is {args.text!r}; the watched class is still 'iPod'")
    comparison = common.compare_methods(
        classifier,
        args=args,
        pre=PREPROCESS,
        exemplar=exemplar,
        label=label,
        class_names=class_names,
        photos=photos,
        conditions={"clean": photos.images, "blank": blank, "ipod": attacked},
        target="ipod",
        originals="clean",
        watch_class=IPOD,
        stats_data=stats_data,
        meta={
            "scenario": "typographic",
            "title": f"Typographic attack ({args.text!r} -> blank paper)",
            "model": f"{SPEC} zero-shot ({templates} templates)",
            "weights": weights,
            "text": args.text,
            "box": list(args.box),
            "notes": notes,
        },
    )
    common.report(comparison, args.out)
    return comparison.results


def main(argv: Sequence[str] | None = None, *, model: nn.Module | None = None) -> int:
    """Command-line entry point; ``model`` replaces CLIP-RN50 (an open_clip CLIP model, wrapped here into a
    zero-shot ImageNet classifier, or a ready :class:`~surgery.adapters.ZeroShotClassifier`)."""
    return common.run_cli(lambda args: run(args, model), build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
