"""``surgery demo``: the method end to end on the concept testbed, or the real EfficientNet-Lite0."""

from __future__ import annotations

import argparse
from typing import Any

from surgery.demo import run_concept_demo, run_photo_demo

__all__ = ["add_command"]


def _cmd_demo(args: argparse.Namespace) -> int:
    return run_photo_demo(top_k=args.top_k) if args.photos else run_concept_demo(out_dir=args.out)


def add_command(subparsers: Any) -> None:
    """Register ``demo``."""
    p = subparsers.add_parser(
        "demo", help="edit a testbed classifier end to end and compare with fine-tuning (--photos: real weights)"
    )
    p.add_argument("--photos", action="store_true", help="the real EfficientNet-Lite0 on real photos instead")
    p.add_argument("--top-k", type=int, default=3, help="predictions shown per photo (--photos)")
    p.add_argument("--out", default="demo-output", help="folder for the edit file and the figure")
    p.set_defaults(func=_cmd_demo)
