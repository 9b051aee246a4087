"""What the two scenario runners share: loading weights (or failing clearly), photos, exemplars, the
edit vs fine-tuning comparison, the tables and the JSON.

A runner (``snow``, ``typographic``) builds its model, its exemplar (original, transformed, mask) and
its test conditions (pixel-space image batches of the same photos, e.g. clean / blank paper / "iPod"),
then calls :func:`compare_methods` and :func:`report`. Images stay in pixel space (``[0, 1]``) until
they meet the model: concepts are pasted on pixels, and :class:`Preprocess` normalizes right before
every call into the library.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import surgery
from surgery.edits.edit import Edit
from surgery.errors import ModelLoadError, SurgeryError
from surgery.evaluation.metrics import predict
from surgery.identity import tensor_sha256
from surgery.inputs.folders import LabelledPhotos
from surgery.inputs.images import load_images
from surgery.inputs.masks import load_masks
from surgery.inputs.preprocess import Preprocess
from surgery.models.random_init import randomize_batchnorm


__all__ = [
    "METHODS",
    "RANDOM_WEIGHTS_WARNING",
    "Exemplar",
    "PretrainedWeights",
    "ScenarioError",
    "add_common_arguments",
    "compare_methods",
    "load_exemplar_files",
    "load_pretrained",
    "markdown_tables",
    "randomize_batchnorm",
    "reachable",
    "report",
    "run_cli",
    "snow_texture",
]

logger = logging.getLogger(__name__)

METHODS = ("unedited", "edit", "finetune-local", "finetune-global")
"""The rows of every table: the model as loaded, the rank-one edit, and the two fine-tuning baselines."""

RANDOM_WEIGHTS_WARNING = (
    "RANDOM WEIGHTS: the model is randomly initialized, so every number below is meaningless. "
    "This run only proves the code path; pass --pretrained (or --checkpoint PATH) for real results."
)


class ScenarioError(SurgeryError):
    """A scenario cannot run as asked (missing weights, a bad photo folder, ...); the message says why."""


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def add_common_arguments(
    parser: argparse.ArgumentParser,
    *,
    layer: str,
    finetune_steps: int,
    finetune_lr: float,
) -> argparse.ArgumentParser:
    """The options both runners take (the scenario's own defaults for layer and fine-tuning)."""
    p = parser
    p.add_argument("--photos", required=True, type=Path,
                   help="test photos, one folder per class: DIR/<class>/*.jpg; <class> is an ImageNet "
                        "class name (e.g. 'racer', 'fire_engine') or index (e.g. 751)")
    p.add_argument("--pretrained", action="store_true",
                   help="load the real ImageNet weights (downloaded on first use); without it the model "
                        "is random and the numbers are meaningless")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="local weights to load instead of downloading (a state dict: .safetensors or "
                        ".pth saved with torch.save)")
    p.add_argument("--layer", default=layer, help=f"the layer to edit and fine-tune (default {layer})")
    p.add_argument("--size", type=int, default=224, help="input size in pixels (default 224)")
    p.add_argument("--exemplar", type=Path, default=None,
                   help="the exemplar's original image (default: a synthetic one)")
    p.add_argument("--exemplar-transformed", type=Path, default=None,
                   help="the same image with the concept transformed (default: made here)")
    p.add_argument("--mask", type=Path, default=None,
                   help="a PNG mask of the concept on the exemplar (white = concept)")
    p.add_argument("--exemplar-class", default=None,
                   help="the exemplar's class (name or index), the fine-tuning label; default: the "
                        "unedited model's prediction on the original exemplar")
    p.add_argument("--stats-data", type=Path, default=None,
                   help="a folder of clean images for the key statistics (default: the photos)")
    p.add_argument("--stats-max-images", type=int, default=None, help="use at most this many for the statistics")
    p.add_argument("--cache-dir", type=Path, default=None, help="cache the key statistics here")
    p.add_argument("--solver", choices=("fast", "reference"), default="fast",
                   help="rewrite solver (default fast; reference: the paper's Adam, 20,000 steps)")
    p.add_argument("--edit-steps", type=int, default=None,
                   help="solver iterations (default: fast 100, reference 20,000)")
    p.add_argument("--ridge", type=float, default=0.0, help="fast solver: a ridge that weakens the edit")
    p.add_argument("--finetune-steps", type=int, default=finetune_steps,
                   help=f"SGD steps of both fine-tuning baselines (default {finetune_steps})")
    p.add_argument("--finetune-lr", type=float, default=finetune_lr,
                   help=f"SGD learning rate of both fine-tuning baselines (default {finetune_lr:g})")
    p.add_argument("--max-steps", type=int, default=None,
                   help="cap on every iterative step count (edit and fine-tuning), for quick runs")
    p.add_argument("--max-per-class", type=int, default=None, help="use at most this many photos per class")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and synthetic images")
    p.add_argument("--out", type=Path, default=None,
                   help="write results.json, results.md, the edit file and the exemplar picture here")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return p


