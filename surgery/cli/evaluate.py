"""The ``surgery evaluate`` command: what an edit file fixes and what it costs, on labelled photos.

    surgery evaluate timm:resnet50 --pretrained --edit snow.safetensors --data snowy/ \\
        --originals dry/ --clean val/

Every folder holds one folder per class (``DIR/<class name or index>/*.jpg``). ``--data`` holds the
transformed photos (the concept changed), ``--originals`` the same photos untransformed (same class
folders and file names; then only photos whose original the unedited model gets right count, as in
the paper), ``--clean`` any other labelled photos, for the accuracy the edit costs. Prints errors
before and after the edit per class, writes JSON with ``--json``. The model is not changed; a checkpoint
that already carries the edit is refused (the command applies the edit itself).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from surgery._files import refuse_overwrite, write_text
from surgery.cli.args import (
    add_folder_args,
    add_model_args,
    inputs_of,
    model_class_names,
    model_from_args,
    model_transform,
    write,
)
from surgery.edits.edit import Edit
from surgery.errors import SurgeryError
from surgery.evaluation.metrics import evaluate_edit
from surgery.evaluation.unedited import refuse_edited_model
from surgery.inputs.folders import load_labelled_photos
from surgery.inputs.preprocess import default_input_size

__all__ = ["add_command"]


def _paired_originals(data: Any, originals: Any, folder: str) -> torch.Tensor:
    """``originals.images`` in the order of ``data``, paired by class folder and file name (any extension)."""
    key = originals.stem_index()
    stems = list(data.stem_index())  # in the order of data.files
    missing = [f for f, stem in zip(data.files, stems) if stem not in key]
    if missing:
        raise SurgeryError(
            f"{len(missing)} transformed photo(s) have no original under {folder!r} (e.g. {missing[:3]}); "
            "give every photo of --data its untransformed version at the same path"
        )
    index = torch.tensor([key[stem] for stem in stems])
    if not torch.equal(originals.labels[index], data.labels):
        raise SurgeryError(f"the class folders of --data and --originals {folder!r} do not name the same classes")
    return originals.images[index]


def _cmd_evaluate(args: argparse.Namespace) -> int:
    for flag in ("data", "originals", "clean"):
        folder = getattr(args, flag)
        if folder is not None and not Path(folder).expanduser().is_dir():
            raise SurgeryError(f"--{flag} {folder!r} does not exist or is not a folder")
    alphas = _alphas(args.alpha)
    if args.json:
        refuse_overwrite(args.json, inputs_of(args, "edit", "data", "originals", "clean", "class_names"), what="--json")
    edit = Edit.load(args.edit)  # a bad file fails before the model loads
    model = model_from_args(args).eval()
    refuse_edited_model(  # before any photo is read
        model, edit, "surgery evaluate", alphas=alphas,
        fix=f"pass the unedited model (its checkpoint), or revert the edit first (surgery revert CHECKPOINT {args.edit} -o FILE)",
    )
    transform = model_transform(model, args.size)
    size = args.size or default_input_size(model)[1]
    names = model_class_names(model, args.class_names, size)

    def read(folder: str) -> Any:
        return load_labelled_photos(folder, [names], transform, max_per_class=args.max_per_class)

    data = read(args.data)
    originals = None if args.originals is None else _paired_originals(data, read(args.originals), args.originals)
    clean = None if args.clean is None else read(args.clean)
    groups = {"all": torch.ones(len(data.files), dtype=torch.bool)}
    if len(data.folders) > 1:
        groups.update({folder: data.labels == label for label, folder in sorted(data.folders.items())})
    reports = []
    for alpha in alphas:
        report = evaluate_edit(
            model, edit, data.images, data.labels, groups=groups, originals=originals,
            clean_images=None if clean is None else clean.images, clean_labels=None if clean is None else clean.labels,
            alpha=alpha, batch_size=args.batch_size,
        )
        print(report, end="\n\n" if len(alphas) > 1 else "\n")
        reports.append(report)
    if len(alphas) > 1:
        print(_strength_table(reports))
    if clean is None:
        print("no clean accuracy: pass --clean DIR (labelled photos without the concept) to see what the edit costs")
    if args.json:
        head = {"model": args.model, "edit": str(args.edit), "data": str(args.data), "files": data.files}
        one = len(alphas) == 1
        doc = {**head, **reports[0].to_dict()} if one else {**head, "reports": [r.to_dict() for r in reports]}
        write("report", args.json, lambda p: write_text(p, json.dumps(doc, indent=1) + "\n"))
        print(f"wrote {args.json}")
    return 0


def _alphas(text: str) -> list[float]:
    """``--alpha 1`` or a comma-separated grid ``0.5,1,2``; each in [0, 10]."""
    items = [a.strip() for a in text.split(",")]
    try:
        if any(not a for a in items):
            raise ValueError
        alphas = [float(a) for a in items]
    except ValueError:
        raise SurgeryError(
            f"--alpha must be a number or comma-separated numbers such as 0.5,1,2, got {text!r}"
        ) from None
    if not alphas or any(not 0.0 <= a <= 10.0 for a in alphas):
        raise SurgeryError(f"--alpha must be in [0, 10], got {text}")
    return alphas


def _strength_table(reports: list[Any]) -> str:
    """One line per strength: errors corrected over all photos and the clean accuracy change."""
    lines = ["strength  % corrected (all)  clean change (pp)"]
    for r in reports:
        pct, change = r.group("all").pct_corrected, r.clean_acc_change
        pct_text = "n/a" if math.isnan(pct) else f"{pct:.1f}"
        change_text = "n/a" if change is None else f"{change:+.2f}"
        lines.append(f"{r.alpha:>8g}  {pct_text:>17}  {change_text:>17}")
    return "\n".join(lines)


def add_command(subparsers: Any) -> None:
    """Register ``evaluate`` on the ``surgery`` parser's subparsers."""
    p = subparsers.add_parser(
        "evaluate",
        help="measure an edit file on labelled photos: errors fixed per class, clean accuracy cost",
        description="Predict labelled photos with and without an edit (the model is not changed): errors on "
        "the transformed photos per class, and the accuracy on clean photos.",
        epilog="Folders: DIR/<class name or index>/*.jpg. --originals pairs with --data by class folder and "
        "file name.",
    )
    add_model_args(p)
    p.add_argument("--edit", required=True, metavar="FILE", help="the edit file (.safetensors)")
    p.add_argument("--data", required=True, metavar="DIR", help="labelled photos with the concept transformed")
    p.add_argument("--originals", metavar="DIR", help="the same photos untransformed: count only those the "
                   "unedited model gets right")
    p.add_argument("--clean", metavar="DIR", help="labelled photos for the clean accuracy before and after")
    p.add_argument("--alpha", default="1", help="strength the edit is applied with (default 1), or a grid: 0.5,1,2")
    add_folder_args(p)
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.set_defaults(func=_cmd_evaluate)
