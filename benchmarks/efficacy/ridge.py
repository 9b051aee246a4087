"""What the size of an ``mlp.fc2`` update does, and whether a ridge that keeps it near the weight's scale
edits better (issue 26).

On the testbed ConvNeXt the layer scale ``gamma`` after ``mlp.fc2`` is small, so the solver meets the
values with a large ``lam``: updates hundreds to tens of thousands of times the norm of the weight they change. Here, for pairs
drawn by the protocol (one unit of N exemplars each, on draws the efficacy run does not use), a rewrite of
each ``fc2`` candidate is made at every ridge of a grid (``FastConfig(ridge=...)``, which adds
``ridge * ||lam||^2`` to the objective). The grid is relative: ``ridge = rel * L0 / ||W||^2`` with ``L0``
the objective without an edit, so at ``rel = 1`` an update as large as the weight costs as much as the
whole loss it removes, and the update shrinks toward the weight's scale as ``rel`` grows. Its strength is chosen on validation within the clean budget,
as the efficacy benchmark chooses, and on the pair's TEST scenes we report errors corrected on other
classes and on the target class (exemplars' style), the clean test accuracy change, and the update's
norm over the weight's, at strength 1 and at the chosen strength. Where the layer scale sits: the share
of the update's energy in the tenth of the output channels whose ``gamma`` is smallest, and the norm
ratio after ``gamma`` (``||gamma * delta|| / ||gamma * W||``).

    OMP_NUM_THREADS=1 python -m benchmarks.efficacy.ridge [--arch convnext] [--pairs 4] [--layers A B]

Writes ``benchmarks/results/efficacy_ridge.{md,json}``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from surgery import rewrite, strength_grid
from surgery.layers import get_layer
from surgery.solvers import FastConfig
from surgery.testbed.protocol import select_pairs

from benchmarks.multi_edit.run import carrying, choose, load_bench, make_rule, rule_scores, run_archs, write_result

from .settings import settings_for

__all__ = ["main", "RIDGES"]

logger = logging.getLogger("benchmarks.efficacy.ridge")

RESULTS = Path(__file__).resolve().parents[1] / "results"
RIDGES = (0.0, 1e-6, 1e-5, 1e-4, 1e-3)  # rel: ridge = rel * L0 / ||W||^2
LOW_SCALE_FRACTION = 0.1  # "the channels whose gamma is smallest": this fraction of them
DRAW = 300  # the pairs' rng stream: not one the efficacy run (seed) or multi_edit (100 + d) uses


def layer_scale_view(gamma: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor) -> dict[str, float]:
    """Where an update of a layer whose output channels ``gamma`` scales lies: its energy share in the
    ``LOW_SCALE_FRACTION`` of channels with the smallest ``|gamma|``, and its norm over the weight's after
    the scale."""
    g = gamma.detach().double().abs().flatten()
    w, d = weight.detach().double().flatten(1), delta.detach().double().flatten(1)
    energy = d.square().sum(dim=1)
    low = g.argsort()[: max(1, int(LOW_SCALE_FRACTION * len(g)))]
    return {
        "low_scale_share": float(energy[low].sum() / energy.sum()),
        "norm_ratio_after_scale": float((g[:, None] * d).norm() / (g[:, None] * w).norm()),
    }


def measure_arch(arch: str, n_pairs: int, ridges: tuple[float, ...], layers: list[str] | None = None) -> dict:
    ridges = (0.0, *sorted(r for r in ridges if r != 0))  # the unridged rewrite first: it gives L0
    s = settings_for("full", arch)
    b = load_bench(arch, s, lambda info: layers or [n for n in info["candidate_layers"]["deep"] if n.endswith("mlp.fc2")])
    model, tb, prep, clean_val, clean_test, stats, layers = b.model, b.tb, b.prep, b.clean_val, b.clean_test, b.stats, b.layers
    cv_x, cv_y = b.clean_val_cached, clean_val.labels
    pairs, _ = select_pairs(model, tb, prep, clean_val, k=n_pairs, rng=np.random.default_rng([s.seed, DRAW]))
    rows = []
    for i, p in enumerate(pairs):
        rule = make_rule(model, tb, prep, p, clean_test, s, [s.seed, DRAW, i])
        for layer in layers:
            weight = get_layer(model, layer).weight
            weight_norm = float(weight.detach().double().norm())
            gamma = getattr(model.get_submodule(layer.rsplit(".mlp", 1)[0]), "gamma", None)  # timm ConvNeXt block
            steps = {} if s.fast_steps is None else {"max_iter": s.fast_steps}
            loss0 = None
            for rel in ridges:
                ridge = 0.0 if rel == 0 else rel * loss0 / weight_norm**2
                edit = rewrite(model, layer, rule.ex["x"], rule.ex["x2"], rule.ex["m"], stats=stats[layer],
                               solver=FastConfig(ridge=ridge, **steps))
                loss0 = edit.info["objective_before"] if loss0 is None else loss0
                ratio = float(edit.delta().double().norm()) / weight_norm
                row = {"pair": f"{p['concept']}->{p['style']}", "layer": layer, "ridge": rel, "ridge_abs": ridge,
                       "norm_ratio": ratio}
                if gamma is not None:
                    row.update(layer_scale_view(gamma, weight, edit.delta()))
                for label, cand in (("full", strength_grid(edit, [1.0])[0]),
                                    ("chosen", choose(model, strength_grid(edit, s.alphas), rule.val_x, rule.val_y,
                                                      rule.val_orig, cv_x, cv_y, s))):
                    if cand is None:
                        row[label] = None
                        continue
                    with carrying(model, [cand]):
                        scores = rule_scores(model, rule)
                    row[label] = {"alpha": cand.alpha, **scores, "clean_change_pp": b.clean_change([cand])}
                rows.append(row)
                logger.info("%s %s ridge %g: |delta|/|W| %.3g, chosen %s", row["pair"], layer, rel, ratio, row["chosen"])
    return {"layers": layers, "pairs": [f"{p['concept']}->{p['style']}" for p in pairs], "rows": rows}


def _mean(values: list[float | None]) -> str:
    v = [x for x in values if x is not None]
    return "n/a" if not v else f"{np.mean(v):+.1f}"


def _median(rows: list[dict], key: str, fmt: str) -> str:
    v = [r[key] for r in rows if key in r]
    return "n/a" if not v else format(float(np.median(v)), fmt)


def markdown(result: dict) -> str:
    lines = [
        "# The size of an mlp.fc2 update, and a ridge on it",
        "",
        f"Command: `{result['command']}`.",
        "",
        "Per layer and relative ridge (``ridge = rel * L0 / ||W||^2``, L0 the objective without an edit), mean over pairs (one unit of N = 3 exemplars each): **|delta|/|W|**, the "
        "update's Frobenius norm at strength 1 over the weight's (median); **at strength 1** and **chosen** "
        "(strength chosen on validation within the clean budget): % errors corrected on other classes and on "
        "the target class (exemplars' style, test scenes) and the clean test accuracy change (pp); "
        "**qualified**: pairs for which some strength met the budget; **low-gamma share**: the share of the "
        "update's energy (at strength 1) in the tenth of the output channels whose layer scale gamma is smallest, "
        "and **after gamma**: ||gamma * delta|| / ||gamma * W|| (medians).",
        "",
        "| model | layer | rel. ridge | \\|delta\\|/\\|W\\| | low-gamma share | after gamma | other @1 | target @1 | clean @1 | chosen strength | other | target | clean | qualified |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arch, a in result["archs"].items():
        for layer in a["layers"]:
            for ridge in sorted({r["ridge"] for r in a["rows"]}):
                rows = [r for r in a["rows"] if r["layer"] == layer and r["ridge"] == ridge]
                full = [r["full"] for r in rows]
                chosen = [r["chosen"] for r in rows if r["chosen"] is not None]
                alphas = "/".join(f"{c['alpha']:g}" for c in chosen) or "-"
                lines.append(
                    f"| {arch} | {layer} | {ridge:g} | {np.median([r['norm_ratio'] for r in rows]):.3g} | "
                    f"{_median(rows, 'low_scale_share', '.3f')} | {_median(rows, 'norm_ratio_after_scale', '.3g')} | "
                    f"{_mean([f['other/same'] for f in full])} | {_mean([f['target/same'] for f in full])} | "
                    f"{_mean([f['clean_change_pp'] for f in full])} | {alphas} | "
                    f"{_mean([c['other/same'] for c in chosen])} | {_mean([c['target/same'] for c in chosen])} | "
                    f"{_mean([c['clean_change_pp'] for c in chosen])} | {len(chosen)}/{len(rows)} |"
                )
        lines.append(f"\n{arch}: pairs {', '.join(a['pairs'])}; {a['seconds'] / 60:.0f} min.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.efficacy.ridge", description=(__doc__ or "").split("\n")[0])
    p.add_argument("--arch", nargs="+", default=["convnext"])
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--ridges", type=float, nargs="+", default=list(RIDGES))
    p.add_argument("--layers", nargs="+", help="the layers to edit (default: every mlp.fc2 among the deep candidates)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="efficacy_ridge")
    args = p.parse_args(argv)
    result = run_archs(
        "benchmarks.efficacy.ridge", args.arch, lambda arch: measure_arch(arch, args.pairs, tuple(args.ridges), args.layers), argv
    )
    write_result(result, args.out, args.name, markdown)
    return result


if __name__ == "__main__":
    main()
