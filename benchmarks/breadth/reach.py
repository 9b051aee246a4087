"""What is within a weight edit's reach on the breadth benchmark? An edit fitted on the held-out images
themselves, and edits of several sites in sequence.

The breadth targets (held-out logit ratio at or below 0.7 on the named models, median 0.6) are not met by
any lever measured so far: more directions, more exemplars, strength, a masked loss, spans. Two
measurements say how far a weight edit can go at all on this benchmark, for each model's first ``K``
recommended layers (family order, ``recommended_layers(model, k=K)``):

- **fitted on the held-out images** (a reference, not a choice a user can make): the default rewrite of
  rank ``r`` fitted to the held-out images themselves (their originals, transformed copies and masks) and
  measured on them. If it leaves their logit ratio above 0.7, better or more exemplars -- the lever a user
  has -- would not bring the method's edit of rank ``r`` at that layer to the target: the layer's update of
  that rank cannot carry the change even for the images it is fitted on. It is not a strict bound (the
  objective is the value's distance, not the logits'; the report counts the layers where the exemplars'
  edit happens to move the held-out logits further). Beside it, the breadth run's own edit (fitted on the
  exemplars).
- **several sites in sequence**: the first ``n`` (up to ``--chain``) of those layers in forward order, each edited with the
  default rewrite on the model carrying the edits before it (its key statistics collected there, its
  target the originals' values at its own site), all applied together: does the effect compound where a
  span (one stage, one shape) cannot go?

    OMP_NUM_THREADS=1 python -m benchmarks.breadth.reach [--models a,b] [--layers 3] [--chain 3] [--ranks 1 4 16]
    python -m benchmarks.breadth.reach --join A.json B.json --name NAME   # runs on other models, as one

Writes ``benchmarks/results/breadth-reach.{md,json}`` (``--name``); while it runs, ``<name>.partial.json`` holds
the models measured so far (a run stopped midway keeps them; ``--join`` takes it like a finished run).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import surgery
from surgery._files import write_text
from surgery.edits.apply import edited

from .concept import Data
from .driver import model_specs, prepare_run, study_command, study_models, study_parser, write_study
from .measure import current_ratios
from .models import MODELS
from .rank import MODELS_NAMED

__all__ = ["main", "markdown", "measure_reach", "join_runs", "RANKS"]

RANKS = (1, 4, 16)
TARGET = 0.7  # the per-model held-out ratio


def _stats(model: nn.Module, layer: str, data: Data) -> surgery.KeyStats:
    """``layer``'s key statistics in the model as it is now (the breadth run's calibration images)."""
    return surgery.collect_key_stats(model, layer, data.calibration, batch_size=16, progress=False)


def _edit(
    model: nn.Module, layer: str, data: Data, stats: surgery.KeyStats, *, held_out: bool = False, rank: int = 1
) -> surgery.Edit:
    """The breadth run's default edit of ``layer``, fitted on the exemplars or on the held-out images."""
    x, x2, masks = (data.h, data.h2, data.h_masks) if held_out else (data.x, data.x2, data.masks)
    return surgery.rewrite(model, layer, x, x2, masks, stats=stats, rank=rank)


def measure_reach(
    model_id: str, *, layers: int = 3, chain: int = 3, ranks: Sequence[int] = RANKS, images: dict[str, int] | None = None
) -> dict[str, Any]:
    """One model: per layer of its first ``layers``, the exemplar-fitted edit and the held-out-fitted edit of
    each rank; then the first 2 .. ``chain`` of them edited in sequence."""
    t0 = time.perf_counter()
    data, model, base = prepare_run(model_specs([model_id])[model_id], images=images)
    names = [layer.name for layer in surgery.recommended_layers(model, k=layers)]
    rows = []
    for name in names:
        row: dict[str, Any] = {"layer": name}
        stats = _stats(model, name, data)  # the unedited model's, for every edit of this layer
        with edited(model, _edit(model, name, data, stats)):
            row["exemplars"] = current_ratios(model, data, base)
        for rank in ranks:
            with edited(model, _edit(model, name, data, stats, held_out=True, rank=rank)):
                row[f"held-out r={rank}"] = current_ratios(model, data, base)
        rows.append(row)
    order = {layer.name: i for i, layer in enumerate(surgery.editable_layers(model))}
    sequences = []
    for n in range(2, min(chain, len(names)) + 1):
        ordered = sorted(names[:n], key=order.__getitem__)
        with ExitStack() as stack:
            for name in ordered:  # statistics collected on the model carrying the edits before
                stack.enter_context(edited(model, _edit(model, name, data, _stats(model, name, data))))
            sequences.append({"layers": ordered, **current_ratios(model, data, base)})
    return {"model": model_id, "rows": rows, "sequences": sequences, "seconds": time.perf_counter() - t0}


