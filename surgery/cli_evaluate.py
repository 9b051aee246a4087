"""The ``surgery evaluate`` command: what an edit file fixes and what it costs, on labelled photos.

    surgery evaluate timm:resnet50 --pretrained --edit snow.safetensors --data snowy/ \\
        --originals dry/ --clean val/

Every folder holds one folder per class (``DIR/<class name or index>/*.jpg``). ``--data`` holds the
transformed photos (the concept changed), ``--originals`` the same photos untransformed (same class
folders and file names; then only photos whose original the unedited model gets right count, as in
the paper), ``--clean`` any other labelled photos, for the accuracy the edit costs. Prints errors
before and after the edit per class, writes JSON with ``--json``. The model is not changed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from .cli import _add_folder_args, _add_model_args, _class_names, _load_model, _transform, _write
from .errors import SurgeryError

__all__ = ["add_command"]


def _paired_originals(data: Any, originals: Any, folder: str) -> torch.Tensor:
    """``originals.images`` in the order of ``data``, paired by class folder and file name (any extension)."""
    key = {Path(f).with_suffix("").as_posix(): i for i, f in enumerate(originals.files)}
    missing = [f for f in data.files if Path(f).with_suffix("").as_posix() not in key]
    if missing:
        raise SurgeryError(
            f"{len(missing)} transformed photo(s) have no original under {folder!r} (e.g. {missing[:3]}); "
            "give every photo of --data its untransformed version at the same path"
        )
    index = torch.tensor([key[Path(f).with_suffix("").as_posix()] for f in data.files])
    if not torch.equal(originals.labels[index], data.labels):
        raise SurgeryError(f"the class folders of --data and --originals {folder!r} do not name the same classes")
    return originals.images[index]


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .class_folders import load_labelled_photos
    from .edit_file import load_edit
    from .metrics import evaluate_edit
    from .models import default_input_size

    for flag in ("data", "originals", "clean"):
        folder = getattr(args, flag)
        if folder is not None and not Path(folder).expanduser().is_dir():
            raise SurgeryError(f"--{flag} {folder!r} does not exist or is not a folder")
    if not 0.0 <= args.alpha <= 10.0:
        raise SurgeryError(f"--alpha must be in [0, 10], got {args.alpha}")
    edit = load_edit(args.edit)  # a bad file fails before the model loads
    model = _load_model(args).eval()
    transform = _transform(model, args.size)
    size = args.size or default_input_size(model)[1]
    names = _class_names(model, args.class_names, size)

    def read(folder: str) -> Any:
        return load_labelled_photos(folder, [names], transform, max_per_class=args.max_per_class)

    data = read(args.data)
    originals = None if args.originals is None else _paired_originals(data, read(args.originals), args.originals)
    clean = None if args.clean is None else read(args.clean)
    groups = {"all": torch.ones(len(data.files), dtype=torch.bool)}
    if len(data.folders) > 1:
        groups.update({folder: data.labels == label for label, folder in sorted(data.folders.items())})
    report = evaluate_edit(
        model, edit, data.images, data.labels, groups=groups, originals=originals,
        clean_images=None if clean is None else clean.images, clean_labels=None if clean is None else clean.labels,
        alpha=args.alpha, batch_size=args.batch_size,
    )
    print(report)
    if clean is None:
        print("no clean accuracy: pass --clean DIR (labelled photos without the concept) to see what the edit costs")
    if args.json:
        doc = {"model": args.model, "edit": str(args.edit), "data": str(args.data), "files": data.files, **report.to_dict()}
        _write("report", args.json, lambda p: Path(p).write_text(json.dumps(doc, indent=1) + "\n"))
        print(f"wrote {args.json}")
    return 0


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
    _add_model_args(p)
    p.add_argument("--edit", required=True, metavar="FILE", help="the edit file (.safetensors)")
    p.add_argument("--data", required=True, metavar="DIR", help="labelled photos with the concept transformed")
    p.add_argument("--originals", metavar="DIR", help="the same photos untransformed: count only those the "
                   "unedited model gets right")
    p.add_argument("--clean", metavar="DIR", help="labelled photos for the clean accuracy before and after")
    p.add_argument("--alpha", type=float, default=1.0, help="strength the edit is applied with (default 1)")
    _add_folder_args(p)
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.set_defaults(func=_cmd_evaluate)