def run_cli(
    run: Callable[[argparse.Namespace], dict[str, Any]],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
) -> int:
    """Parse ``argv``, run, and turn a :class:`SurgeryError` into one message and exit status 2."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    for what in ("max_steps", "finetune_steps", "edit_steps", "size", "batch_size", "max_per_class"):
        value = getattr(args, what, None)
        if value is not None and value < (0 if what == "finetune_steps" else 1):
            parser.error(f"--{what.replace('_', '-')} must be positive, got {value}")
    try:
        run(args)
    except SurgeryError as e:  # ScenarioError, and every bad-input error of the library
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def capped(steps: int | None, cap: int | None) -> int | None:
    """``steps`` limited to ``cap`` (``None`` steps: the library default, capped when a cap is set)."""
    if cap is None:
        return steps
    return cap if steps is None else min(steps, cap)


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------------------------------------
# pretrained weights, or a clear message saying what to download and where to put it
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainedWeights:
    """Where a set of pretrained weights comes from and where the loader looks for it.

    Attributes:
        name: what the user reads, e.g. ``torchvision VGG16_BN_Weights.IMAGENET1K_V1``.
        url: the file to download.
        where: where to put it so that the loader finds it without network (one or more lines).
        instructions: further ways to provide it (one or more lines).
    """

    name: str
    url: str
    where: str
    instructions: str = ""

    def message(self, reason: str) -> str:
        lines = [
            f"cannot load the pretrained weights {self.name}.",
            f"  Reason: {reason}",
            "  They are downloaded on first use, which needs network access. To run offline, download",
            f"    {self.url}",
            "  on a machine with network and put the file",
        ]
        lines += [f"    {line}" for line in self.where.splitlines()]
        if self.instructions:
            lines += [f"  {line}" for line in self.instructions.splitlines()]
        lines.append("  Without --pretrained the scenario runs on random weights (numbers meaningless).")
        return "\n".join(lines)


def reachable(url: str, timeout: float = 3.0) -> str | None:
    """``None`` when a TCP connection to ``url``'s host opens within ``timeout`` s, else the reason."""
    parsed = urlparse(url)
    host = parsed.hostname or url
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{host} cannot be reached ({type(e).__name__}: {e})"


@contextlib.contextmanager
def quiet_logging(level: int = logging.ERROR) -> Iterator[None]:
    """Silence log records up to ``level`` (download retries, loaders' own error logs) for a while."""
    previous = logging.root.manager.disable
    logging.disable(level)
    try:
        yield
    finally:
        logging.disable(previous)