def markdown(result: dict[str, Any]) -> str:
    ranks = result["ranks"]
    n_seq = max((len(m["sequences"]) for m in result["models"]), default=0)
    lines = [
        "# Breadth: what a weight edit can reach",
        "",
        f"Command: `{result['command']}`.",
        "",
        "The breadth benchmark's data, weights and default rewrite, at each model's first "
        f"{result['layers']} recommended layers (family order). Cells are held-out logit ratios (after/before; 1 = "
        "no effect, 0 = the originals' logits). **exemplars**: the breadth run's edit, fitted on the 4 exemplars. "
        "**fitted on held-out, rank r**: the edit of rank r fitted on the 12 held-out images themselves and "
        "measured on them: what the method reaches at that layer when its exemplars are the very images it is "
        "measured on (not a choice a user can make). **in sequence**: the first n layers in forward order, each edited (on the exemplars) on the "
        "model carrying the ones before it, all applied; in parentheses the exemplars' ratio and the clean "
        "change.",
        "",
        "| model | layer | exemplars | " + " | ".join(f"fitted on held-out, rank {r}" for r in ranks) + " |",
        "|---|---|---|" + "---|" * len(ranks),
    ]
    best: dict[str, list[float]] = {"exemplars": [], **{f"held-out r={r}": [] for r in ranks}}
    first: dict[str, list[float]] = {k: [] for k in best}
    for m in result["models"]:
        for row in m["rows"]:
            cells = [f"{row[k]['heldout_ratio']:.3f}" for k in best]
            lines.append(f"| {m['model']} | `{row['layer']}` | " + " | ".join(cells) + " |")
        for k in best:
            best[k].append(min(row[k]["heldout_ratio"] for row in m["rows"]))
            first[k].append(m["rows"][0][k]["heldout_ratio"])
    all_rows = [row for m in result["models"] for row in m["rows"]]
    beats, total = sum(r["exemplars"]["heldout_ratio"] < r["held-out r=1"]["heldout_ratio"] for r in all_rows), len(all_rows)
    lines += [
        "",
        f"Over {len(result['models'])} models, median held-out ratio at the first layer / the best of the "
        f"{result['layers']} layers: "
        + "; ".join(f"{k.replace('r=', 'rank ')} {np.median(first[k]):.3f} / {np.median(best[k]):.3f}" for k in best)
        + ".",
        "",
        "Layers where the exemplars' edit moves the held-out logits further than the rank-one edit fitted on "
        f"them (the value objective is not the logits'): {beats} of {total}.",
        "",
        "Models whose best layer stays above the per-model target "
        f"({TARGET}) even with the edit fitted on the held-out images: "
        + "; ".join(
            f"rank {r}: " + (", ".join(m["model"] for m, b in zip(result["models"], best[f"held-out r={r}"]) if b > TARGET) or "none")
            for r in ranks
        )
        + ".",
        "",
        "| model | " + " | ".join(f"in sequence, n = {n + 2}" for n in range(n_seq)) + " | best of these layers alone | layers |",
        "|---|" + "---|" * (n_seq + 2),
    ]
    gains = []
    for m in result["models"]:
        single = min(row["exemplars"]["heldout_ratio"] for row in m["rows"][: result["chain"]])
        cells = [f"{s['heldout_ratio']:.3f} ({s['exemplar_ratio']:.3f}; {s['clean_change']:.3f})" for s in m["sequences"]]
        cells += ["-"] * (n_seq - len(cells))
        chain = m["sequences"][-1]["layers"] if m["sequences"] else []
        lines.append(f"| {m['model']} | " + " | ".join(cells) + f" | {single:.3f} | " + ", ".join(f"`{c}`" for c in chain) + " |")
        if m["sequences"]:
            gains.append(min(s["heldout_ratio"] for s in m["sequences"]) - single)
    if gains:
        lines += [
            "",
            "Best sequence minus the best of its layers alone (all fitted on the exemplars; below 0 = the sequence "
            f"moves the held-out logits further): median {np.median(gains):+.3f}, lower on {sum(g < 0 for g in gains)} "
            f"of {len(gains)} models.",
        ]
    return "\n".join(lines) + "\n"


def join_runs(paths: Sequence[Path], command: str) -> dict[str, Any]:
    """Runs of this study on different models (one setting) as one result, the models in the zoo's order;
    ``command`` is the join's own, recorded after the runs'."""
    runs = [json.loads(Path(path).read_text()) for path in paths]
    settings = {(r["layers"], r["chain"], tuple(r["ranks"])) for r in runs}
    if len(settings) != 1:
        raise SystemExit(f"the runs differ in --layers, --chain or --ranks ({sorted(settings)}): join runs of one setting")
    by_id = {m["model"]: m for r in runs for m in r["models"]}
    if len(by_id) != sum(len(r["models"]) for r in runs):
        raise SystemExit("a model is in more than one run: join runs of different models")
    order = {spec.id: i for i, spec in enumerate(MODELS)}
    return {
        "command": " ; ".join([*(r["command"] for r in runs), command]),
        **{k: runs[0][k] for k in ("layers", "chain", "ranks")},
        "models": sorted(by_id.values(), key=lambda m: order.get(m["model"], len(order))),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = study_parser("benchmarks.breadth.reach", __doc__, name="breadth-reach", models=MODELS_NAMED)
    p.add_argument("--layers", type=int, default=3, help="how many recommended layers per model")
    p.add_argument("--chain", type=int, default=3, help="edit the first 2 .. CHAIN layers in sequence")
    p.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    p.add_argument("--join", type=Path, nargs="+", metavar="JSON", help="only join earlier runs (other models) into --name")
    args = p.parse_args(argv)
    if args.join:
        result = join_runs(args.join, study_command("benchmarks.breadth.reach", argv))
        write_study(args.out, args.name, result, markdown)
        return result
    torch.set_num_threads(1)
    result: dict[str, Any] = {
        "command": study_command("benchmarks.breadth.reach", argv),
        "layers": args.layers,
        "chain": args.chain,
        "ranks": list(args.ranks),
        "models": [],
    }
    partial = args.out / f"{args.name}.partial.json"  # the models measured so far: a stopped run keeps them
    for model_id in study_models(args.models):
        result["models"].append(measure_reach(model_id, layers=args.layers, chain=args.chain, ranks=args.ranks))
        write_text(partial, json.dumps(result, indent=1))
        print(f"  {model_id}: {result['models'][-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
    write_study(args.out, args.name, result, markdown)
    partial.unlink()
    return result


if __name__ == "__main__":
    main()
