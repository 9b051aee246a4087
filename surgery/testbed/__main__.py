"""Command line of the testbed: ``python -m surgery.testbed {preview,table,stats,speed}``."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from .objects import CLASS_NAMES
from .preview import write_preview
from .scenes import Testbed, TestbedConfig, cell_overlap, preference_markdown
from .textures import CONCEPTS, REGIONS

PREVIEW = Path(__file__).with_name("preview.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m surgery.testbed", description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=80, help="canvas side in pixels")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("preview", help="write a preview grid PNG")
    p.add_argument("--out", type=Path, default=PREVIEW)
    sub.add_parser("table", help="print the class -> preferred concepts table")
    p = sub.add_parser(
        "stats", help="preference rates and object/concept separation on feature maps"
    )
    p.add_argument("-n", type=int, default=2000)
    p = sub.add_parser("speed", help="time sampling and rendering of a training set")
    p.add_argument("-n", type=int, default=20000)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads while rendering")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    testbed = Testbed(TestbedConfig(size=args.size), seed=args.seed)

    if args.command == "preview":
        write_preview(args.out, testbed)
    elif args.command == "table":
        print(preference_markdown(testbed.config.table_seed))
    elif args.command == "stats":
        data = testbed.make_dataset(args.n, "train")
        for r, region in enumerate(REGIONS):
            pref = [testbed.table[s.label][region] == s.concepts[r] for s in data.specs]
            print(f"{region}: preferred concept in {100 * sum(pref) / len(pref):.1f}% of scenes")
        counts = torch.bincount(data.concepts.flatten(), minlength=len(CONCEPTS))
        print("scenes per concept:", dict(zip(CONCEPTS, counts.tolist(), strict=True)))
        for cells in (5, 6, 10):
            print(
                f"{cells}x{cells} cells:",
                {k: round(v, 3) for k, v in cell_overlap(data.segmentation, cells).items()},
            )
        obj = (data.segmentation == 0).float().mean((1, 2))
        print(f"object covers {100 * obj.mean():.1f}% of the canvas (min {100 * obj.min():.1f}%)")
        print(f"{len(CLASS_NAMES)} classes, {len(data)} scenes")
    elif args.command == "speed":
        t0 = time.perf_counter()
        specs = testbed.sample(args.n, "train")
        t1 = time.perf_counter()
        images, _ = testbed.render_batch(specs, num_threads=args.threads)
        t2 = time.perf_counter()
        print(
            f"{args.n} scenes at {args.size}px: sampled in {t1 - t0:.1f} s, "
            f"rendered in {t2 - t1:.1f} s "
            f"({args.n / (t2 - t1):.0f} scenes/s, {args.threads} threads), "
            f"{images.numel() / 2**20:.0f} MiB"
        )


if __name__ == "__main__":
    main()
