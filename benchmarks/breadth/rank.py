"""Is capacity what the breadth targets lack? The first recommended site edited with 1, 4 and 16 directions
(or from more exemplars).

At the first recommended layer a rank-one edit removes 8-25% of the value difference on the breadth
benchmark's random-weight texture (``benchmarks/results/breadth.md``): the change varies from position to
position and one update adds one output vector scaled by each position's key projection. If that were
what keeps the held-out logit ratio above 0.7, more directions (``rewrite(..., rank=r)``, the top ``r``
directions of the whitened exemplar keys) would lower it. Here, for the models the issue names, the same
data, weights and site as the breadth run, with ranks 1, 4 and 16: the value ratio (exemplars), the
exemplars' and held-out images' logit ratios and the clean change, as the breadth table defines them.
``--exemplars`` draws more exemplars (the held-out, clean and calibration images stay the same);
``--loss-mask`` also makes each edit with its loss counted on the concept masks only (``use_mask=True``).

    OMP_NUM_THREADS=1 python -m benchmarks.breadth.rank [--models a,b] [--ranks 1 4 16] [--exemplars 4] [--loss-mask]

Writes ``benchmarks/results/breadth-rank.{md,json}`` (``--name``).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch

from .driver import run, study_command, study_models, study_parser, write_study

__all__ = ["main", "markdown", "MODELS_NAMED", "RANKS"]

# the per-model targets (timm and torchvision ConvNeXt, EfficientNet-B0, MobileNetV2, ViT-B/16, Swin-T)
MODELS_NAMED = (
    "convnext_atto", "tv_convnext_tiny", "efficientnet_b0", "tv_efficientnet_b0", "tv_mobilenet_v2",
    "swin_tiny_patch4_window7_224", "tv_swin_t", "tv_vit_b_16",
)
RANKS = (1, 4, 16)


def _setting(rank: int, masked: bool) -> str:
    return f"r={rank}" + (", masked loss" if masked else "")


def markdown(result: dict[str, Any]) -> str:
    settings = list(itertools.product(result["ranks"], result.get("loss_masks", [False])))
    labels = [_setting(*one) for one in settings]
    lines = [
        "# Breadth: more directions at the recommended site",
        "",
        f"Command: `{result['command']}`.",
        "",
        f"The breadth benchmark's data ({result.get('exemplars', 4)} exemplars), weights and first recommended layer per model, edited with the default "
        "rewrite of rank r (`rewrite(..., rank=r)`"
        + ("; **masked loss**: `use_mask=True`, the loss counted on the concept masks only" if any(m for _, m in settings) else "")
        + "). Ratios after/before as in breadth.md: **value** (the "
        "transformed exemplars' value distance to the originals'), **exemplars** and **held-out** (logit "
        "distances), **clean** (the clean images' logit change over the held-out distance before).",
        "",
        "| model | layer | site | " + " | ".join(f"value {l} | exemplars {l} | held-out {l} | clean {l}" for l in labels) + " |",
        "|---|---|---|" + "---|" * (4 * len(settings)),
    ]
    held: dict[str, list[float]] = {l: [] for l in labels}
    for m in result["models"]:
        rows = {_setting(row["rank"], row.get("use_mask", False)): row for row in m.get("rows", []) if "error" not in row}
        if not rows:
            lines.append(f"| {m['model']} | {m.get('error', 'no row')} |")
            continue
        first = next(iter(rows.values()))
        cells = []
        for label in labels:
            row = rows.get(label)
            if row is None:
                cells += ["-"] * 4
                continue
            held[label].append(row["heldout_ratio"])
            cells += [f"{row['value_ratio']:.3f}", f"{row['exemplar_ratio']:.3f}", f"{row['heldout_ratio']:.3f}", f"{row['clean_change']:.3f}"]
        lines.append(f"| {m['model']} | `{first['layer']}` | {first['site']} | " + " | ".join(cells) + " |")
    off = [(m["model"], row["value_change_off_mask"]) for m in result["models"] for row in m.get("rows", [])[:1]
           if "value_change_off_mask" in row]
    if any(masked for _, masked in settings) and off:
        lines += [
            "",
            "Share of the exemplars' value change (L1, at the site) that the masked loss discounts, i.e. that lies "
            "at positions outside the concept mask (positions weighted by the area-pooled mask, as the loss "
            "weighs them): " + ", ".join(f"{name} {share:.2f}" for name, share in off) + ".",
        ]
    lines += ["", "Median held-out ratio: " + ", ".join(f"{l.replace('r=', 'rank ')} {np.median(v):.3f}" for l, v in held.items() if v) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = study_parser("benchmarks.breadth.rank", __doc__, name="breadth-rank", models=MODELS_NAMED)
    p.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    p.add_argument("--exemplars", type=int, default=4)
    p.add_argument("--loss-mask", action="store_true", help="also edit each rank with the loss on the concept masks only")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    loss_masks = [False, True] if args.loss_mask else [False]
    models = run(
        study_models(args.models), k=1, images={"exemplars": args.exemplars}, ranks=args.ranks,
        loss_masks=loss_masks,
    )["models"]
    result: dict[str, Any] = {
        "command": study_command("benchmarks.breadth.rank", argv),
        "ranks": args.ranks,
        "exemplars": args.exemplars,
        "loss_masks": loss_masks,
        "models": models,
    }
    write_study(args.out, args.name, result, markdown)
    return result


if __name__ == "__main__":
    main()