def load_pretrained(
    weights: PretrainedWeights,
    load: Callable[[], nn.Module],
    *,
    cached: bool,
    probe_url: str | None = None,
) -> nn.Module:
    """Run ``load()`` for pretrained weights, or raise a :class:`ScenarioError` naming what to download.

    When the weights are not ``cached`` and ``probe_url``'s host (default ``weights.url``) cannot be
    reached within a few seconds, fail at once instead of waiting on download retries.
    """
    if not cached:
        reason = reachable(probe_url or weights.url)
        if reason is not None:
            raise ScenarioError(weights.message(f"they are not cached here and {reason}"))
    try:
        with quiet_logging():
            return load()
    except ModelLoadError as e:
        raise ScenarioError(weights.message(str(e))) from None


# --------------------------------------------------------------------------------------------------
# class names, photos and exemplars
# --------------------------------------------------------------------------------------------------


@dataclass
class Exemplar:
    """One exemplar in pixel space: ``original`` ``(1, 3, S, S)``, ``transformed`` likewise, ``mask``
    ``(1, 1, S, S)`` in ``[0, 1]`` (``None``: the whole image), and where it came from."""

    original: torch.Tensor
    transformed: torch.Tensor
    mask: torch.Tensor | None
    source: str

    def picture(self) -> Image.Image:
        """original | transformed | mask, side by side."""
        mask = torch.ones_like(self.original[:, :1]) if self.mask is None else self.mask
        strip = torch.cat([self.original[0], self.transformed[0], mask[0].expand(3, -1, -1)], dim=2)
        arr = (strip.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        return Image.fromarray(arr)


def load_exemplar_files(
    args: argparse.Namespace, pre: Preprocess, size: int
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The user's exemplar files (``--exemplar``, ``--exemplar-transformed``, ``--mask``) in pixel space.

    The mask is drawn on the exemplar image, so it goes through the same resize and crop. Any of the
    three may be ``None``; the runner makes what is missing.

    Raises:
        ScenarioError: a transformed image or mask without ``--exemplar``, or a mask whose size is not
            the exemplar's.
    """
    if args.exemplar is None:
        if args.exemplar_transformed is not None or args.mask is not None:
            raise ScenarioError("--exemplar-transformed and --mask need --exemplar (the original image)")
        return None, None, None
    transform = pre.pixels(size)
    original = load_images([args.exemplar], transform)
    transformed = None
    if args.exemplar_transformed is not None:
        with Image.open(args.exemplar) as a, Image.open(args.exemplar_transformed) as b:
            if a.size != b.size:
                raise ScenarioError(
                    f"--exemplar is {a.size[0]}x{a.size[1]} but --exemplar-transformed is "
                    f"{b.size[0]}x{b.size[1]} (WxH); they must be the same picture, transformed"
                )
        transformed = load_images([args.exemplar_transformed], transform)
    mask = None
    if args.mask is not None:

        with Image.open(args.exemplar) as im:
            w, h = im.size
        m = load_masks(args.mask, size=(h, w))[0, 0] >= 0.5
        mask = pre.mask_pixels(m[None, None].float(), size)
        if not bool((mask > 0).any()):
            raise ScenarioError(f"mask {str(args.mask)!r} covers nothing inside the center crop")
    return original, transformed, mask


def snow_texture(size: int | tuple[int, int], seed: int = 0) -> torch.Tensor:
    """A procedural snow texture ``(3, H, W)`` in ``[0, 1]``: white with soft blobs, shadows and flakes.

    Smooth noise at several scales makes drifts and tracks, a slight blue tint the shade; bright
    single-pixel flakes the sparkle.
    """
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(seed)
    field_ = torch.zeros(1, 1, h, w)
    for cells, weight in ((3, 0.5), (7, 0.3), (17, 0.15), (41, 0.05)):
        noise = torch.rand(1, 1, cells, cells, generator=g)
        field_ += weight * F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False)
    field_ = (field_ - field_.mean()) / field_.std().clamp_min(1e-6)
    brightness = 0.86 + 0.06 * field_
    tint = torch.tensor([0.95, 0.97, 1.0])[:, None, None]
    tex = brightness[0] * tint
    flakes = (torch.rand(1, h, w, generator=g) > 0.985).float()
    tex = tex + 0.12 * flakes + 0.02 * torch.randn(3, h, w, generator=g)
    return tex.clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# the comparison: edit vs local / global fine-tuning on one exemplar
# --------------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """What :func:`compare_methods` returns: the JSON-ready ``results`` and the rewrite edit."""

    results: dict[str, Any]
    edit: Edit
    exemplar: Exemplar
    edits: dict[str, Edit | None] = field(repr=False, default_factory=dict)


def _predict(model: nn.Module, x: torch.Tensor, pre: Preprocess, batch_size: int) -> torch.Tensor:
    return predict(model, x, preprocess=pre.normalize, batch_size=batch_size)


def _fingerprints(model: nn.Module, names: set[str]) -> dict[str, str]:
    params = dict(model.named_parameters())
    return {n: tensor_sha256(params[n]) for n in sorted(names)}


def _pct(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 4)


def _errors(wrong_pre: torch.Tensor, wrong_post: torch.Tensor, counted: torch.Tensor) -> dict[str, Any]:
    e_pre, e_post = int(wrong_pre[counted].sum()), int(wrong_post[counted].sum())
    return {
        "n": int(counted.sum()),
        "errors_before": e_pre,
        "errors_after": e_post,
        "pct_corrected": _pct(surgery.errors_corrected(e_pre, e_post)),
    }


def compare_methods(
    model: nn.Module,
    *,
    args: argparse.Namespace,
    pre: Preprocess,
    exemplar: Exemplar,
    label: int | None,
    class_names: Sequence[str],
    photos: LabelledPhotos,
    conditions: Mapping[str, torch.Tensor],
    target: str,
    originals: str | None = None,
    watch_class: int | None = None,
    stats_data: Any = None,
    extra: Mapping[str, LabelledPhotos] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Comparison:
    """Edit and fine-tune on one exemplar; evaluate the four methods on every condition.

    Args:
        model: the classifier (eval mode, on its device), taking normalized images.
        args: the parsed common options (layer, solver, steps, batch size, ...).
        pre: normalization of pixel images.
        exemplar: original, transformed and mask, in pixel space.
        label: the exemplar's class (the fine-tuning target); ``None``: the unedited model's
            prediction on the original exemplar.
        class_names: the model's class names.
        photos: the labelled photos (labels and files for every condition).
        conditions: name -> pixel images ``(N, 3, S, S)``, one per photo, same order as ``photos``.
        target: the condition whose errors the edit should correct (e.g. ``"snowy"``, ``"ipod"``).
        originals: a condition holding the untransformed photos: errors are then counted only on
            photos whose original the unedited model classifies correctly (as the paper's code).
        watch_class: report how often each method predicts this class (e.g. "iPod").
        stats_data: clean model inputs for the key statistics (tensor or dataset); default the
            photos of ``originals`` (or of ``target``), normalized.
        extra: other labelled photo sets (e.g. ``"clean"`` photos that are not versions of
            ``photos``): each method's accuracy on them is reported next to the conditions.
        meta: extra entries for the results (scenario, model, weights, ...).
    """
    layer = surgery.get_layer(model, args.layer)
    extra = dict(extra or {})
    clash = set(extra) & set(conditions)
    if clash:
        raise ScenarioError(f"photo sets {sorted(clash)} are named like conditions")
    times: dict[str, float] = {}
    batch = args.batch_size

    # the exemplar's class: given, or the unedited model's prediction on the original
    x, x2 = exemplar.original, exemplar.transformed
    pred_x, pred_x2 = _predict(model, torch.cat([x, x2]), pre, batch).tolist()
    label_given = label is not None
    if label is None:
        label = pred_x

    # key statistics
    t0 = time.perf_counter()
    if stats_data is None:
        stats_data = pre.normalize(conditions[originals or target])
    stats = surgery.collect_key_stats(
        model, layer, stats_data, max_images=args.stats_max_images, batch_size=batch,
        cache_dir=args.cache_dir, progress=False,
    )
    times["key_stats"] = time.perf_counter() - t0

    # the three edits
    edits: dict[str, Edit | None] = {"unedited": None}
    t0 = time.perf_counter()
    edits["edit"] = surgery.rewrite(
        model, layer, pre.normalize(x), pre.normalize(x2), exemplar.mask, stats=stats,
        solver=args.solver, steps=capped(args.edit_steps, args.max_steps),
        **({"ridge": args.ridge} if args.solver == "fast" else {}),
    )
    times["edit"] = time.perf_counter() - t0
    steps = capped(args.finetune_steps, args.max_steps)
    for scope in ("local", "global"):
        t0 = time.perf_counter()
        edits[f"finetune-{scope}"] = surgery.finetune(
            model, layer, pre.normalize(x2), [label], scope=scope, steps=steps, lr=args.finetune_lr,
        )
        times[f"finetune-{scope}"] = time.perf_counter() - t0

    # predictions: the unedited model first, then each edit applied for its own predictions only
    touched = {n for e in edits.values() if e is not None for n in e.parameter_deltas()}
    before = _fingerprints(model, touched)
    preds: dict[str, dict[str, torch.Tensor]] = {}
    t0 = time.perf_counter()
    for method, edit in edits.items():
        ctx = contextlib.nullcontext() if edit is None else surgery.edited(model, edit)
        with ctx:
            preds[method] = {c: _predict(model, imgs, pre, batch) for c, imgs in conditions.items()}
            for name, ph in extra.items():
                preds[method][name] = _predict(model, ph.images, pre, batch)
        if _fingerprints(model, touched) != before:  # edited() restores exactly; never trust silently
            raise ScenarioError(f"the model was not restored after evaluating {method!r}")
    times["evaluate"] = time.perf_counter() - t0

    y = photos.labels
    counted = torch.ones_like(y, dtype=torch.bool)
    if originals is not None:
        counted = preds["unedited"][originals] == y
    classes = sorted(photos.folders)
    results_methods: dict[str, Any] = {}
    for method, edit in edits.items():
        p = preds[method]
        wrong_pre, wrong_post = preds["unedited"][target] != y, p[target] != y
        entry: dict[str, Any] = {
            "hparams": {} if edit is None else dict(edit.hparams),
            "changed_params": {}
            if edit is None
            else {n: float(d.double().norm()) for n, d in edit.parameter_deltas().items()},
            "accuracy": {
                **{c: 100.0 * float((p[c] == y).double().mean()) for c in conditions},
                **{n: 100.0 * float((p[n] == ph.labels).double().mean()) for n, ph in extra.items()},
            },
            "per_class": {
                photos.folders[k]: {
                    "class": k,
                    "name": class_names[k],
                    "n": int((y == k).sum()),
                    "accuracy": {c: 100.0 * float((p[c][y == k] == k).double().mean()) for c in conditions},
                    "errors": _errors(wrong_pre, wrong_post, counted & (y == k)),
                }
                for k in classes
            },
            "errors": _errors(wrong_pre, wrong_post, counted),
            "predictions": {c: p[c].tolist() for c in [*conditions, *extra]},
        }
        if watch_class is not None:
            entry["pct_predicted_watch_class"] = {
                c: 100.0 * float((p[c] == watch_class).double().mean()) for c in conditions
            }
        if edit is not None and "loss_before" in edit.info:
            entry["exemplar_loss"] = {"before": edit.info["loss_before"], "after": edit.info["loss_after"]}
        results_methods[method] = entry

    results: dict[str, Any] = dict(meta or {})
    results.update(
        layer=layer.name,
        size=args.size,
        exemplar={
            "source": exemplar.source,
            "label": label,
            "label_name": class_names[label],
            "label_given": label_given,
            "unedited_prediction_original": pred_x,
            "unedited_prediction_transformed": pred_x2,
        },
        photos={
            "root": str(args.photos),
            "n": len(photos.files),
            "files": photos.files,
            "labels": y.tolist(),
            "classes": {photos.folders[k]: k for k in classes},
        },
        conditions=list(conditions),
        extra_sets={
            n: {"n": len(ph.files), "files": ph.files, "labels": ph.labels.tolist()} for n, ph in extra.items()
        },
        target_condition=target,
        restricted_to_correct_originals=originals is not None,
        originals_condition=originals,
        watch_class=None if watch_class is None else {"index": watch_class, "name": class_names[watch_class]},
        key_stats={"key_vectors": int(stats.count), "dataset_id": stats.dataset_id},
        methods=results_methods,
        model_restored_after_each_method=True,
        seconds=times,
    )
    return Comparison(results=results, edit=edits["edit"], exemplar=exemplar, edits=edits)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# tables and files
# --------------------------------------------------------------------------------------------------


def _f(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown_tables(results: Mapping[str, Any]) -> str:
    """The summary table (one row per method) and the per-class table on the target condition."""
    conds = [*results["conditions"], *results.get("extra_sets", {})]
    target = results["target_condition"]
    methods = results["methods"]
    watch = results.get("watch_class")
    lines: list[str] = []
    if results.get("weights") == "random":
        lines += [f"**{RANDOM_WEIGHTS_WARNING}**", ""]
    scope = (
        f"counting only photos whose {results['originals_condition']} version the unedited model "
        "classifies correctly"
        if results["restricted_to_correct_originals"]
        else "counting all photos"
    )
    ex = results["exemplar"]
    lines.append(
        f"{results.get('title', 'Scenario')}: {results.get('model', '')} layer {results['layer']}, "
        f"{results['photos']['n']} photos in {len(results['photos']['classes'])} classes, one exemplar "
        f"({ex['source']}; class {ex['label_name']!r} for fine-tuning). % errors corrected on "
        f"'{target}' photos, {scope}."
    )
    lines.append("")
    head = ["method"] + [f"acc. {c} (%)" for c in conds]
    head += [f"errors on {target} (before -> after)", "% errors corrected"]
    if watch:
        head.append(f"% predicted {watch['name']!r} on {target}")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in METHODS:
        m = methods[method]
        err = m["errors"]
        row = [method] + [_f(m["accuracy"][c]) for c in conds]
        row += [
            f"{err['errors_before']} -> {err['errors_after']} of {err['n']}",
            "-" if method == "unedited" else _f(err["pct_corrected"]),
        ]
        if watch:
            row.append(_f(m["pct_predicted_watch_class"][target]))
        lines.append("| " + " | ".join(row) + " |")
    if results.get("notes"):
        lines.append("")
    for note in results.get("notes", []):
        lines.append(f"- {note}")
    lines += ["", f"Per class, on '{target}' photos: accuracy (%) and, for the three edits, % errors corrected."]
    head = ["class", "n"] + [m for m in METHODS]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for folder, info in methods["unedited"]["per_class"].items():
        row = [f"{folder} ({info['class']}: {info['name']})", str(info["n"])]
        for method in METHODS:
            pc = methods[method]["per_class"][folder]
            acc = _f(pc["accuracy"][target])
            row.append(acc if method == "unedited" else f"{acc} ({_f(pc['errors']['pct_corrected'])})")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def report(comparison: Comparison, out: Path | None) -> str:
    """Print the tables; with ``out``, write results.json, results.md, edit.safetensors, exemplar.png."""
    text = markdown_tables(comparison.results)
    print(text)
    if out is not None:
        out = Path(out).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        comparison.edit.save(out / "edit.safetensors")
        comparison.exemplar.picture().save(out / "exemplar.png")
        results = dict(comparison.results, files={
            "edit": "edit.safetensors", "exemplar": "exemplar.png", "table": "results.md",
        })
        (out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
        (out / "results.md").write_text(text + "\n")
        print(f"\nwrote {out / 'results.json'}, results.md, edit.safetensors and exemplar.png")
    return text


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
