"""Is strength what the breadth targets lack? The default edit at the first recommended site, applied at
several strengths.

The breadth run applies each edit at strength 1, the least-squares fit to the exemplars. If the held-out
images carried the texture more weakly along the edit's direction than the exemplars do, a stronger edit
would move their logits further. Here, for the models the targets name, the same data, weights, site and
edit as the breadth run, applied with ``alpha`` in a grid: the exemplars' and held-out images' logit ratios
and the clean change, as breadth.md defines them. **chosen**: the strength whose exemplars' ratio is lowest,
chosen without the held-out images.

    OMP_NUM_THREADS=1 python -m benchmarks.breadth.strength [--models a,b] [--alphas 0.5 1 1.5 2 3 4]

Writes ``benchmarks/results/breadth-strength.{md,json}`` (``--name``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import surgery
from surgery.edits.apply import edited

from .driver import model_specs, prepare_run, study_command, study_models, study_parser, write_study
from .measure import current_ratios
from .models import ModelSpec
from .rank import MODELS_NAMED

__all__ = ["main", "markdown", "measure_strengths", "ALPHAS"]

ALPHAS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


def measure_strengths(spec: ModelSpec, alphas: tuple[float, ...], images: dict[str, int] | None = None) -> dict[str, Any]:
    """One model: its first recommended layer's default edit at each strength of ``alphas`` (``images``:
    the image counts, as ``prepare_run`` takes them)."""
    data, model, base = prepare_run(spec, images=images)
    layer = surgery.recommended_layers(model, k=1)[0]
    stats = surgery.collect_key_stats(model, layer, data.calibration, batch_size=16, progress=False)
    edit = surgery.rewrite(model, layer, data.x, data.x2, data.masks, stats=stats)
    rows = []
    for alpha in alphas:
        with edited(model, edit, alpha=alpha):
            rows.append({"alpha": alpha, **current_ratios(model, data, base)})
    chosen = min(rows, key=lambda r: r["exemplar_ratio"])
    return {"model": spec.id, "layer": layer.name, "rows": rows, "chosen_alpha": chosen["alpha"]}


def markdown(result: dict[str, Any]) -> str:
    alphas = result["alphas"]
    lines = [
        "# Breadth: the edit's strength",
        "",
        f"Command: `{result['command']}`.",
        "",
        "The breadth benchmark's data, weights, first recommended layer and default edit per model, applied at "
        "strength `alpha`. Ratios after/before as in breadth.md: **exemplars** / **held-out** (logit distances "
        "to the originals'), **clean** (the clean images' logit change over the held-out distance before). "
        "**chosen**: the strength with the lowest exemplars' ratio (no held-out image used), and its held-out "
        "ratio.",
        "",
        "| model | layer | " + " | ".join(f"exemplars / held-out / clean at {a:g}" for a in alphas) + " | chosen | held-out at chosen |",
        "|---|---|" + "---|" * (len(alphas) + 2),
    ]
    at_one, at_chosen, best = [], [], []
    for m in result["models"]:
        rows = {r["alpha"]: r for r in m["rows"]}
        cells = [f"{r['exemplar_ratio']:.3f} / {r['heldout_ratio']:.3f} / {r['clean_change']:.3f}" for r in m["rows"]]
        chosen = rows[m["chosen_alpha"]]
        lines.append(
            f"| {m['model']} | `{m['layer']}` | " + " | ".join(cells) + f" | {m['chosen_alpha']:g} | {chosen['heldout_ratio']:.3f} |"
        )
        if 1.0 in rows:
            at_one.append(rows[1.0]["heldout_ratio"])
        at_chosen.append(chosen["heldout_ratio"])
        best.append(min(r["heldout_ratio"] for r in m["rows"]))
    lines += [
        "",
        "Median held-out ratio: "
        + (f"strength 1 {np.median(at_one):.3f}, " if at_one else "")
        + f"chosen strength {np.median(at_chosen):.3f}, best strength per model by the held-out images "
        f"themselves (not a choice a user can make) {np.median(best):.3f}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = study_parser("benchmarks.breadth.strength", __doc__, name="breadth-strength", models=MODELS_NAMED)
    p.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    alphas = tuple(sorted(args.alphas))
    specs = model_specs(study_models(args.models))
    result: dict[str, Any] = {
        "command": study_command("benchmarks.breadth.strength", argv),
        "alphas": list(alphas),
        "models": [measure_strengths(spec, alphas) for spec in specs.values()],
    }
    write_study(args.out, args.name, result, markdown)
    return result


if __name__ == "__main__":
    main()
