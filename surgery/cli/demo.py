"""``surgery demo``: the method as benchmarked on the concept testbed (the mean over pairs drawn by the
protocol), or the real EfficientNet-Lite0 on real photos."""

from __future__ import annotations

import argparse
from typing import Any

from surgery.cli.args import positive_int
from surgery.demo import run_concept_demo, run_photo_demo
from surgery.demo.concept import DRAWS, PAIRS

__all__ = ["add_command"]


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.photos:
        return run_photo_demo(top_k=args.top_k)
    return run_concept_demo(out_dir=args.out, pairs=args.pairs, draws=args.draws)


def add_command(subparsers: Any) -> None:
    """Register ``demo``."""
    p = subparsers.add_parser(
        "demo", help="edit a testbed classifier end to end and compare with fine-tuning (--photos: real weights)"
    )
    p.add_argument("--photos", action="store_true", help="the real EfficientNet-Lite0 on real photos instead")
    p.add_argument("--top-k", type=int, default=3, help="predictions shown per photo (--photos)")
    p.add_argument("--out", default="demo-output", help="folder for the edit file and the figure")
    p.add_argument("--pairs", type=positive_int, default=PAIRS,
                   help=f"concept-style pairs drawn by the protocol; the result is their mean (default {PAIRS})")
    p.add_argument("--draws", type=positive_int, default=DRAWS,
                   help=f"draws of 3 exemplars per pair (default {DRAWS}; the benchmark draws 5)")
    p.set_defaults(func=_cmd_demo)
